/// `plot`: a page of charts (XPlot.Plotly, plotly.js inlined): training curves from metric logs, the L0 frontiers of a
/// sweep, and for a prompt the feature × token heatmaps, per-layer activation lines, cross-layer correlations, PCA and
/// t-SNE of decoder directions, and feature importance from the prompt's attribution graph.
module Transcoders.Cli.PlotCommand

open System.IO
open Argu
open Transcoders.Circuits
open Transcoders.Tensors
open Transcoders.Views

type Args =
    | Log of path: string
    | Frontier of csv: string
    | Model of path: string
    | Coders of folders: string list
    | Prompt of text: string
    | Top of int
    | Out of file: string
    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Log _ -> "a training log to plot (metrics.jsonl of train-lm, log.jsonl of a coder); repeat for several"
            | Frontier _ -> "a sweep's frontier.csv: L0 vs spliced CE and L0 vs FVU"
            | Model _ -> "with --coders and --prompt: the model for the prompt plots"
            | Coders _ -> "coder folders, or folders holding them"
            | Prompt _ -> "the prompt of the heatmaps, activation lines, correlations and feature importance"
            | Top _ -> "strongest features per layer shown (default 12)"
            | Out _ -> "the page (default runs/pages/plots.html)"

let run (common: Common.Options) (args: ParseResults<Args>) =
    let device = Common.device common
    let out = args.GetResult(Out, Path.Combine("runs", "pages", "plots.html"))
    let charts =
        [ for log in args.GetResults Log do
              let title = Path.GetFileName(Path.GetDirectoryName(Path.GetFullPath log)) + "/" + Path.GetFileName log
              yield! Plots.trainingCurves title (Plots.readLog log)
          match args.TryGetResult Frontier with
          | Some csv -> yield! Plots.frontier (Plots.readFrontierCsv csv)
          | None -> ()
          match args.TryGetResult Model, args.TryGetResult Coders, args.TryGetResult Prompt with
          | Some m, Some cs, Some prompt ->
              let model, tokenizer, tokens = Transcoders.Models.PromptTokens.loadWith (Common.loadOptions common) m prompt device
              use _m = model
              let coders = Transcoders.Coders.CoderFolders.load cs device
              try
                  let acts = Plots.promptActivations model tokenizer coders prompt (args.GetResult(Top, 12))
                  for a in acts do yield Plots.heatmap a
                  for a in acts do yield Plots.layerLines a
                  yield Plots.correlation (acts |> List.map (fun a -> { a with Features = Array.truncate 6 a.Features; Acts = Array.truncate 6 a.Acts }))
                  yield! Plots.decoderGeometry coders 600 1
                  let transcoders = coders |> List.filter (fun c -> c.Config.Kind = Transcoders.Coders.Transcoder || c.Config.Kind = Transcoders.Coders.CrossLayerTranscoder)
                  if not transcoders.IsEmpty then
                      let g = AttributionGraph.build model transcoders tokens { GraphConfig.Default with MaxFeatureNodes = Some 2000 }
                      yield Plots.importance g device 30
              finally
                  for c in coders do (c :> System.IDisposable).Dispose()
          | None, None, None -> ()
          | _ -> failwith "--model, --coders and --prompt go together" ]
    if charts.IsEmpty then failwith "nothing to plot: give --log, --frontier, or --model with --coders and --prompt"
    let path = Plots.write out "Plots" charts
    printfn "%d charts; page written: %s" charts.Length path
    0
