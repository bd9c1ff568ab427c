/// The tokenizer that belongs to a checkpoint: the one recorded in our format's metadata; for a llama2.c
/// `.bin`, a `tok{vocab}.bin` (or `tokenizer.bin`) beside it; GPT-2's BPE for a Hugging Face GPT-2 with its
/// 50,257-token vocabulary; for other Hugging Face folders, their own tokenizer.json (byte-level BPE, as Pythia's).
/// None when nothing fits (the model then works on ids only).
module Transcoders.Models.ModelTokenizer

open System.IO
open Transcoders.Text

/// The tokenizer of the checkpoint at `path` (a folder or a file), if one can be found.
let tryFind (path: string) : Tokenizer option =
    let info = ModelFiles.inspect path
    match info.Kind, info.Tokenizer with
    | ModelFiles.Native, Some json -> Some(Tokenizer.ofJsonElement (Checkpoint.configPath path) json)
    | ModelFiles.Native, None -> None
    | ModelFiles.Llama2c, _ ->
        let dir = Path.GetDirectoryName(Path.GetFullPath path)
        [ sprintf "tok%d.bin" info.Config.VocabSize; "tokenizer.bin" ]
        |> List.map (fun f -> Path.Combine(dir, f))
        |> List.tryFind File.Exists
        |> Option.map (fun f -> Tokenizer.llama2c f info.Config.VocabSize)
    | ModelFiles.HuggingFace arch, _ when arch.StartsWith "GPT2" && info.Config.VocabSize = Gpt2Tokenizer.VocabSize ->
        Some(Tokenizer.gpt2 ())
    | ModelFiles.HuggingFace _, _ when File.Exists(Path.Combine(path, "tokenizer.json")) ->
        let file = Path.Combine(path, "tokenizer.json")
        let t = Tokenizer.huggingFace file
        if Tokenizer.vocabSize t > info.Config.VocabSize then
            failwithf "%s: the tokenizer has %d ids but the model's vocabulary only %d" file (Tokenizer.vocabSize t) info.Config.VocabSize
        Some t
    | ModelFiles.HuggingFace _, _ -> None

/// Like `tryFind`, with a clear error when the checkpoint has no known tokenizer.
let find (path: string) : Tokenizer =
    match tryFind path with
    | Some t -> t
    | None ->
        failwithf "%s: no tokenizer is recorded with this checkpoint or found beside it (for llama2.c, put tok%d.bin next to the .bin)"
            path (ModelFiles.inspect path).Config.VocabSize
