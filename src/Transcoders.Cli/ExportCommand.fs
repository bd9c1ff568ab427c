/// `export` and `import`: the Python ecosystem's formats. Graphs to and from circuit-tracer's / Neuronpedia's graph
/// JSON (with graph-metadata.json and, given coders, feature files); coders to and from SAELens' layout.
module Transcoders.Cli.ExportCommand

open System.IO
open Argu
open Transcoders.Circuits
open Transcoders.Coders
open Transcoders.Tensors
open Transcoders.Views

type ExportArgs =
    | Graph of file: string
    | Coder of folder: string
    | Model of path: string
    | Coders of folders: string list
    | Slug of string
    | Scan of string
    | Legacy_Error_Ids
    | Node_Threshold of float
    | Edge_Threshold of float
    | [<Mandatory>] Out of folder: string
    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Graph _ -> "a graph file (trace --out) to write as circuit-tracer's graph JSON"
            | Coder _ -> "a coder folder to write in SAELens' layout (cfg.json + sae_weights.safetensors)"
            | Model _ -> "the graph's model (token texts; with --coders, feature files for circuit-tracer's frontend)"
            | Coders _ -> "the graph's coders: also write features/{scan}/{feature}.json from the shipped TinyStories text"
            | Slug _ -> "the graph's name in the frontend (default: the graph file's name)"
            | Scan _ -> "metadata.scan, the model id (default: the model file's name)"
            | Legacy_Error_Ids -> "error ids 0_{layer}_{pos} (circuit-tracer before its fix of issue #78; refused on collision)"
            | Node_Threshold _ -> "pruning node threshold (default 0.8)"
            | Edge_Threshold _ -> "pruning edge threshold (default 0.98)"
            | Out _ -> "output folder"

type ImportArgs =
    | Graph_Json of file: string
    | Saelens of folder: string
    | [<Mandatory>] Out of path: string
    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Graph_Json _ -> "a circuit-tracer / Neuronpedia graph JSON file, saved as our graph file"
            | Saelens _ -> "a SAELens folder (cfg.json + sae_weights.safetensors), saved as our coder folder"
            | Out _ -> "graph file (.safetensors) or coder folder to write"

let export (args: ParseResults<ExportArgs>) =
    let out = args.GetResult ExportArgs.Out
    match args.TryGetResult Graph, args.TryGetResult Coder with
    | Some graphPath, None ->
        let g, info = GraphFile.loadWith graphPath
        let text = GraphPageCommand.tokenText (args.TryGetResult Model) g
        let scan = args.GetResult(Scan, match args.TryGetResult Model with Some m -> Path.GetFileNameWithoutExtension(Path.GetFullPath(m).TrimEnd('/')) | None -> "model")
        let prompt = match info.Description.TryFind "prompt" with Some p -> p | None -> System.String.Concat(g.Tokens |> Array.map text)
        let options =
            { GraphExportOptions.Create(args.GetResult(Slug, Path.GetFileNameWithoutExtension graphPath), scan, prompt, text) with
                ErrorIds = (if args.Contains Legacy_Error_Ids then Legacy else Current)
                NodeThreshold = args.GetResult(Node_Threshold, 0.8); EdgeThreshold = args.GetResult(Edge_Threshold, 0.98) }
        let path = GraphJson.export out options g
        printfn "graph JSON (%s): %s" GraphJson.SchemaVersion path
        match args.TryGetResult Model, args.TryGetResult Coders with
        | Some m, Some cs ->
            let model, tokenizer, _ = Transcoders.Models.PromptTokens.load m "" TorchSharp.torch.CPU
            use _m = model
            let coders = Transcoders.Coders.CoderFolders.load cs TorchSharp.torch.CPU
            let stories = Interpretability.shippedStories tokenizer 400
            let dashboards = [ for c in coders -> FeatureDashboard.compute model tokenizer (Interpretability.coderName c) c stories DashboardOptions.Default ]
            printfn "feature files: %s" (GraphJson.exportFeatures out scan text dashboards)
            for c in coders do (c :> System.IDisposable).Dispose()
        | _ -> ()
        0
    | None, Some coderPath ->
        use c = CoderFile.load coderPath TorchSharp.torch.CPU
        let folder = SaeLens.export out c
        printfn "SAELens layout: %s (cfg.json, sae_weights.safetensors)" folder
        0
    | _ -> failwith "give one of --graph or --coder"

let import (args: ParseResults<ImportArgs>) =
    let out = args.GetResult ImportArgs.Out
    match args.TryGetResult Graph_Json, args.TryGetResult Saelens with
    | Some json, None ->
        let doc = GraphJson.load json
        let g = GraphJson.toGraph doc
        GraphFile.saveWith out { Scores = None; Description = Map.ofList [ "prompt", doc.Prompt; "scan", doc.Scan; "slug", doc.Slug ] } g
        printfn "graph: %d features, %d logits, %d links; saved to %s" g.Features.Length g.Logits.Length doc.Links.Length out
        0
    | None, Some folder ->
        use c = SaeLens.import folder TorchSharp.torch.CPU
        CoderFile.save out c
        printfn "%s; saved to %s" (Splicing.describe c) out
        0
    | _ -> failwith "give one of --graph-json or --saelens"
