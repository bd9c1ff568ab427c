/// `train-lm`: trains a GPT-2-style model on tokenized TinyStories (or given files) on the CPU or a GPU.
module Transcoders.Cli.TrainLmCommand

open System.IO
open Argu
open Transcoders.Models
open Transcoders.Tensors
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
    | Device of string
    | Threads of int
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
            | Device _ -> "cpu, cuda, cuda:N or auto (default auto)"
            | Threads _ -> "torch CPU threads (default: all cores)"
            | Resume -> "continue from the newest intact checkpoint in the output folder (damaged ones are skipped, and named)"

/// The model and training settings the arguments describe, for a corpus with `vocabSize` tokens.
let settings (args: ParseResults<Args>) (vocabSize: int) =
    let d = args.GetResult(D_Model, 128)
    let ctx = args.GetResult(Ctx, 128)
    let steps = args.GetResult(Steps, 1500)
    let model =
        { TransformerConfig.gpt2 with
            DModel = d; NLayers = args.GetResult(Layers, 4); NHeads = args.GetResult(Heads, 4); NKvHeads = args.GetResult(Heads, 4)
            DMlp = 4 * d; NCtx = ctx; VocabSize = vocabSize }
    let train =
        { Trainer.TrainConfig.Default with
            Steps = steps
            Schedule = Schedule.WarmupCosine(args.GetResult(Lr, 2e-3), min (args.GetResult(Warmup, 100)) steps, steps, 0.1)
            EvalEvery = args.GetResult(Eval_Every, 250)
            CheckpointEvery = args.GetResult(Checkpoint_Every, 500)
            LogEvery = args.GetResult(Log_Every, 10)
            OutputDir = args.GetResult(Out, Path.Combine("runs", "tinystories-gpt"))
            Seed = args.GetResult(Seed, 0L)
            Resume = (if args.Contains Resume then Trainer.Latest else Trainer.Fresh)
            Name = "train-lm" }
    model, { LmTraining.LmTrainConfig.Default with BatchSize = args.GetResult(Batch, 16); Ctx = ctx; Train = train }

/// Prepares the corpus, builds and trains the model; returns the trained model, its tokenizer and the result.
let trainFromArgs (cancel: System.Threading.CancellationToken) (args: ParseResults<Args>) =
    let device = Device.resolve (Device.parse (args.GetResult(Device, "auto")))
    Device.setThreads (args.GetResult(Threads, 0))
    let files = args.GetResult(Files, Corpus.shippedFiles ())
    let vocab = args.GetResult(Vocab_Size, 4096)
    let prepared = TinyStories.prepare files (Some vocab) (TinyStories.defaultFolder (Some vocab))
    let train, validation = TinyStories.tokens prepared
    let modelConfig, config = settings args (Tokenizer.vocabSize prepared.Tokenizer)
    Device.seed config.Train.Seed
    let model = Transformer.create modelConfig device
    printfn "model: %d layers, d_model %d, %d heads, context %d, vocabulary %d: %s parameters on %O"
        modelConfig.NLayers modelConfig.DModel modelConfig.NHeads modelConfig.NCtx modelConfig.VocabSize
        (Output.count (Transformer.parameterCount model)) device
    printfn "data: %s training tokens, %s validation tokens (%s)" (Output.count train.LongLength) (Output.count validation.LongLength) prepared.Folder
    let result = LmTraining.trainCancellable cancel model prepared.Tokenizer train validation config
    model, prepared.Tokenizer, result

/// The exit code of a diverged run (the process exits non-zero and writes no final model).
[<Literal>]
let DivergedExitCode = 2

/// The exit code of a run stopped on request (Ctrl+C) before its last step.
[<Literal>]
let CancelledExitCode = 130

let run (args: ParseResults<Args>) =
    use cancel = Trainer.cancelOnCtrlC ()
    let model, _, result = trainFromArgs cancel.Token args
    use _m = model
    printfn "trained %d steps, %s tokens in %.0f s (%.0f tokens/s)" result.Run.FinalStep (Output.count result.Run.Tokens)
        result.Run.ElapsedSeconds (float result.Run.Tokens / max 1e-9 result.Run.ElapsedSeconds)
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
