module Transcoders.Text.Tokenizer

let private todo = ()
