namespace Transcoders.Coders

open System
open TorchSharp
open Transcoders.Activations
open Transcoders.Models


/// What to train on a model in one run: coders of some kinds at some layers, all with one width and one
/// activation, fed from one activation stream. `train-coder` and the C# facade build their jobs from it.
type CoderPlan =
    { Kinds: LayerCoderKind list
      /// Layers to train at; empty: every layer of the model.
      Layers: int list
      /// Features per coder; None: `Expansion` × d_model.
      Width: int option
      Expansion: int
      /// The activation; None: TopK with k = d_model / 4.
      Activation: CoderActivation option
      /// The sparsity coefficient λ of ReLU / JumpReLU coders (on activations normalised to E‖x‖ = √d).
      Lambda: float
      Steps: int
      /// Tokens per training batch.
      Batch: int
      Seed: int64
      /// Adam's learning rate; None: `CoderDefaults.lr` of the width.
      Lr: float option
      /// Also train one cross-layer transcoder over the plan's layers (each reading its MLP input, writing to its own
      /// and every later MLP output), named `clt-L<layers>`.
      CrossLayer: bool }

    /// Transcoders at every layer, 16 × d_model features, TopK (d_model / 4), 600 steps of 1,024 tokens, seed 42.
    static member Default =
        { Kinds = [ MlpTranscoder ]; Layers = []; Width = None; Expansion = 16; Activation = None; Lambda = 1.0
          Steps = 600; Batch = 1024; Seed = 42L; Lr = None; CrossLayer = false }

/// Turning a plan into jobs and store settings for `CoderJobs.run`.
[<RequireQualifiedAccess>]
module CoderPlan =

    /// The width of the plan's coders on a model of width `dModel`.
    let width (dModel: int) (plan: CoderPlan) = defaultArg plan.Width (plan.Expansion * dModel)

    /// The plan's activation on a model of width `dModel`.
    let activation (dModel: int) (plan: CoderPlan) : CoderActivation = defaultArg plan.Activation (CoderActivation.TopK(max 1 (dModel / 4)))

    /// A cross-layer transcoder over `layers` with `activation`: Anthropic's free decoder norms go with their
    /// decoder-norm-weighted penalty (JumpReLU); TopK and ReLU coders keep unit-norm decoders, as the per-layer kinds do.
    let crossLayerConfig (modelName: string) (layers: int[]) (dModel: int) (width: int) (activation: CoderActivation) : CoderConfig =
        let decoder = match activation with CoderActivation.JumpReLU _ -> Free | _ -> UnitNorm
        CoderConfig.validate { CoderConfig.crossLayer modelName layers dModel width with Activation = activation; Decoder = decoder }

    /// One job per (kind, layer), named by `CoderJob.name` (`transcoder-L1`), then the cross-layer transcoder when the plan asks for one.
    /// Layers outside the model and unknown SAE hooks raise an error naming them.
    let jobs (model: Transformer) (modelName: string) (plan: CoderPlan) : CoderJob list =
        let c = model.Config
        let layers = if plan.Layers.IsEmpty then [ 0 .. c.NLayers - 1 ] else plan.Layers
        let width = width c.DModel plan
        let activation = activation c.DModel plan
        let level =
            match activation with
            | CoderActivation.ReLU | CoderActivation.JumpReLU _ -> L1Level plan.Lambda
            | CoderActivation.TopK k | CoderActivation.GroupMax k -> TopKLevel k
            | CoderActivation.BatchTopK k -> TopKLevel(int (round k))
        if plan.Kinds.IsEmpty && not plan.CrossLayer then invalidArg "Kinds" "the plan names no coder kind"
        let train (coder: CoderConfig) =
            let t = CoderDefaults.forCoder coder plan.Lambda plan.Steps plan.Batch
            { t with Seed = plan.Seed; Lr = defaultArg plan.Lr t.Lr }
        [ for kind in plan.Kinds do
              for layer in layers do
                  if layer < 0 || layer >= c.NLayers then
                      invalidArg "Layers" (sprintf "layer %d is outside the model's layers 0..%d" layer (c.NLayers - 1))
                  let dIn = LayerCoder.inputWidth model kind layer
                  let coder = { LayerCoder.config modelName dIn kind layer width level with Activation = activation }
                  yield { Name = CoderJob.name coder; Coder = coder; Train = train coder }
          if plan.CrossLayer then
              let layers = List.sort layers |> List.distinct
              for layer in layers do
                  if layer < 0 || layer >= c.NLayers then
                      invalidArg "Layers" (sprintf "layer %d is outside the model's layers 0..%d" layer (c.NLayers - 1))
              let coder = crossLayerConfig modelName (Array.ofList layers) c.DModel width activation
              yield { Name = CoderJob.name coder; Coder = coder; Train = train coder } ]

    /// Store settings for training batches of `batch` tokens: rows of `ctx` tokens (default min(128, n_ctx)),
    /// a shuffle buffer of `bufferRows` rows (default 64 batches), seeded text order and shuffling, batches served on
    /// `device`.
    let store (model: Transformer) (ctx: int option) (batch: int) (bufferRows: int64 option) (seed: int64) (device: torch.Device) : StoreConfig =
        let ctx = defaultArg ctx (min 128 model.Config.NCtx)
        let rows = defaultArg bufferRows (64L * int64 batch)
        let rows = max (int64 batch) (rows / int64 batch * int64 batch)
        { StoreConfig.Default with
            Ctx = ctx
            PassRows = max 1 (min 32 (batch / ctx))
            TextSeed = seed
            Buffer = { ShuffleBufferConfig.Default with Rows = rows; BatchSize = int64 batch; Seed = seed; ServeDevice = device } }
