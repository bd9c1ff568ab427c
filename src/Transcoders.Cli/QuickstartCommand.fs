/// `quickstart`: the main job. By default on the shipped model and coders (data/models/tinystories-gpt,
/// data/coders/tinystories-gpt): stories from the model, its coders' evaluation, features with their top examples and
/// logit effects, a traced prediction (attribution graph, pruned and scored; the transcoder paper's computational
/// paths), and the pages. With `--train`, the same from scratch: tokenizes TinyStories, trains a small GPT on the CPU,
/// trains a transcoder on each of its layers, traces, then generates with llama2.c's stories260K.
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
    | Train
    | Stories of int
    | Steps of int
    | Coder_Steps of int
    | Max_Minutes of float
    | Out of folder: string
    | Seed of int64
    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Train -> "train a small GPT and its transcoders from scratch instead of using the shipped ones"
            | Stories _ -> "held-out stories read for the feature pages and top examples (default 200)"
            | Steps _ -> "with --train: training steps of 16 × 128 tokens (default 600: about two minutes on 2 idle cores)"
            | Coder_Steps _ -> "with --train: transcoder training steps of 1,024 tokens per layer (default 600; all layers from one stream)"
            | Max_Minutes _ -> "stop training (with a checkpoint) after this many minutes even if steps remain (default 10)"
            | Out _ -> "output folder (default runs/quickstart)"
            | Seed _ -> "seed (default 0)"

let private section (title: string) = printfn "\n== %s" title

let private fromScratch (common: Common.Options) (args: ParseResults<Args>) =
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

/// The shipped default model and coders (see data/SOURCES.md for how they were made).
let shippedModel () = Paths.data "models/tinystories-gpt"
let shippedCoders () = Paths.data "coders/tinystories-gpt"

/// Prints a feature's strongest examples (the token in brackets, with the activation) and its top logit effects.
let private printFeature (text: int -> string) (name: string) (layer: int) (s: Transcoders.Views.FeatureSummary)
                         (weights: Transcoders.Views.FeatureWeights option) =
    printfn "\n%s feature %d (layer %d): fires on %.2f%% of tokens, max %.2f" name s.Feature layer (100.0 * s.Frequency) s.Max
    for e in s.Top |> Array.truncate 4 do
        let words =
            e.Tokens |> Array.mapi (fun i t -> if i = e.Center then sprintf "[[%s]]" (text t) else text t) |> String.concat ""
        printfn "  %5.2f  %s" e.Activation (words.Replace("\n", " "))
    match weights with
    | Some w when w.TopLogits.Length > 0 ->
        printfn "  raises: %s" (String.Join(", ", w.TopLogits |> Array.truncate 6 |> Array.map (fun t -> sprintf "%A" (text t.Token))))
    | _ -> ()

/// A feature worth showing first: it fires on 0.05–5% of tokens, and its top examples share their token (a
/// "single-token" feature is the easiest to read) or at least reach a high activation.
let private showcase (layer: Transcoders.Views.DashboardLayer) (n: int) =
    let tokenAgreement (s: Transcoders.Views.FeatureSummary) =
        if s.Top.Length = 0 then 0.0
        else
            let centres = s.Top |> Array.map (fun e -> e.Tokens[e.Center])
            float (centres |> Array.countBy id |> Array.map snd |> Array.max) / float centres.Length
    layer.Summaries
    |> Array.filter (fun s -> s.Frequency > 0.0005 && s.Frequency < 0.05 && s.Top.Length >= 4)
    |> Array.sortByDescending (fun s -> tokenAgreement s, s.Max)
    |> Array.truncate n

let private shipped (common: Common.Options) (args: ParseResults<Args>) =
    let total = Stopwatch.StartNew()
    let device = Common.device common
    let seed = args.GetResult(Seed, 0L)
    let out = args.GetResult(Out, Path.Combine("runs", "quickstart"))
    let modelDir, codersDir = shippedModel (), shippedCoders ()
    if not (Directory.Exists modelDir) then
        failwithf "%s: the shipped model is missing (a partial clone?); `quickstart --train` trains one from scratch" modelDir

    section (sprintf "1. The shipped model (%s)" modelDir)
    let prompt = "Once upon a time, there was a little girl named Lily. She"
    let model, tokenizer, _ = PromptTokens.load modelDir prompt device
    use _model = model
    let c = model.Config
    printfn "GPT-2 architecture: %d layers, d_model %d, %d heads, context %d, vocabulary %d (%s parameters), trained by this library on TinyStories"
        c.NLayers c.DModel c.NHeads c.NCtx c.VocabSize (Output.count (Transformer.parameterCount model))
    let card = Path.Combine(modelDir, "README.md")
    if File.Exists card then
        for line in File.ReadLines card |> Seq.filter (fun l -> l.StartsWith "held-out loss" || l.StartsWith "made by") do printfn "%s" line

    section "2. Two stories from it (temperature 0.8, top-k 40)"
    let boundaries = [ Tokenizer.bos tokenizer; Tokenizer.eos tokenizer ] |> List.choose id |> Set.ofList
    for i in 0 .. 1 do
        let story =
            Generation.generate model
                { Generation.GenerateOptions.Greedy with
                    MaxNewTokens = c.NCtx - 1; Temperature = 0.8; TopK = Some 40; Seed = Some(seed + int64 i); StopTokens = boundaries }
                (Tokenizer.bos tokenizer |> Option.toArray)
        let text = Tokenizer.decode tokenizer (story.NewTokens |> Array.filter (fun t -> not (boundaries.Contains t)))
        printfn "%s\n" (text.Trim())

    section (sprintf "3. Its coders (%s), as evaluated when they were trained" codersDir)
    let metrics = Path.Combine(codersDir, "metrics.md")
    if File.Exists metrics then printfn "%s" (File.ReadAllText metrics) else printfn "(no metrics.md beside the coders)"
    let coders = CoderFolders.load [ codersDir ] device
    try
        let transcoders = coders |> List.filter (fun c -> c.Config.Kind = Transcoder) |> List.sortBy (fun c -> c.Config.Layers[0])
        let text (t: int) = Tokenizer.tokenText tokenizer t
        let stories = args.GetResult(Stories, 200)

        section (sprintf "4. Pages and features: every transcoder over %d held-out stories" stories)
        let logs = [ for p in [ Path.Combine(modelDir, "metrics.jsonl") ] do if File.Exists p then yield "GPT training", p ]
        let report =
            Transcoders.Views.Interpretability.writeAll model tokenizer transcoders
                { Transcoders.Views.ReportOptions.Create(Path.Combine(out, "pages"), prompt) with
                    Stories = stories; Device = device; Scan = "tinystories-gpt"; TrainingLogs = logs } (printfn "%s")
        let middle = c.NLayers / 2
        for d in report.Dashboards do
            for layer in d.Layers do
                if layer.Layer = middle then
                    for s in showcase layer 3 do
                        printFeature text d.Name layer.Layer s (layer.Weights |> Option.map (fun w -> w[s.Feature]))

        section "5. Tracing a prediction: attribution graph and computational paths through the transcoders"
        let tokens = PromptTokens.encode tokenizer prompt
        TraceCommand.trace modelDir model tokenizer transcoders tokens None None Transcoders.Circuits.GraphConfig.Default
            { Transcoders.Circuits.PruneConfig.Default with Device = device } Transcoders.Circuits.PathSearchOptions.Default 5
            (Path.Combine(out, "graph.safetensors")) |> ignore

        printfn "\nquickstart finished in %s; pages written (open them in a browser, they work offline):" (Output.seconds total.Elapsed)
        for p in report.All do printfn "  %s" (Path.GetFullPath p)
        0
    finally
        for c in coders do (c :> IDisposable).Dispose()

let run (common: Common.Options) (args: ParseResults<Args>) =
    if args.Contains Train then fromScratch common args else shipped common args
