/// Prompts as token ids: a model loaded for inference with its tokenizer and a prompt's tokens, single-token
/// look-ups, display strings, and the id tensor a forward pass takes.
module Transcoders.Models.PromptTokens

open System
open TorchSharp
open Transcoders.Text

/// The prompt's token ids with `tokenizer`, BOS first when the tokenizer has one. Fails when that leaves no token.
let encode (tokenizer: Tokenizer) (prompt: string) : int[] =
    let tokens = Tokenizer.encodeDocument tokenizer true false prompt
    if tokens.Length = 0 then invalidArg "prompt" "the prompt is empty and the tokenizer has no BOS: nothing to trace"
    tokens

/// The model at `modelPath` loaded as `options` say (eval mode, on `device`), its tokenizer (`ModelTokenizer.find`)
/// and the prompt's tokens.
let loadWith (options: LoadOptions) (modelPath: string) (prompt: string) (device: torch.Device) : Transformer * Tokenizer * int[] =
    let model, _ = ModelFiles.loadWith options modelPath device
    try
        model.eval ()
        let tokenizer = ModelTokenizer.find modelPath
        model, tokenizer, encode tokenizer prompt
    with _ ->
        model.Dispose()
        reraise ()

/// `loadWith LoadOptions.Default`: the model as stored.
let load (modelPath: string) (prompt: string) (device: torch.Device) : Transformer * Tokenizer * int[] =
    loadWith LoadOptions.Default modelPath prompt device

/// The prompt as token ids [1, p] on `device` (one tensor, no intermediate).
let tensor (tokens: int[]) (device: torch.Device) : torch.Tensor =
    let ids : int64[] = tokens |> Array.map int64
    torch.tensor(dataArray = ids, dimensions = ReadOnlySpan<int64>([| 1L; int64 ids.Length |]), device = device)

/// A token's display text: its decoded string, quoted, with its id, e.g. `" she" (87)`.
let display (tokenizer: Tokenizer) (id: int) : string = sprintf "%A (%d)" (Tokenizer.decode tokenizer [| id |]) id

/// The id of `text` when the tokenizer encodes it as exactly one token; a clear error when it is several or none.
let single (tokenizer: Tokenizer) (text: string) : int =
    match Tokenizer.encode tokenizer text with
    | [| id |] -> id
    | ids -> invalidArg "target" (sprintf "'%s' is %d tokens (%A) for this tokenizer; give one token, or its id with --target-id" text ids.Length ids)
