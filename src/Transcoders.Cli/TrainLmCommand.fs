/// `train-lm`: trains a GPT-2-style model on tokenized TinyStories (or given files) on the CPU or a GPU.
module Transcoders.Cli.TrainLmCommand

open System.IO
open Argu
open Transcoders.Models
open TorchSharp
open Transcoders.Text
open Transcoders.Training

type Args =
    | Files of paths: string list
    | Vocab_Size of int
    | Layers of int
    | D_Model of int
    | Heads of int
    | Ctx of int
    | Batch of int
    | Steps of int
    | Lr of float
    | Warmup of int
    | Eval_Every of int
    | Checkpoint_Every of int
    | Log_Every of int
    | Seed of int64
    | Out of folder: string
    | Resume
    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Files _ -> "TinyStories-format files (default: the shipped ones)"
            | Vocab_Size _ -> "compact vocabulary size, specials included (default 4096)"
            | Layers _ -> "transformer blocks (default 4)"
            | D_Model _ -> "residual width (default 128)"
            | Heads _ -> "attention heads (default 4)"
            | Ctx _ -> "context length (default 128)"
            | Batch _ -> "sequences per step (default 16)"
            | Steps _ -> "optimizer steps (default 1500)"
            | Lr _ -> "peak learning rate (default 2e-3; warm-up then cosine decay to 10%)"
            | Warmup _ -> "warm-up steps (default 100)"
            | Eval_Every _ -> "validation loss every N steps (default 250)"
            | Checkpoint_Every _ -> "checkpoint every N steps (default 500; always at the end)"
            | Log_Every _ -> "a metrics.jsonl record every N steps (default 10)"
            | Seed _ -> "seed of initialisation and batches (default 0)"
            | Out _ -> "output folder: checkpoints/, metrics.jsonl, model/ (default runs/tinystories-gpt)"
            | Resume -> "continue from the newest intact checkpoint in the output folder (damaged ones are skipped, and named)"

/// The recipe the arguments describe.
let settings (args: ParseResults<Args>) : TinyStoriesGpt.Settings =
    let d = TinyStoriesGpt.Settings.Default
    { Files = args.TryGetResult Files
      VocabSize = args.GetResult(Vocab_Size, d.VocabSize)
      CorpusFolder = None
      Layers = args.GetResult(Layers, d.Layers)
      DModel = args.GetResult(D_Model, d.DModel)
      Heads = args.GetResult(Heads, d.Heads)
      Ctx = args.GetResult(Ctx, d.Ctx)
      Batch = args.GetResult(Batch, d.Batch)
      Steps = args.GetResult(Steps, d.Steps)
      Lr = args.GetResult(Lr, d.Lr)
      Warmup = args.GetResult(Warmup, d.Warmup)
      EvalEvery = args.GetResult(Eval_Every, d.EvalEvery)
      CheckpointEvery = args.GetResult(Checkpoint_Every, d.CheckpointEvery)
      LogEvery = args.GetResult(Log_Every, d.LogEvery)
      Seed = args.GetResult(Seed, d.Seed)
      Out = args.GetResult(Out, d.Out)
      Resume = args.Contains Resume }

/// Prepares the corpus, builds and trains the model (stopping early when `cancel` is signalled), printing what it
/// does; returns the trained model (the caller disposes it), its tokenizer and the result.
let train (cancel: System.Threading.CancellationToken) (s: TinyStoriesGpt.Settings) (device: torch.Device) =
    let corpus = TinyStoriesGpt.prepare s
    let train, validation = TinyStories.tokens corpus
    let model, config = TinyStoriesGpt.create s corpus device
    let modelConfig = model.Config
    printfn "model: %d layers, d_model %d, %d heads, context %d, vocabulary %d: %s parameters on %O"
        modelConfig.NLayers modelConfig.DModel modelConfig.NHeads modelConfig.NCtx modelConfig.VocabSize
        (Output.count (Transformer.parameterCount model)) device
    printfn "data: %s training tokens, %s validation tokens (%s)" (Output.count train.LongLength) (Output.count validation.LongLength) corpus.Folder
    let result = LmTraining.trainCancellable cancel model corpus.Tokenizer train validation config
    model, corpus.Tokenizer, result

/// Prints how much a training run did.
let printResult (result: LmTraining.LmTrainResult) =
    printfn "trained %d steps, %s tokens in %.0f s (%.0f tokens/s)" result.Run.FinalStep (Output.count result.Run.Tokens)
        result.Run.ElapsedSeconds (float result.Run.Tokens / max 1e-9 result.Run.ElapsedSeconds)

/// The exit code of a diverged run (the process exits non-zero and writes no final model).
[<Literal>]
let DivergedExitCode = 2

/// The exit code of a run stopped on request (Ctrl+C) before its last step.
[<Literal>]
let CancelledExitCode = 130

let run (common: Common.Options) (args: ParseResults<Args>) =
    use cancel = Trainer.cancelOnCtrlC ()
    let model, _, result = train cancel.Token (settings args) (Common.device common)
    use _m = model
    printResult result
    match result.Run.Outcome with
    | Trainer.Diverged (step, _) ->
        // the progress display printed the whole message; the error stream gets the verdict
        match result.Run.BestCheckpoint with
        | Some d -> eprintfn "training diverged at update %d; no final model was written. Checkpoint to use: %s" step d
        | None -> eprintfn "training diverged at update %d; no final model was written and no checkpoint exists" step
        DivergedExitCode
    | outcome ->
        result.ValidationLoss |> Option.iter (fun v ->
            if System.Double.IsFinite v then printfn "validation loss: %.4f nats/token" v
            else eprintfn "validation loss: %g (not finite): the final model is not usable" v)
        result.ModelDir |> Option.iter (fun d -> printfn "model saved to %s (metrics: %s)" d result.Run.MetricsLog)
        match outcome with
        | Trainer.Cancelled step ->
            printfn "stopped on request after step %d of %d; continue with --resume (checkpoint %s)" step
                (args.GetResult(Steps, 1500)) (defaultArg result.Run.LastCheckpoint "-")
            CancelledExitCode
        | _ ->
            match result.ValidationLoss with
            | Some v when not (System.Double.IsFinite v) -> DivergedExitCode
            | _ -> 0
