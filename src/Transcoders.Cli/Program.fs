module Transcoders.Cli.Program

open System
open Argu

type Command =
    | [<CliPrefix(CliPrefix.None)>] Quickstart of ParseResults<QuickstartCommand.Args>
    | [<CliPrefix(CliPrefix.None)>] Corpus of ParseResults<CorpusCommand.Args>
    | [<CliPrefix(CliPrefix.None)>] Inspect of ParseResults<InspectCommand.Args>
    | [<CliPrefix(CliPrefix.None)>] Generate of ParseResults<GenerateCommand.Args>
    | [<CliPrefix(CliPrefix.None)>] Train_Lm of ParseResults<TrainLmCommand.Args>
    | [<CliPrefix(CliPrefix.None)>] Train_Coder of ParseResults<TrainCoderCommand.Args>
    | [<CliPrefix(CliPrefix.None)>] Eval_Coder of ParseResults<EvalCoderCommand.Args>
    | [<CliPrefix(CliPrefix.None)>] Sweep of ParseResults<SweepCommand.Args>
    | [<CliPrefix(CliPrefix.None)>] Trace of ParseResults<TraceCommand.Args>
    | [<CliPrefix(CliPrefix.None)>] Intervene of ParseResults<InterveneCommand.Args>
    | [<CliPrefix(CliPrefix.None)>] Dashboard of ParseResults<DashboardCommand.Args>
    | [<CliPrefix(CliPrefix.None)>] Plot of ParseResults<PlotCommand.Args>
    | [<CliPrefix(CliPrefix.None)>] Graph_Page of ParseResults<GraphPageCommand.Args>
    | [<CliPrefix(CliPrefix.None)>] Export of ParseResults<ExportCommand.ExportArgs>
    | [<CliPrefix(CliPrefix.None)>] Import of ParseResults<ExportCommand.ImportArgs>
    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Quickstart _ -> "the main job on the shipped data: corpus, train a small GPT, generate, train its transcoders, trace a prediction"
            | Corpus _ -> "tokenize TinyStories into token shards and print corpus statistics"
            | Inspect _ -> "print a checkpoint's configuration and parameter count"
            | Generate _ -> "generate text with a checkpoint"
            | Train_Lm _ -> "train a GPT on TinyStories (checkpoints, exact resume, metrics.jsonl)"
            | Train_Coder _ -> "train transcoders / SAEs on a model's activations, save and evaluate them"
            | Eval_Coder _ -> "evaluate saved coders on a model (L0, FVU, spliced CE, KL)"
            | Sweep _ -> "sweep coder kind, layer, width and sparsity; write the L0-vs-CE comparison"
            | Trace _ -> "attribution graph of a prediction (pruned, scored, saved) and the paper's computational paths"
            | Intervene _ -> "set, scale or ablate features: next-token changes (free and constrained), graph prediction, generation"
            | Dashboard _ -> "feature pages (top examples, quantiles, histogram, logit effects, de-embeddings, your texts) and an index"
            | Plot _ -> "a page of charts: training curves, L0 frontiers, prompt heatmaps, correlations, PCA/t-SNE, importance"
            | Graph_Page _ -> "the interactive page of a saved attribution graph"
            | Export _ -> "graph → circuit-tracer / Neuronpedia graph JSON (+ feature files); coder → SAELens layout"
            | Import _ -> "circuit-tracer graph JSON → graph file; SAELens folder → coder"

[<EntryPoint>]
let main argv =
    let parser = ArgumentParser.Create<Command>(programName = "transcoders", errorHandler = ProcessExiter())
    let args = parser.ParseCommandLine argv
    Transcoders.Tensors.Device.init ()
    try
        match args.GetSubCommand() with
        | Quickstart a -> QuickstartCommand.run a
        | Corpus a -> CorpusCommand.run a
        | Inspect a -> InspectCommand.run a
        | Generate a -> GenerateCommand.run a
        | Train_Lm a -> TrainLmCommand.run a
        | Train_Coder a -> TrainCoderCommand.run a
        | Eval_Coder a -> EvalCoderCommand.run a
        | Sweep a -> SweepCommand.run a
        | Trace a -> TraceCommand.run a
        | Intervene a -> InterveneCommand.run a
        | Dashboard a -> DashboardCommand.run a
        | Plot a -> PlotCommand.run a
        | Graph_Page a -> GraphPageCommand.run a
        | Export a -> ExportCommand.export a
        | Import a -> ExportCommand.import a
    with e when not (isNull e.Message) && Environment.GetEnvironmentVariable "TRANSCODERS_DEBUG" <> "1" ->
        // Errors from the library name the file, field or shape at fault; a stack trace adds nothing for a user.
        eprintfn "error: %s" e.Message
        1
