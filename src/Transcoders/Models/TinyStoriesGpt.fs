/// `train-lm`'s recipe: a GPT-2-style model trained on TinyStories (the shipped files or given ones) with a compact
/// vocabulary; AdamW, warm-up then cosine decay to 10%, clipping, validation loss, checkpoints, exact resume. The
/// command line, the quickstart and the C# facade all start from `TinyStoriesGpt.Settings.Default`.
module Transcoders.Models.TinyStoriesGpt

open System.IO
open System.Threading
open Transcoders.Text
open Transcoders.Training

/// The model's shape, the corpus and the training run.
type Settings =
    { /// TinyStories-format files; None: the shipped ones.
      Files: string list option
      /// Compact vocabulary size, specials included.
      VocabSize: int
      /// Where the token shards go; None: `TinyStories.defaultFolder` (under the cache folder, one per vocabulary size).
      CorpusFolder: string option
      Layers: int
      DModel: int
      Heads: int
      /// Context length.
      Ctx: int
      /// Sequences per step.
      Batch: int
      Steps: int
      /// Peak learning rate.
      Lr: float
      /// Warm-up steps (at most `Steps`).
      Warmup: int
      /// Validation loss every this many steps (0: only at the end).
      EvalEvery: int
      /// Checkpoint every this many steps (0: only at the end).
      CheckpointEvery: int
      /// A metrics.jsonl record every this many steps.
      LogEvery: int
      /// Seed of initialisation and batches.
      Seed: int64
      /// Output folder: checkpoints/, metrics.jsonl, model/.
      Out: string
      /// Continue from the latest checkpoint in `Out`.
      Resume: bool }

    /// 4 layers, d_model 128, 4 heads, context 128, 4,096-token vocabulary; 1,500 steps of 16 sequences, peak
    /// learning rate 2e-3 after 100 warm-up steps; validation every 250 steps, checkpoints every 500; seed 0;
    /// `runs/tinystories-gpt`.
    static member Default =
        { Files = None; VocabSize = 4096; CorpusFolder = None; Layers = 4; DModel = 128; Heads = 4; Ctx = 128; Batch = 16; Steps = 1500
          Lr = 2e-3; Warmup = 100; EvalEvery = 250; CheckpointEvery = 500; LogEvery = 10; Seed = 0L
          Out = Path.Combine("runs", "tinystories-gpt"); Resume = false }

/// The model configuration and training settings of `s` for a corpus of `vocabSize` tokens.
let configs (s: Settings) (vocabSize: int) : TransformerConfig * LmTraining.LmTrainConfig =
    let model =
        { TransformerConfig.gpt2 with
            DModel = s.DModel; NLayers = s.Layers; NHeads = s.Heads; NKvHeads = s.Heads
            DMlp = 4 * s.DModel; NCtx = s.Ctx; VocabSize = vocabSize }
    let train =
        { Trainer.TrainConfig.Default with
            Steps = s.Steps
            Schedule = Schedule.WarmupCosine(s.Lr, min s.Warmup s.Steps, s.Steps, 0.1)
            EvalEvery = s.EvalEvery
            CheckpointEvery = s.CheckpointEvery
            LogEvery = s.LogEvery
            OutputDir = s.Out
            Seed = s.Seed
            Resume = (if s.Resume then Trainer.Latest else Trainer.Fresh)
            Name = "train-lm" }
    model, { LmTraining.LmTrainConfig.Default with BatchSize = s.Batch; Ctx = s.Ctx; Train = train }

/// The files of `s` (the shipped ones when none are given).
let files (s: Settings) : string list = defaultArg s.Files (Corpus.shippedFiles ())

/// The corpus of `s`: train and validation shards in `CorpusFolder` (default: the cache folder's
/// `TinyStories.defaultFolder`), reused when already made from the same files.
let prepare (s: Settings) : TinyStories.Prepared =
    TinyStories.prepare (files s) (Some s.VocabSize) (defaultArg s.CorpusFolder (TinyStories.defaultFolder (Some s.VocabSize)))

/// A freshly initialised model of `s` for a prepared corpus (seeded by `s.Seed`), and its training settings.
let create (s: Settings) (corpus: TinyStories.Prepared) (device: TorchSharp.torch.Device) : Transformer * LmTraining.LmTrainConfig =
    let modelConfig, config = configs s (Tokenizer.vocabSize corpus.Tokenizer)
    Transcoders.Tensors.Device.seed config.Train.Seed
    Transformer.create modelConfig device, config

/// Trains `model` on the corpus (stopping early, with a checkpoint, when `cancel` is signalled); the model is saved
/// with its tokenizer in `<Out>/model` unless the run diverged (see `LmTraining.LmTrainResult`).
let trainCancellable (cancel: CancellationToken) (model: Transformer) (corpus: TinyStories.Prepared) (config: LmTraining.LmTrainConfig)
                     : LmTraining.LmTrainResult =
    let train, validation = TinyStories.tokens corpus
    LmTraining.trainCancellable cancel model corpus.Tokenizer train validation config

/// Prepares the corpus, creates and trains the model of `s` on `device`: the trained model (the caller disposes
/// it), the corpus and the result.
let train (s: Settings) (device: TorchSharp.torch.Device) : Transformer * TinyStories.Prepared * LmTraining.LmTrainResult =
    let corpus = prepare s
    let model, config = create s corpus device
    try model, corpus, trainCancellable CancellationToken.None model corpus config
    with _ ->
        model.Dispose()
        reraise ()
