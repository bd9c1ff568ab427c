/// `quickstart`: the main job on the shipped data. Tokenizes TinyStories, trains a small GPT on the CPU for a
/// few minutes, prints its validation loss and a generated story, trains a transcoder on each of its layers and
/// prints their L0, FVU and CE loss recovered, traces a prediction through them (attribution graph, pruned and
/// scored, written to the output folder; the transcoder paper's computational paths), then generates with llama2.c's
/// stories260K.
module Transcoders.Cli.QuickstartCommand

open System
open System.Diagnostics
open System.IO
open System.Threading
open Argu
open Transcoders.Coders
open Transcoders.Files
open Transcoders.Models
open Transcoders.Tensors
open Transcoders.Text

type Args =
    | Steps of int
    | Coder_Steps of int
    | Max_Minutes of float
    | Out of folder: string
    | Seed of int64
    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Steps _ -> "training steps of 16 × 128 tokens (default 600: about two minutes on 2 idle cores)"
            | Coder_Steps _ -> "transcoder training steps of 1,024 tokens per layer (default 600; all layers from one stream)"
            | Max_Minutes _ -> "stop training (with a checkpoint) after this many minutes even if steps remain (default 10)"
            | Out _ -> "output folder (default runs/quickstart)"
            | Seed _ -> "seed (default 0)"

let private section (title: string) = printfn "\n== %s" title

let run (common: Common.Options) (args: ParseResults<Args>) =
    let total = Stopwatch.StartNew()
    let device = Common.device common
    let seed = args.GetResult(Seed, 0L)
    let budget = TimeSpan.FromMinutes(args.GetResult(Max_Minutes, 10.0))
    let out = args.GetResult(Out, Path.Combine("runs", "quickstart"))
    if Directory.Exists(Path.Combine(out, "checkpoints")) then Directory.Delete(Path.Combine(out, "checkpoints"), true)

    section "1. Corpus: the shipped TinyStories, a compact 4,096-token vocabulary"
    let sw = Stopwatch.StartNew()
    // A fixed number of steps, so the run (losses, model, story) is the same on every CPU; the time cap only
    // protects a slow machine.
    let steps = args.GetResult(Steps, 600)
    let settings =
        { TinyStoriesGpt.Settings.Default with
            Out = out; Seed = seed; Steps = steps; Warmup = min 100 (steps / 10); EvalEvery = max 1 (steps / 2); CheckpointEvery = 0 }
    let files = TinyStoriesGpt.files settings
    let prepared = TinyStoriesGpt.prepare settings
    CorpusCommand.printSummary files prepared sw.Elapsed

    section (sprintf "2. Training a GPT on the %O" device)
    let model, config = TinyStoriesGpt.create settings prepared device
    use _model = model
    let modelConfig = model.Config
    printfn "model: %d layers, d_model %d, %d heads, context %d, vocabulary %d (%s parameters); %d steps of %d × %d tokens"
        modelConfig.NLayers modelConfig.DModel modelConfig.NHeads modelConfig.NCtx modelConfig.VocabSize
        (Output.count (Transformer.parameterCount model)) steps config.BatchSize config.Ctx
    use cancel = new CancellationTokenSource(budget)
    let result = TinyStoriesGpt.trainCancellable cancel.Token model prepared config
    TrainLmCommand.printResult result
    let modelDir =
        match result.Run.Outcome, result.ModelDir with
        | Transcoders.Training.Trainer.Diverged (_, message), _ ->
            eprintfn "%s" message
            exit 2
        | _, Some dir -> dir
        | _, None -> failwith "no model was saved"
    match result.ValidationLoss with
    | Some v -> printfn "validation loss: %.4f nats/token (perplexity %.1f) on the TinyStories V1 validation head" v (exp v)
    | None -> ()
    printfn "model saved to %s" modelDir

    section "3. A story from the trained model (temperature 0.8, top-k 40)"
    // stories are separated by [BEGIN] in the shards, so a story ends where the model starts the next one
    let boundaries = [ Tokenizer.bos prepared.Tokenizer; Tokenizer.eos prepared.Tokenizer ] |> List.choose id |> Set.ofList
    let story =
        Generation.generate model
            { Generation.GenerateOptions.Greedy with
                MaxNewTokens = modelConfig.NCtx - 1; Temperature = 0.8; TopK = Some 40; Seed = Some seed; StopTokens = boundaries }
            (Tokenizer.bos prepared.Tokenizer |> Option.toArray)
    printfn "%s" (Tokenizer.decode prepared.Tokenizer (story.NewTokens |> Array.filter (fun t -> not (boundaries.Contains t))))

    section "4. Transcoders on every layer of the trained GPT (TopK, k = 16, 1,024 features; one activation stream)"
    let codersDir = Path.Combine(out, "coders")
    TrainCoderCommand.train modelDir
        { CoderRunSettings.Default with
            Plan = { CoderPlan.Default with Steps = args.GetResult(Coder_Steps, 600); Width = Some 1024; Activation = Some(TopK 16) }
            Out = Some codersDir; Resume = false; CheckpointEvery = 0; EvalRows = 8192L; SplicedRows = 64 }
        id None device |> ignore

    section "5. Tracing a prediction: attribution graph and computational paths through the transcoders"
    let prompt = "Once upon a time, there was a little girl named Lily. She"
    let traced, tokenizer, tokens = PromptTokens.load modelDir prompt device
    use _traced = traced
    let coders = CoderFolders.load [ codersDir ] device
    try
        TraceCommand.trace modelDir traced tokenizer coders tokens None None Transcoders.Circuits.GraphConfig.Default
            { Transcoders.Circuits.PruneConfig.Default with Device = device } Transcoders.Circuits.PathSearchOptions.Default 5
            (Path.Combine(out, "graph.safetensors")) |> ignore
    finally
        for c in coders do (c :> IDisposable).Dispose()

    section "6. llama2.c's pretrained stories260K (greedy, with a KV cache)"
    let path = Paths.data "models/stories260K/stories260K.bin"
    let tok = ModelTokenizer.find path
    let small, _ = ModelFiles.load path device
    use _small = small
    let g = Generation.generate small { Generation.GenerateOptions.Greedy with MaxNewTokens = 100 } [| Llama2cTokenizer.Bos |]
    printfn "%s" (Tokenizer.decode tok g.Tokens)

    section "7. Pages: features, the attribution graph, plots, circuit-tracer's graph JSON (self-contained, offline)"
    let pagesModel, pagesTokenizer, _ = PromptTokens.load modelDir prompt device
    use _pagesModel = pagesModel
    let pageCoders = CoderFolders.load [ codersDir ] device
    let logs = [ yield! Directory.GetFiles(out, "metrics.jsonl", SearchOption.AllDirectories) |> Array.truncate 1 |> Array.map (fun p -> "GPT training", p)
                 yield! Directory.GetFiles(codersDir, "log.jsonl", SearchOption.AllDirectories) |> Array.sort |> Array.truncate 1 |> Array.map (fun p -> "transcoder training", p) ]
    let report =
        try Transcoders.Views.Interpretability.writeAll pagesModel pagesTokenizer pageCoders
                { Transcoders.Views.ReportOptions.Create(Path.Combine(out, "pages"), prompt) with
                    Stories = 200; Device = device; Scan = "quickstart-gpt"; TrainingLogs = List.ofSeq logs } (printfn "%s")
        finally for c in pageCoders do (c :> IDisposable).Dispose()
    printfn "\nquickstart finished in %s; pages written (open them in a browser, they work offline):" (Output.seconds total.Elapsed)
    for p in report.All do printfn "  %s" (Path.GetFullPath p)
    0
