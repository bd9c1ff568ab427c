namespace Transcoders.Coders

open System
open System.IO
open TorchSharp
open Transcoders.Activations
open Transcoders.Models


/// A `train-coder` run: what to train (a `CoderPlan`) and how the run is fed, checkpointed and evaluated. The
/// command line, the C# facade and the quickstart all start from `CoderRunSettings.Default`.
type CoderRunSettings =
    { Plan: CoderPlan
      /// Output folder; None: `coders/<model>-<kinds>` (see `CoderRun.defaultOut`).
      Out: string option
      /// Token shards (a folder with train/ and validation/); None: TinyStories in the model's tokenizer.
      Tokens: string option
      /// Tokens per text row; None: min(128, n_ctx).
      Ctx: int option
      /// Shuffle-buffer rows; None: 64 batches.
      BufferRows: int64 option
      /// Cache the model's activations in this folder (written once, reused by later runs).
      CacheActivations: string option
      /// Steps between checkpoints (0: only at the end).
      CheckpointEvery: int
      /// Continue from a checkpoint of the same run in the output folder.
      Resume: bool
      /// Held-out activation rows for L0 / FVU.
      EvalRows: int64
      /// Validation rows spliced into the model for CE / KL.
      SplicedRows: int }

    /// `CoderPlan.Default`, the output folder from the model's name, TinyStories, checkpoints every 500 steps with
    /// resume, 32,768 evaluation rows and 128 spliced rows.
    static member Default =
        { Plan = CoderPlan.Default; Out = None; Tokens = None; Ctx = None; BufferRows = None; CacheActivations = None
          CheckpointEvery = 500; Resume = true; EvalRows = 32_768L; SplicedRows = 128 }

/// Building a coder run from names and settings: the activation and kind names the command line and the C# facade
/// accept, the model and its text, the jobs and the run configuration for `CoderJobs.run`.
[<RequireQualifiedAccess>]
module CoderRun =

    /// The activation named `name` (topk, batchtopk, groupmax, relu or jumprelu); `k` is the features kept per token
    /// for the TopK family.
    let activation (name: string) (k: int) : CoderActivation =
        match name.Trim().ToLowerInvariant() with
        | "topk" -> CoderActivation.TopK k
        | "batchtopk" -> CoderActivation.BatchTopK(float k)
        | "groupmax" -> CoderActivation.GroupMax k
        | "relu" -> CoderActivation.ReLU
        | "jumprelu" -> CoderActivation.JumpReLU JumpReLUSpec.Default
        | a -> failwithf "unknown activation '%s': expected topk, batchtopk, groupmax, relu or jumprelu" a

    /// The activation named `name` for a model of width `dModel`, keeping `k` features per token (None: d_model / 4).
    let activationFor (name: string) (k: int option) (dModel: int) : CoderActivation =
        activation name (defaultArg k (max 1 (dModel / 4)))

    /// A fresh coder configuration of any kind with any activation: an SAE on `hook` (default: the layer's MLP
    /// output), a transcoder or skip transcoder of the layer's MLP (one layer), or a cross-layer transcoder over
    /// `layers` (`CoderPlan.crossLayerConfig`); `width` features per layer.
    let coderConfig (kind: CoderKind) (modelName: string) (layers: int[]) (hook: string option) (dModel: int) (width: int)
                    (activation: CoderActivation) : CoderConfig =
        let one () =
            if layers.Length <> 1 then invalidArg "layers" (sprintf "a %s reads exactly one layer (got %d)" (CoderConfig.kindName kind) layers.Length)
            layers[0]
        let baseConfig =
            match kind with
            | Sae -> let l = one () in CoderConfig.sae modelName (defaultArg hook (CoderConfig.mlpOutHook l)) l dModel width
            | Transcoder -> CoderConfig.transcoder modelName (one ()) dModel width
            | SkipTranscoder -> CoderConfig.skipTranscoder modelName (one ()) dModel width
            | CrossLayerTranscoder -> CoderPlan.crossLayerConfig modelName layers dModel width activation
        CoderConfig.validate { baseConfig with Activation = activation }

    /// Whether a kind name asks for a cross-layer transcoder.
    let private isCrossLayer (name: string) =
        match name.Trim().ToLowerInvariant() with
        | "clt" | "cross-layer-transcoder" | "cross_layer_transcoder" | "crosslayer" -> true
        | _ -> false

    /// `plan` with the kinds named: transcoder, skip-transcoder, sae, sae:<hook suffix> (`LayerCoderKind.Parse`) and clt
    /// (one cross-layer transcoder over the plan's layers).
    let withKinds (names: string list) (plan: CoderPlan) : CoderPlan =
        { plan with
            Kinds = names |> List.filter (isCrossLayer >> not) |> List.map LayerCoderKind.Parse
            CrossLayer = names |> List.exists isCrossLayer }

    /// The kind names of a plan, as `withKinds` reads them.
    let kindNames (plan: CoderPlan) : string list =
        [ for k in plan.Kinds do yield k.Name
          if plan.CrossLayer then yield "clt" ]

    /// The settings of a run from plain values, starting from the defaults (so that fields added later keep theirs;
    /// the C# facade's way in): kind names as `withKinds` reads them, layers (empty: all), width (None: 16 × d_model),
    /// the activation by name with k (None: d_model / 4) for a model of width `dModel`, λ, steps, batch, seed,
    /// learning rate (None: the width's default), the output folder, token shards (None: TinyStories), tokens per
    /// row (None: min(128, n_ctx)), checkpoint interval, resume, evaluation rows and spliced rows.
    let settingsOf (kinds: string list) (layers: int list) (width: int option) (activationName: string) (k: int option)
                   (lambda: float) (steps: int) (batch: int) (seed: int64) (lr: float option) (out: string)
                   (tokens: string option) (ctx: int option) (checkpointEvery: int) (resume: bool) (evalRows: int64)
                   (splicedRows: int) (dModel: int) : CoderRunSettings =
        let plan =
            { CoderPlan.Default with
                Layers = layers; Width = width; Activation = Some(activationFor activationName k dModel); Lambda = lambda
                Steps = steps; Batch = batch; Seed = seed; Lr = lr }
            |> withKinds kinds
        { CoderRunSettings.Default with
            Plan = plan; Out = Some out; Tokens = tokens; Ctx = ctx; CheckpointEvery = checkpointEvery; Resume = resume
            EvalRows = evalRows; SplicedRows = splicedRows }

    /// `coders/<model>-<kinds>`, e.g. `coders/stories260K-transcoder-sae`.
    let defaultOut (modelName: string) (plan: CoderPlan) : string =
        Path.Combine("coders", sprintf "%s-%s" modelName (String.Join("-", kindNames plan |> List.map (fun k -> k.Replace(":", "-")))))

    /// The output folder of a run on the model named `modelName`.
    let out (modelName: string) (settings: CoderRunSettings) : string =
        defaultArg settings.Out (defaultOut modelName settings.Plan)

    /// The model at `modelPath` (eval mode, on `device`) and its text: the token shards in `tokens`, or the shipped
    /// TinyStories in the model's tokenizer.
    let loadModelAndText (modelPath: string) (tokens: string option) (device: torch.Device) : Transformer * ModelText =
        let model, _ = ModelFiles.load modelPath device
        try
            model.eval ()
            let text =
                match tokens with
                | Some folder -> ModelText.ofShards folder
                | None -> ModelText.forModel modelPath
            model, text
        with _ ->
            model.Dispose()
            reraise ()

    /// The run configuration for `CoderJobs.run`: store (rows, shuffle buffer on `device`), disk cache, checkpoints,
    /// resume and evaluation, written to `out`.
    let jobsConfig (model: Transformer) (settings: CoderRunSettings) (out: string) (device: torch.Device) : JobsConfig =
        let plan = settings.Plan
        { JobsConfig.Default out with
            Store = CoderPlan.store model settings.Ctx plan.Batch settings.BufferRows plan.Seed device
            Cache = settings.CacheActivations |> Option.map (fun d -> { Dir = d; Settings = CacheConfig.Default })
            CheckpointEvery = settings.CheckpointEvery
            Resume = settings.Resume
            Eval = { JobEval.Default with ActivationRows = settings.EvalRows; SplicedRows = settings.SplicedRows } }

    /// Trains, saves and evaluates the coders of `settings` on a loaded model and its text (see `CoderJobs.run`);
    /// the model is named `modelName` in the coders' configs.
    let trainOn (model: Transformer) (modelName: string) (text: ModelText) (settings: CoderRunSettings) (device: torch.Device)
                (onProgress: JobsProgress -> unit) : JobsResult =
        let jobs = CoderPlan.jobs model modelName settings.Plan
        CoderJobs.run model text jobs (jobsConfig model settings (out modelName settings) device) onProgress

    /// Loads the model at `modelPath` and its text, then trains, saves and evaluates the coders of `settings`
    /// (the `train-coder` command as a call). The output folder is `CoderRun.out (ModelName.ofPath modelPath)`.
    let train (modelPath: string) (settings: CoderRunSettings) (device: torch.Device) (onProgress: JobsProgress -> unit) : JobsResult =
        let model, text = loadModelAndText modelPath settings.Tokens device
        use _m = model
        trainOn model (ModelName.ofPath modelPath) text settings device onProgress
