/// `corpus`: tokenizes the shipped TinyStories (or given files) into token shards and prints statistics.
module Transcoders.Cli.CorpusCommand

open System.Diagnostics
open System.IO
open Argu
open Transcoders.Files
open Transcoders.Text

type Args =
    | Files of paths: string list
    | Vocab_Size of int
    | Full_Gpt2
    | Out of folder: string
    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Files _ -> "TinyStories-format files (.txt or .txt.gz; default: the shipped ones)"
            | Vocab_Size _ -> "size of the compact vocabulary, specials included (default 4096)"
            | Full_Gpt2 -> "use GPT-2's full 50,257-token vocabulary instead of a compact one"
            | Out _ -> "output folder (default: <cache>/corpus/tinystories-<vocab>)"

/// What `prepare` made: the tokenizer and both splits' metadata.
type Prepared =
    { Tokenizer: Tokenizer
      Folder: string
      Train: TokenShards.Meta
      Validation: TokenShards.Meta }

/// Builds the tokenizer (a compact vocabulary counted on the training files, or full GPT-2) and writes the
/// shards; reuses shards already in `folder` when they were made from the same files with the same tokenizer.
let prepare (files: string list) (vocabSize: int option) (folder: string) : Prepared =
    let validation = files |> List.filter (fun f -> Path.GetFileName f = Corpus.shippedValidationFile)
    let trainFiles = files |> List.except validation
    let gpt2 = Gpt2Tokenizer.get ()
    let tokenizer =
        match vocabSize with
        | Some k -> Tokenizer.compact (Corpus.buildCompactVocab gpt2 k trainFiles)
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
            let options =
                { TokenShards.PrepareOptions.Default with
                    Split = if validation.IsEmpty then Corpus.HeldOut(0.05, 42L) else Corpus.ByFile [ Corpus.shippedValidationFile ] }
            TokenShards.prepare tokenizer files options folder
    { Tokenizer = tokenizer; Folder = folder; Train = train; Validation = valid }

let defaultFolder (vocabSize: int option) =
    Path.Combine(Paths.cacheDir (), "corpus", (match vocabSize with Some k -> sprintf "tinystories-compact%d" k | None -> "tinystories-gpt2"))

let run (args: ParseResults<Args>) =
    let files = args.GetResult(Files, Corpus.shippedFiles ())
    let vocabSize = if args.Contains Full_Gpt2 then None else Some(args.GetResult(Vocab_Size, 4096))
    let folder = args.GetResult(Out, defaultFolder vocabSize)
    let sw = Stopwatch.StartNew()
    let p = prepare files vocabSize folder
    let stats = Corpus.stats (Tokenizer.gpt2 ()) (files |> List.filter (fun f -> Path.GetFileName f <> Corpus.shippedValidationFile))
    let coverage =
        match p.Tokenizer with
        | Compact(v, _) -> CompactVocab.coverage v (TokenShards.readTokens (Path.Combine(folder, "train")))
        | _ -> 1.0
    printfn "TinyStories corpus → %s (%s)" folder (Output.seconds sw.Elapsed)
    Output.table [
        "files", string files.Length
        "training stories", Output.count stats.Stories
        "training GPT-2 tokens", Output.count stats.Tokens
        "distinct GPT-2 tokens", Output.count (int64 stats.DistinctTokens)
        "tokenizer", Tokenizer.describe p.Tokenizer
        "train shards", sprintf "%s tokens, %s documents" (Output.count p.Train.Tokens) (Output.count p.Train.Documents)
        "validation shards", sprintf "%s tokens, %s documents" (Output.count p.Validation.Tokens) (Output.count p.Validation.Documents)
        "vocabulary coverage (train)", Output.percent coverage ]
    0
