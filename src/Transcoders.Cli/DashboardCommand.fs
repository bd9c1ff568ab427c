/// `dashboard MODEL --coders DIR...`: feature pages (one per coder, plus an index) from one streamed pass over the
/// shipped TinyStories text, with the activations on the user's own texts embedded.
module Transcoders.Cli.DashboardCommand

open System.Diagnostics
open System.IO
open Argu
open Transcoders.Tensors
open Transcoders.Views

type Args =
    | [<MainCommand; ExactlyOnce>] Model of path: string
    | [<Mandatory>] Coders of folders: string list
    | Text of text: string
    | Stories of int
    | Context of int
    | Top of int
    | Out of folder: string
    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Model _ -> "the model the coders belong to (our folder, a Hugging Face folder or a llama2.c .bin)"
            | Coders _ -> "coder folders, or folders holding them (e.g. runs/quickstart/coders)"
            | Text _ -> "a text of yours whose activations the page shows (repeat for several)"
            | Stories _ -> "TinyStories validation stories read (default 400)"
            | Context _ -> "tokens per story read (default 64)"
            | Top _ -> "top examples kept per feature (default 12)"
            | Out _ -> "folder for the pages (default runs/pages)"

let run (common: Common.Options) (args: ParseResults<Args>) =
    let sw = Stopwatch.StartNew()
    let device = Common.device common
    let out = args.GetResult(Out, Path.Combine("runs", "pages"))
    let model, tokenizer, _ = Transcoders.Models.PromptTokens.loadWith (Common.loadOptions common) (args.GetResult Model) "" device
    use _m = model
    let coders = Transcoders.Coders.CoderFolders.load (args.GetResult Coders) device
    try
        let options =
            { DashboardOptions.Default with
                Context = args.GetResult(Context, 64)
                Texts = args.GetResults Text
                Stats = { FeatureStatsOptions.Default with TopExamples = args.GetResult(Top, 12) } }
        let stories = Interpretability.shippedStories tokenizer (args.GetResult(Stories, 400))
        let dashboards =
            [ for c in coders ->
                  let d = FeatureDashboard.compute model tokenizer (Interpretability.coderName c) c stories options
                  let live = d.Layers |> Array.sumBy (fun l -> l.Summaries |> Array.filter (fun s -> s.Count > 0L) |> Array.length)
                  let total = d.Layers |> Array.sumBy (fun l -> l.Summaries.Length)
                  printfn "%-8s %d sequences, %s tokens; %d of %d features active; %.1f s" d.Name d.Sequences (Output.count d.Tokens) live total d.Seconds
                  d ]
        let paths = FeatureDashboard.write out (Transcoders.Text.Tokenizer.tokenText tokenizer) options dashboards
        printfn "\npages written in %s:" (Output.seconds sw.Elapsed)
        for p in paths do printfn "  %s" p
        0
    finally
        for c in coders do (c :> System.IDisposable).Dispose()
