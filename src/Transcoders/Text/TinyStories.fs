/// The shipped TinyStories text as training data: a tokenizer (a compact vocabulary counted on the training
/// files, or full GPT-2) and train/validation token shards, reused when already made from the same files.
module Transcoders.Text.TinyStories

open System.IO
open Transcoders.Files

/// A prepared corpus: its tokenizer, folder and both splits' metadata.
type Prepared =
    { Tokenizer: Tokenizer
      Folder: string
      Train: TokenShards.Meta
      Validation: TokenShards.Meta }

/// The default shard folder for a vocabulary choice, under the cache folder.
let defaultFolder (vocabSize: int option) =
    Path.Combine(Paths.cacheDir (), "corpus", (match vocabSize with Some k -> sprintf "tinystories-compact%d" k | None -> "tinystories-gpt2"))

/// Training files: all but the shipped validation head.
let trainingFiles (files: string list) =
    files |> List.filter (fun f -> Path.GetFileName f <> Corpus.shippedValidationFile)

/// Builds the tokenizer (`Some k`: the k most frequent GPT-2 tokens of the training files plus four specials;
/// `None`: GPT-2) and writes `folder/train` and `folder/validation`. Shards already in `folder` that were made
/// from the same files with the same tokenizer are reused. Validation is the shipped V1 validation head when
/// it is among `files`, else a seeded 5% of the stories.
let prepare (files: string list) (vocabSize: int option) (folder: string) : Prepared =
    let trainFiles = trainingFiles files
    let tokenizer =
        match vocabSize with
        | Some k -> Tokenizer.compact (Corpus.buildCompactVocab (Gpt2Tokenizer.get ()) k trainFiles)
        | None -> Tokenizer.gpt2 ()
    let existing =
        try
            let t = TokenShards.readMeta (Path.Combine(folder, "train"))
            let v = TokenShards.readMeta (Path.Combine(folder, "validation"))
            let same = t.TokenizerJson = (Tokenizer.toJson tokenizer).ToJsonString() && t.Sources = TokenShards.sourcesOf files
            if same then Some(t, v) else None
        with _ -> None
    let train, valid =
        match existing with
        | Some pair -> pair
        | None ->
            let split =
                if trainFiles.Length < files.Length then Corpus.ByFile [ Corpus.shippedValidationFile ]
                else Corpus.HeldOut(0.05, 42L)
            TokenShards.prepare tokenizer files { TokenShards.PrepareOptions.Default with Split = split } folder
    { Tokenizer = tokenizer; Folder = folder; Train = train; Validation = valid }

/// The prepared corpus's token streams (train, validation).
let tokens (p: Prepared) =
    TokenShards.readTokens (Path.Combine(p.Folder, "train")), TokenShards.readTokens (Path.Combine(p.Folder, "validation"))
