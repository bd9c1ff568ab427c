module Transcoders.Text.CompactVocab

let private todo = ()
