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

/// Prints what a prepared corpus holds.
let printSummary (files: string list) (p: TinyStories.Prepared) (elapsed: System.TimeSpan) =
    let stats = Corpus.stats (Tokenizer.gpt2 ()) (TinyStories.trainingFiles files)
    let coverage =
        match p.Tokenizer with
        | Compact(v, _) -> CompactVocab.coverage v (TokenShards.readTokens (Path.Combine(p.Folder, "train")))
        | _ -> 1.0
    printfn "TinyStories corpus → %s (%s)" p.Folder (Output.seconds elapsed)
    Output.table [
        "files", string files.Length
        "training stories", Output.count stats.Stories
        "training GPT-2 tokens", Output.count stats.Tokens
        "distinct GPT-2 tokens", Output.count (int64 stats.DistinctTokens)
        "tokenizer", Tokenizer.describe p.Tokenizer
        "train shards", sprintf "%s tokens, %s documents" (Output.count p.Train.Tokens) (Output.count p.Train.Documents)
        "validation shards", sprintf "%s tokens, %s documents" (Output.count p.Validation.Tokens) (Output.count p.Validation.Documents)
        "vocabulary coverage (train)", Output.percent coverage ]

let run (_: Common.Options) (args: ParseResults<Args>) =
    let files = args.GetResult(Files, Corpus.shippedFiles ())
    let vocabSize = if args.Contains Full_Gpt2 then None else Some(args.GetResult(Vocab_Size, 4096))
    let folder = args.GetResult(Out, TinyStories.defaultFolder vocabSize)
    let sw = Stopwatch.StartNew()
    let p = TinyStories.prepare files vocabSize folder
    printSummary files p sw.Elapsed
    0
