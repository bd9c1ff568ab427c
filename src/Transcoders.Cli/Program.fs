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
    | [<CliPrefix(CliPrefix.None)>] Sweep_Cache of ParseResults<SlurmCommand.TaskArgs>
    | [<CliPrefix(CliPrefix.None)>] Sweep_Task of ParseResults<SlurmCommand.TaskArgs>
    | [<CliPrefix(CliPrefix.None)>] Sweep_Gather of ParseResults<SlurmCommand.TaskArgs>
    | [<CliPrefix(CliPrefix.None)>] Trace of ParseResults<TraceCommand.Args>
    | [<CliPrefix(CliPrefix.None)>] Intervene of ParseResults<InterveneCommand.Args>
    | [<CliPrefix(CliPrefix.None)>] Dashboard of ParseResults<DashboardCommand.Args>
    | [<CliPrefix(CliPrefix.None)>] Plot of ParseResults<PlotCommand.Args>
    | [<CliPrefix(CliPrefix.None)>] Graph_Page of ParseResults<GraphPageCommand.Args>
    | [<CliPrefix(CliPrefix.None)>] Export of ParseResults<ExportCommand.ExportArgs>
    | [<CliPrefix(CliPrefix.None)>] Import of ParseResults<ExportCommand.ImportArgs>
    // The options every command shares (see Common.fs): declared once here, accepted after any command.
    | [<Inherit>] Device of string
    | [<Inherit>] Threads of int
    | [<Inherit>] Tl_Processing
    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Quickstart _ -> "the main job: stories, features and a traced circuit of the shipped model and its coders, with their pages (--train: all from scratch)"
            | Corpus _ -> "tokenize TinyStories into token shards and print corpus statistics"
            | Inspect _ -> "print a checkpoint's configuration and parameter count"
            | Generate _ -> "generate text with a checkpoint"
            | Train_Lm _ -> "train a GPT on TinyStories (checkpoints, exact resume, metrics.jsonl)"
            | Train_Coder _ -> "train transcoders / SAEs / cross-layer transcoders on a model's activations, save and evaluate them"
            | Eval_Coder _ -> "evaluate saved coders on a model (L0, FVU, spliced CE, KL)"
            | Sweep _ -> "sweep coder kind, layer, width and sparsity; write the L0-vs-CE comparison"
            | Sweep_Cache _ -> "Slurm sweep, stage 1: write the shared activation cache of a job table"
            | Sweep_Task _ -> "Slurm sweep, stage 2: train one row of a job table (an array task; resumes, skips finished)"
            | Sweep_Gather _ -> "Slurm sweep, stage 3: the sweep table, frontier and plot page from the finished runs"
            | Trace _ -> "attribution graph of a prediction (pruned, scored, saved) and the paper's computational paths"
            | Intervene _ -> "set, scale or ablate features: next-token changes (free and constrained), graph prediction, generation"
            | Dashboard _ -> "feature pages (top examples, quantiles, histogram, logit effects, de-embeddings, your texts) and an index"
            | Plot _ -> "a page of charts: training curves, L0 frontiers, prompt heatmaps, correlations, PCA/t-SNE, importance"
            | Graph_Page _ -> "the interactive page of a saved attribution graph"
            | Export _ -> "graph → circuit-tracer / Neuronpedia graph JSON (+ feature files); coders → SAELens or circuit-tracer layout"
            | Import _ -> "circuit-tracer graph JSON → graph file; SAELens or circuit-tracer folder → coders"
            | Device _ -> Common.deviceUsage
            | Threads _ -> Common.threadsUsage
            | Tl_Processing -> Common.tlProcessingUsage

/// The exit code of a command line that Argu refuses (the code Argu's ProcessExiter exits with).
let private exitCodeOf (e: ArguParseException) = int e.ErrorCode

/// The commands' names as typed (`train-coder`).
let private commandNames =
    Reflection.FSharpType.GetUnionCases typeof<Command>
    |> Array.filter (fun c -> c.GetFields() |> Array.exists (fun f -> f.PropertyType.IsGenericType && f.PropertyType.GetGenericTypeDefinition() = typedefof<ParseResults<_>>))
    |> Array.map (fun c -> c.Name.ToLowerInvariant().Replace('_', '-'))

/// Runs the command line `argv` and returns the exit code: 0 on success; `--help` prints the usage and returns 0; a
/// bad argument prints one line, `error: <what is wrong> (see 'transcoders <command> --help')`, and returns Argu's
/// code for it; a failure of the command prints `error: <message>` and returns 1 (with TRANSCODERS_DEBUG=1 the
/// exception propagates, stack trace and all).
let run (argv: string[]) : int =
    let parser = ArgumentParser.Create<Command>(programName = "transcoders")
    match (try Ok(parser.ParseCommandLine(argv, raiseOnUsage = true)) with :? ArguParseException as e -> Error e) with
    | Error e when e.ErrorCode = ErrorCode.HelpText ->
        printfn "%s" e.Message
        0
    | Error e ->
        // Argu's message is the error followed by the whole usage: keep the error, point to the usage.
        let first = e.Message.Split('\n') |> Array.map (fun l -> l.Trim()) |> Array.tryFind (fun l -> l <> "") |> Option.defaultValue "invalid arguments"
        let what = if first.StartsWith "ERROR: " then first.Substring 7 else first
        let command = argv |> Array.tryFind (fun a -> commandNames |> Array.contains a)
        let usage = match command with Some c -> sprintf "transcoders %s --help" c | None -> "transcoders --help"
        eprintfn "error: %s (see '%s')" (what.TrimEnd('.')) usage
        exitCodeOf e
    | Ok args ->
        let common =
            { Common.Options.Device = args.GetResult(Device, Common.Options.Default.Device)
              Common.Options.Threads = args.GetResult(Threads, Common.Options.Default.Threads)
              Common.Options.TlProcessing = args.Contains Tl_Processing }
        Transcoders.Tensors.Device.init ()
        try
            Transcoders.Tensors.Device.setThreads common.Threads
            match args.TryGetSubCommand() with
            | Some(Quickstart a) -> QuickstartCommand.run common a
            | Some(Corpus a) -> CorpusCommand.run common a
            | Some(Inspect a) -> InspectCommand.run common a
            | Some(Generate a) -> GenerateCommand.run common a
            | Some(Train_Lm a) -> TrainLmCommand.run common a
            | Some(Train_Coder a) -> TrainCoderCommand.run common a
            | Some(Eval_Coder a) -> EvalCoderCommand.run common a
            | Some(Sweep a) when a.Contains SweepCommand.Slurm -> SlurmCommand.prepare common a
            | Some(Sweep a) -> SweepCommand.run common a
            | Some(Sweep_Cache a) -> SlurmCommand.cache common a
            | Some(Sweep_Task a) -> SlurmCommand.task common a
            | Some(Sweep_Gather a) -> SlurmCommand.gather a
            | Some(Trace a) -> TraceCommand.run common a
            | Some(Intervene a) -> InterveneCommand.run common a
            | Some(Dashboard a) -> DashboardCommand.run common a
            | Some(Plot a) -> PlotCommand.run common a
            | Some(Graph_Page a) -> GraphPageCommand.run a
            | Some(Export a) -> ExportCommand.export common a
            | Some(Import a) -> ExportCommand.import a
            | Some(Device _ | Threads _ | Tl_Processing) | None ->
                eprintfn "error: no command given (see 'transcoders --help')"
                1
        with e when not (isNull e.Message) && Environment.GetEnvironmentVariable "TRANSCODERS_DEBUG" <> "1" ->
            // Errors from the library name the file, field or shape at fault; a stack trace adds nothing for a user.
            eprintfn "error: %s" e.Message
            1

[<EntryPoint>]
let main argv = run argv
