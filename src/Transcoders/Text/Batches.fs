module Transcoders.Text.Batches

let private todo = ()
