module Transcoders.Text.Corpus

let private todo = ()
