/// `export` and `import`: the Python ecosystem's formats. Graphs to and from circuit-tracer's / Neuronpedia's graph
/// JSON (with graph-metadata.json and, given coders, feature files); coders to and from SAELens' layout and
/// circuit-tracer's transcoder files (per-layer sets and cross-layer transcoders).
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
    | Format of format: string
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
            | Coder _ -> "a coder folder to write in another tool's layout (--format); repeat it for a circuit-tracer transcoder set"
            | Format _ -> "coder layout: saelens (cfg.json + sae_weights.safetensors, the default) or circuit-tracer (config.yaml + layer_{l}.safetensors, or W_enc_{i}/W_dec_{i}.safetensors for a CLT)"
            | Model _ -> "the graph's model (token texts; with --coders, feature files for circuit-tracer's frontend)"
            | Coders _ -> "the graph's coders: also write features/{scan}/{feature}.json from the shipped TinyStories text"
            | Slug _ -> "the graph's name in the frontend (default: the graph file's name)"
            | Scan _ -> "metadata.scan, the model id (default: the model file's name); circuit-tracer's scan_name for coders"
            | Legacy_Error_Ids -> "error ids 0_{layer}_{pos} (circuit-tracer before its fix of issue #78; refused on collision)"
            | Node_Threshold _ -> "pruning node threshold (default 0.8)"
            | Edge_Threshold _ -> "pruning edge threshold (default 0.98)"
            | Out _ -> "output folder"

type ImportArgs =
    | Graph_Json of file: string
    | Saelens of folder: string
    | Circuit_Tracer of folder: string
    | [<Mandatory>] Out of path: string
    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Graph_Json _ -> "a circuit-tracer / Neuronpedia graph JSON file, saved as our graph file"
            | Saelens _ -> "a SAELens folder (cfg.json + sae_weights.safetensors), saved as our coder folder"
            | Circuit_Tracer _ -> "a circuit-tracer transcoder folder (config.yaml + safetensors), saved as our coder folder (a set: one folder per layer, layer_{l})"
            | Out _ -> "graph file (.safetensors) or coder folder to write"

let export (common: Common.Options) (args: ParseResults<ExportArgs>) =
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
            let model, tokenizer, _ = Transcoders.Models.PromptTokens.loadWith (Common.loadOptions common) m "" TorchSharp.torch.CPU
            use _m = model
            let coders = Transcoders.Coders.CoderFolders.load cs TorchSharp.torch.CPU
            let stories = Interpretability.shippedStories tokenizer 400
            let dashboards = [ for c in coders -> FeatureDashboard.compute model tokenizer (Interpretability.coderName c) c stories DashboardOptions.Default ]
            printfn "feature files: %s" (GraphJson.exportFeatures out scan text dashboards)
            for c in coders do (c :> System.IDisposable).Dispose()
        | _ -> ()
        0
    | None, Some coderPath ->
        match args.GetResult(Format, "saelens").ToLowerInvariant() with
        | "saelens" ->
            use c = CoderFile.load coderPath TorchSharp.torch.CPU
            let folder = SaeLens.export out c
            printfn "SAELens layout: %s (cfg.json, sae_weights.safetensors)" folder
            0
        | "circuit-tracer" ->
            let coders = [ for p in args.GetResults Coder -> CoderFile.load p TorchSharp.torch.CPU ]
            try
                let scan = args.GetResult(Scan, Path.GetFileName(Path.GetFullPath(coderPath).TrimEnd('/')))
                let folder = CircuitTracer.export out scan coders
                let files = Directory.GetFiles folder |> Array.map Path.GetFileName |> Array.sort
                printfn "circuit-tracer layout: %s (%s)" folder (System.String.Join(", ", files))
                0
            finally
                for c in coders do (c :> System.IDisposable).Dispose()
        | f -> failwithf "--format %s: give saelens or circuit-tracer" f
    | _ -> failwith "give one of --graph or --coder"

let import (args: ParseResults<ImportArgs>) =
    let out = args.GetResult ImportArgs.Out
    match args.TryGetResult Graph_Json, args.TryGetResult Saelens, args.TryGetResult Circuit_Tracer with
    | Some json, None, None ->
        let doc = GraphJson.load json
        let g = GraphJson.toGraph doc
        GraphFile.saveWith out { Scores = None; Description = Map.ofList [ "prompt", doc.Prompt; "scan", doc.Scan; "slug", doc.Slug ] } g
        printfn "graph: %d features, %d logits, %d links; saved to %s" g.Features.Length g.Logits.Length doc.Links.Length out
        0
    | None, Some folder, None ->
        use c = SaeLens.import folder TorchSharp.torch.CPU
        CoderFile.save out c
        printfn "%s; saved to %s" (Splicing.describe c) out
        0
    | None, None, Some folder ->
        let coders = CircuitTracer.import folder TorchSharp.torch.CPU
        try
            match coders with
            | [ c ] ->
                CoderFile.save out c
                printfn "%s; saved to %s" (Splicing.describe c) out
            | cs ->
                for c in cs do
                    let dest = Path.Combine(out, sprintf "layer_%d" (c.Config.Layers[0]))
                    CoderFile.save dest c
                    printfn "%s; saved to %s" (Splicing.describe c) dest
            0
        finally
            for c in coders do (c :> System.IDisposable).Dispose()
    | _ -> failwith "give one of --graph-json, --saelens or --circuit-tracer"
