/// Language-model training: next-token cross-entropy on random windows of a token stream, driven by the
/// generic trainer (AdamW, warm-up and cosine decay, clipping, validation loss, checkpoints, exact resume).
module Transcoders.Models.LmTraining

open System.IO
open System.Text.Json
open System.Text.Json.Nodes
open TorchSharp
open Transcoders.Text
open Transcoders.Training

/// What to train on and how.
type LmTrainConfig =
    { /// Sequences per update.
      BatchSize: int
      /// Tokens per sequence (at most the model's context).
      Ctx: int
      /// Validation loss over at most this many sequences of the validation stream (sequential windows).
      ValidationSequences: int
      Train: Trainer.TrainConfig }

    static member Default =
        { BatchSize = 16
          Ctx = 256
          ValidationSequences = 256
          Train = Trainer.TrainConfig.Default }

let problems (model: TransformerConfig) (c: LmTrainConfig) =
    [ if c.BatchSize <= 0 then sprintf "batch size must be positive (got %d)" c.BatchSize
      if c.Ctx <= 0 || c.Ctx > model.NCtx then sprintf "ctx must be in 1..%d, the model's context (got %d)" model.NCtx c.Ctx
      if c.ValidationSequences < 0 then sprintf "validation sequences must be ≥ 0 (got %d)" c.ValidationSequences ]
    @ Trainer.problems c.Train

/// Mean next-token loss (nats) over sequential windows of `tokens`, at most `maxSequences` of them, in eval
/// mode under no_grad; the model's training mode is restored afterwards.
let validationLoss (model: Transformer) (tokens: int[]) (batchSize: int) (ctx: int) (maxSequences: int) : float =
    let wasTraining = model.training
    model.eval ()
    use _ = torch.no_grad ()
    let mutable sum = 0.0
    let mutable count = 0L
    let mutable sequences = 0
    try
        for batch in Batches.sequential tokens batchSize ctx model.Device do
            use _scope = torch.NewDisposeScope()
            use b = batch
            if sequences < maxSequences then
                let n = b.Inputs.shape.[0] * b.Inputs.shape.[1]
                use logits = model.forward b.Inputs
                use loss =
                    torch.nn.functional.cross_entropy(logits.reshape(-1L, logits.shape.[2]), b.Targets.reshape(-1L))
                sum <- sum + float (loss.item<float32> ()) * float n
                count <- count + n
                sequences <- sequences + int b.Inputs.shape.[0]
    finally
        if wasTraining then model.train ()
    if count = 0L then nan else sum / float count

/// The trainer's objective for `model` on a training stream: batch `i` is a pure function of (seed, i), so a
/// resumed run sees the same batches.
let objective (model: Transformer) (train: int[]) (validation: int[]) (c: LmTrainConfig) : Trainer.Objective =
    if train.Length <= c.Ctx then
        invalidArg "train" (sprintf "the training stream has %d tokens, fewer than one window of %d + 1" train.Length c.Ctx)
    let loss (step: int) =
        use b = Batches.randomWindows train c.BatchSize c.Ctx c.Train.Seed (int64 step) model.Device
        let logits = model.forward b.Inputs
        torch.nn.functional.cross_entropy(logits.reshape(-1L, logits.shape.[2]), b.Targets.reshape(-1L))
    // periodic evaluations use a quarter of the validation sequences; the final one uses all of them
    let evaluate () =
        Map [ "val_loss", validationLoss model validation c.BatchSize c.Ctx (max 1 (c.ValidationSequences / 4)) ]
    { Trainer.objective (Transformer.parameters model) (int64 (c.BatchSize * c.Ctx)) loss with
        Evaluate = (if validation.Length > c.Ctx && c.ValidationSequences > 0 then Some evaluate else None)
        Metadata = Map [ "model_config", System.Text.Encoding.UTF8.GetString(Checkpoint.configJson model.Config Checkpoint.Metadata.Empty) ] }

/// What a training run gives back.
type LmTrainResult =
    { Run: Trainer.TrainResult
      /// Validation loss of the final model (nats per token; NaN when it is not finite), None without validation
      /// data or when the run diverged.
      ValidationLoss: float option
      /// The final model in our checkpoint format (with the tokenizer), `<OutputDir>/model`: after all steps, or
      /// after the steps done when the run was cancelled (its summary says how many). A diverged run writes no
      /// final model: `Run.LastCheckpoint` is the one to use.
      ModelDir: string option }

/// The "training" summary saved with the final model (non-finite losses as null: JSON has no NaN).
let summaryJson (run: Trainer.TrainResult) (valLoss: float option) (c: LmTrainConfig) : JsonObject =
    let summary = JsonObject()
    summary["steps"] <- JsonValue.Create run.FinalStep
    summary["tokens"] <- JsonValue.Create run.Tokens
    summary["batch_size"] <- JsonValue.Create c.BatchSize
    summary["ctx"] <- JsonValue.Create c.Ctx
    summary["seed"] <- JsonValue.Create c.Train.Seed
    summary["schedule"] <- Schedule.toJson c.Train.Schedule
    (match valLoss with Some v -> summary["val_loss"] <- JsonNumbers.node v | None -> ())
    if run.Losses.Length > 0 then summary["final_train_loss"] <- JsonNumbers.node run.Losses[run.Losses.Length - 1]
    summary

/// Trains `model` in place and saves it with its tokenizer and a summary of the run to `<OutputDir>/model`,
/// unless the run diverged: then no final model is written (see `LmTrainResult`).
let trainCancellable (cancel: System.Threading.CancellationToken) (model: Transformer) (tokenizer: Tokenizer) (train: int[]) (validation: int[]) (c: LmTrainConfig) : LmTrainResult =
    match problems model.Config c with
    | [] -> ()
    | ps -> invalidArg "config" (sprintf "invalid language-model training config: %s" (String.concat "; " ps))
    model.train ()
    let run = Trainer.runCancellable cancel c.Train (objective model train validation c)
    match run.Outcome with
    | Trainer.Completed
    | Trainer.Cancelled _ ->
        let valLoss =
            if validation.Length > c.Ctx && c.ValidationSequences > 0 then
                Some(validationLoss model validation c.BatchSize c.Ctx c.ValidationSequences)
            else None
        model.eval ()
        let meta: Checkpoint.Metadata =
            { Tokenizer = Some(JsonSerializer.SerializeToElement(Tokenizer.toJson tokenizer))
              Training = Some(JsonSerializer.SerializeToElement(summaryJson run valLoss c)) }
        let dir = Path.Combine(c.Train.OutputDir, "model")
        Checkpoint.save dir meta model
        { Run = run; ValidationLoss = valLoss; ModelDir = Some dir }
    | Trainer.Diverged _ ->
        model.eval ()
        { Run = run; ValidationLoss = None; ModelDir = None }

/// Trains `model` in place (see `trainCancellable`), to the last configured step.
let train model tokenizer train validation c = trainCancellable System.Threading.CancellationToken.None model tokenizer train validation c
