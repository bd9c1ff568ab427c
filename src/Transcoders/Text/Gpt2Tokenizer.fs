module Transcoders.Text.Gpt2Tokenizer

let private todo = ()
