/// `graph-page GRAPH --model MODEL`: the interactive page of a saved attribution graph (from `trace --out`).
module Transcoders.Cli.GraphPageCommand

open System.IO
open Argu
open Transcoders.Circuits
open Transcoders.Models
open Transcoders.Tensors
open Transcoders.Text
open Transcoders.Views

type Args =
    | [<MainCommand; ExactlyOnce>] Graph of file: string
    | Model of path: string
    | Feature_Pages of folder: string
    | Node_Threshold of float
    | Edge_Threshold of float
    | Out of file: string
    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Graph _ -> "a graph file saved by trace (graph.safetensors)"
            | Model _ -> "the model, for its tokenizer (token texts); without it the graph's own token strings are used"
            | Feature_Pages _ -> "folder of the dashboard pages (features-M{layer}.html), linked from feature nodes"
            | Node_Threshold _ -> "node threshold the page starts at (default 0.8)"
            | Edge_Threshold _ -> "edge threshold the page starts at (default 0.98)"
            | Out _ -> "the page (default: the graph's name with .html)"

/// Token texts: the model's tokenizer when given, else the graph's own strings (then ids).
let tokenText (model: string option) (g: Graph) : int -> string =
    match model with
    | Some m ->
        let t = ModelTokenizer.find m
        Tokenizer.tokenText t
    | None ->
        let known = Array.zip g.Tokens (if g.TokenStrings.Length = g.Tokens.Length then g.TokenStrings else g.Tokens |> Array.map string) |> dict
        fun t -> match known.TryGetValue t with | true, s -> s | _ -> sprintf "<%d>" t

let run (args: ParseResults<Args>) =
    let path = args.GetResult Graph
    let g, info = GraphFile.loadWith path
    let text = tokenText (args.TryGetResult Model) g
    let prompt = match info.Description.TryFind "prompt" with Some p -> p | None -> System.String.Concat(g.Tokens |> Array.map text)
    let pages =
        match args.TryGetResult Feature_Pages with
        | Some dir ->
            let outDir = Path.GetDirectoryName(Path.GetFullPath(args.GetResult(Out, Path.ChangeExtension(path, ".html"))))
            Directory.GetFiles(Path.GetFullPath dir, "features-M*.html")
            |> Array.choose (fun f ->
                let m = System.Text.RegularExpressions.Regex.Match(Path.GetFileName f, @"^features-M(\d+)\.html$")
                if m.Success then Some (int m.Groups[1].Value, Path.GetRelativePath(outDir, f)) else None)
            |> Map.ofArray
        | None -> Map.empty
    let options =
        { GraphPageOptions.Create(sprintf "Attribution graph (%s)" (Path.GetFileName path), prompt, text) with
            FeaturePages = pages; Scores = info.Scores
            NodeThreshold = args.GetResult(Node_Threshold, 0.8); EdgeThreshold = args.GetResult(Edge_Threshold, 0.98) }
    let page = GraphPage.write (args.GetResult(Out, Path.ChangeExtension(path, ".html"))) options g
    printfn "graph: %d nodes (%d features); page written: %s" g.NodeCount g.Features.Length page
    0
