namespace Transcoders.Views

open System
open System.IO
open Transcoders.Circuits
open Transcoders.Coders
open Transcoders.Models
open Transcoders.Text

/// What `Interpretability.writeAll` makes. Start from `ReportOptions.Create`.
type ReportOptions =
    { /// Folder the pages go to.
      Out: string
      /// The prompt whose attribution graph and prompt plots are drawn.
      Prompt: string
      /// Stories of the shipped TinyStories validation text read for the feature pages.
      Stories: int
      Dashboard: DashboardOptions
      Graph: GraphConfig
      /// Training logs to plot: (title, path of a `metrics.jsonl` or a coder's `log.jsonl`).
      TrainingLogs: (string * string) list
      /// A sweep's `frontier.csv` to plot, if any.
      FrontierCsv: string option
      /// The model's id in exports (`metadata.scan`).
      Scan: string
      Device: TorchSharp.torch.Device }

    static member Create(out: string, prompt: string) =
        { Out = out; Prompt = prompt; Stories = 400
          Dashboard = { DashboardOptions.Default with Texts = [ prompt ] }
          Graph = { GraphConfig.Default with MaxFeatureNodes = Some 2000 }
          TrainingLogs = []; FrontierCsv = None; Scan = "transcoders-model"; Device = TorchSharp.torch.CPU }

/// The pages written by `writeAll`.
type ReportResult =
    { /// The feature pages' index and one page per coder.
      Index: string
      FeaturePages: string list
      /// The attribution graph page (None without transcoders).
      GraphPage: string option
      /// The plots page.
      Plots: string
      /// circuit-tracer's graph JSON folder (graph, graph-metadata.json, features/).
      GraphJson: string option
      /// What the feature pages show, per coder (for printing a feature's examples without another pass).
      Dashboards: CoderDashboard list
      Seconds: float }

    member r.All = [ r.Index ] @ r.FeaturePages @ Option.toList r.GraphPage @ [ r.Plots ] @ Option.toList r.GraphJson

/// Every page kind for a model and its coders in one call: feature pages and their index, the attribution graph page
/// of a prompt, a plots page (training curves, frontier, prompt heatmaps and lines, correlations, decoder geometry,
/// feature importance), and circuit-tracer's graph JSON with feature files.
[<RequireQualifiedAccess>]
module Interpretability =

    /// The first `count` stories of the shipped TinyStories V2 validation text (the files delimited by
    /// `<|endoftext|>`), tokenized (BOS first).
    let shippedStories (tokenizer: Tokenizer) (count: int) : int[] list =
        let dir = Transcoders.Files.Paths.data "tinystories"
        Corpus.readAllStories [ Path.Combine(dir, "ts_v2_valid_head_part1.txt.gz"); Path.Combine(dir, "ts_v2_valid_head_part2.txt.gz") ]
        |> Seq.truncate count
        |> Seq.map (fun s -> Tokenizer.encodeDocument tokenizer true false s.Text)
        |> List.ofSeq

    /// A coder's display name on pages: the name of its folder (`transcoder-L1`, `sae-L1`, `skip-transcoder-L1`,
    /// `clt-L0-1-2-3`; `CoderJob.name`), so a page names the coder the way the files on disk do.
    let coderName (c: Coder) = CoderJob.name c.Config

    /// Writes every page kind into `options.Out` (see the module doc); `log` receives progress lines.
    let writeAll (model: Transformer) (tokenizer: Tokenizer) (coders: Coder list) (options: ReportOptions) (log: string -> unit) : ReportResult =
        let sw = Diagnostics.Stopwatch.StartNew()
        Directory.CreateDirectory options.Out |> ignore
        let stories = shippedStories tokenizer options.Stories
        let text (t: int) = Tokenizer.tokenText tokenizer t
        // 1. feature pages
        let dashboards =
            [ for c in coders ->
                  let d = FeatureDashboard.compute model tokenizer (coderName c) c stories options.Dashboard
                  log (sprintf "features of %s: %d sequences, %d tokens in %.1f s" d.Name d.Sequences d.Tokens d.Seconds)
                  d ]
        let written = FeatureDashboard.write options.Out text options.Dashboard dashboards
        let featurePages, index = List.take (written.Length - 1) written, List.last written
        let pageOf =
            Map.ofList [ for d in dashboards do for l in d.Layers -> l.Layer, FeatureDashboard.fileName d.Name ]
        // 2. the attribution graph of the prompt (transcoders only)
        let transcoders = coders |> List.filter (fun c -> c.Config.Kind = Transcoder || c.Config.Kind = CrossLayerTranscoder)
        let tokens = Tokenizer.encodeDocument tokenizer true false options.Prompt
        let graph =
            if transcoders.IsEmpty || tokens.Length = 0 then None
            else
                let g = AttributionGraph.build model transcoders tokens options.Graph
                Some { g with TokenStrings = tokens |> Array.map text }
        let graphPage, graphJson =
            match graph with
            | None -> None, None
            | Some g ->
                let scores = Pruning.scores g options.Device
                let po = { GraphPageOptions.Create("Attribution graph", options.Prompt, text) with FeaturePages = pageOf; Scores = Some scores; Device = options.Device }
                let page = GraphPage.write (Path.Combine(options.Out, "graph.html")) po g
                log (sprintf "graph: %d nodes, %d features; replacement %.3f, completeness %.3f" g.NodeCount g.Features.Length scores.Replacement scores.Completeness)
                let folder = Path.Combine(options.Out, "circuit-tracer")
                let eo = { GraphExportOptions.Create("prompt-graph", options.Scan, options.Prompt, text) with
                             TranscoderList = transcoders |> List.map coderName; Device = options.Device }
                GraphJson.export folder eo g |> ignore
                GraphJson.exportFeatures folder options.Scan text dashboards |> ignore
                Some page, Some folder
        // 3. plots
        let charts =
            [ for title, path in options.TrainingLogs do
                  if File.Exists path then yield! Plots.trainingCurves title (Plots.readLog path)
              match options.FrontierCsv with
              | Some p when File.Exists p -> yield! Plots.frontier (Plots.readFrontierCsv p)
              | _ -> ()
              if tokens.Length > 0 then
                  let acts = Plots.promptActivations model tokenizer coders options.Prompt 12
                  for a in acts do yield Plots.heatmap a
                  for a in acts do yield Plots.layerLines a
                  yield Plots.correlation (acts |> List.map (fun a -> { a with Features = Array.truncate 6 a.Features; Acts = Array.truncate 6 a.Acts }))
              yield! Plots.decoderGeometry coders 600 1
              match graph with
              | Some g -> yield Plots.importance g options.Device 30
              | None -> () ]
        let plots = Plots.write (Path.Combine(options.Out, "plots.html")) "Plots" charts
        { Index = index; FeaturePages = featurePages; GraphPage = graphPage; Plots = plots; GraphJson = graphJson
          Dashboards = dashboards; Seconds = sw.Elapsed.TotalSeconds }
