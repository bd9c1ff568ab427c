#load "load.fsx"
// Trains a transcoder for every MLP of a model, plus an SAE on each MLP output for comparison, all from one stream
// of activations; saves them, evaluates them (held-out L0 / FVU, spliced CE), and splices every transcoder at once.
//
//   dotnet build src/Transcoders -c Release
//   dotnet fsi scripts/train-transcoders.fsx [MODEL] [STEPS] [OUT] [EVAL_TOKENS] [BATCH]
//
// MODEL: a llama2.c .bin, a Hugging Face folder or one of our model folders (default: the shipped stories260K).
// EVAL_TOKENS: held-out tokens for L0 / FVU and for the spliced CE (default 16384); BATCH: tokens per training batch
// (default 1024). The tests pass small numbers.
// The text is TinyStories tokenized with the model's own tokenizer (cached after the first run).

open System
open System.Diagnostics
open System.IO
open TorchSharp
open Transcoders.Activations
open Transcoders.Coders
open Transcoders.Files
open Transcoders.Models

let args = fsi.CommandLineArgs |> Array.tail
let modelPath = if args.Length > 0 then args[0] else Paths.data "models/stories260K/stories260K.bin"
let steps = if args.Length > 1 then int args[1] else 600
let out = if args.Length > 2 then args[2] else Path.Combine("coders", "train-transcoders")
let evalTokens = if args.Length > 3 then int args[3] else 16384
let batch = if args.Length > 4 then int args[4] else 1024
let device = Transcoders.Tensors.Device.resolve Transcoders.Tensors.Device.Auto

// 1. The model and its text.
let model, _ = ModelFiles.load modelPath device
model.eval ()
let text = ModelText.forModel modelPath
let c = model.Config
let name = ModelName.ofPath modelPath
printfn "%s: %d layers, d_model %d; %d training tokens" name c.NLayers c.DModel text.Train.Length

// 2. The coders: a TopK transcoder per layer and a TopK SAE on each MLP output, 16 features per dimension.
let width = 16 * c.DModel
let k = max 1 (c.DModel / 4)
let job (coder: CoderConfig) (jobName: string) =
    { Name = jobName; Coder = coder; Train = CoderDefaults.forCoder coder 0.0 steps batch }
let jobs =
    [ for layer in 0 .. c.NLayers - 1 ->
        job { CoderConfig.transcoder name layer c.DModel width with Activation = TopK k } (sprintf "tc-L%d" layer)
      for layer in 0 .. c.NLayers - 1 ->
        job { CoderConfig.sae name (CoderConfig.mlpOutHook layer) layer c.DModel width with Activation = TopK k } (sprintf "sae-mlp_out-L%d" layer) ]

// 3. One stream: each model pass (stopped after the last layer) feeds every coder through a seeded shuffle buffer.
let config =
    { JobsConfig.Default out with
        Store =
            { StoreConfig.Default with
                Ctx = min 128 c.NCtx
                PassRows = 8
                Buffer = { ShuffleBufferConfig.Default with Rows = 64L * int64 batch; BatchSize = int64 batch; ServeDevice = device } }
        CheckpointEvery = 200
        Eval = { JobEval.Default with ActivationRows = int64 evalTokens; SplicedRows = max 1 (evalTokens / 128) } }

// 4. Train, save, evaluate.
let sw = Stopwatch.StartNew()
let mutable lastPrint = 0.0
let report =
    function
    | Trained(step, total, _, logs) when not logs.IsEmpty && (sw.Elapsed.TotalSeconds - lastPrint > 10.0 || step = total) ->
        lastPrint <- sw.Elapsed.TotalSeconds
        let fvu = logs |> List.averageBy (fun (_, l) -> l.Fvu)
        printfn "[%5.1fs] step %d/%d, mean FVU %.3f over %d coders" sw.Elapsed.TotalSeconds step total fvu logs.Length
    | Trained _ -> ()
    | Preparing what | Evaluating what -> printfn "[%5.1fs] %s" sw.Elapsed.TotalSeconds what
    | Checkpointed(step, _) -> printfn "[%5.1fs] checkpoint at step %d" sw.Elapsed.TotalSeconds step
let result = CoderJobs.run model text jobs config report

// 5. The table: per coder, and every transcoder spliced in at once.
printfn ""
printf "%s" (File.ReadAllText(Path.Combine(out, "metrics.md")))
printfn "\ntraining %.0f s, evaluation %.0f s; coders in %s" result.TrainSeconds result.EvalSeconds out
