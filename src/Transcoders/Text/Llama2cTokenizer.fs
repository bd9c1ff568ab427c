module Transcoders.Text.Llama2cTokenizer

let private todo = ()
