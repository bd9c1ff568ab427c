/// The generic training loop: AdamW steps of a loss closure over named parameters, with a schedule,
/// gradient clipping, periodic evaluation, a JSONL metrics log, progress display, atomic checkpoints
/// and exact resume. Used by the language-model trainer and the sparse-coder trainer alike.
module Transcoders.Training.Trainer

open System
open System.Diagnostics
open System.IO
open System.Text.Json
open System.Text.Json.Nodes
open System.Threading
open TorchSharp
open TorchSharp.Modules
open Transcoders.Files
open Transcoders.Training.Schedule

/// Where a run starts.
type Resume =
    /// At step 0. An output folder that already holds checkpoints is an error (nothing is overwritten).
    | Fresh
    /// From the newest intact checkpoint (every file matching its manifest), skipping damaged or incomplete newer
    /// ones (`TrainResult.Skipped` says which and why), or at step 0 when there is none. Checkpoint folders of
    /// which none is intact are an error.
    | Latest
    /// From this checkpoint folder.
    | From of checkpoint: string

/// A training run's settings. Steps count optimizer updates.
type TrainConfig =
    { /// Total optimizer updates.
      Steps: int
      Schedule: Schedule
      Optimizer: Optim.AdamWConfig
      /// Clip gradients to this global L2 norm (None: no clipping; the norm is still measured and logged).
      ClipGradNorm: float option
      /// Write a metrics record every this many updates.
      LogEvery: int
      /// Run the evaluation every this many updates and at the end (0: never).
      EvalEvery: int
      /// Checkpoint every this many updates (0: only at the end). The end is always checkpointed.
      CheckpointEvery: int
      /// Keep only the newest this many checkpoints (0: keep all).
      KeepCheckpoints: int
      /// Folder for checkpoints/, metrics.jsonl and config.json.
      OutputDir: string
      /// Torch's generators are seeded from (Seed, step) before every update, so anything random inside
      /// the loss (dropout, sampled batches) is a pure function of the step and resumes exactly.
      Seed: int64
      Resume: Resume
      Progress: Progress.Mode
      /// Shown in the progress display.
      Name: string }
    static member Default =
        { Steps = 1000
          Schedule = WarmupCosine(3e-4, 100, 1000, 0.1)
          Optimizer = Optim.AdamWConfig.Default
          ClipGradNorm = Some 1.0
          LogEvery = 10
          EvalEvery = 0
          CheckpointEvery = 500
          KeepCheckpoints = 3
          OutputDir = "runs/train"
          Seed = 0L
          Resume = Latest
          Progress = Progress.Auto
          Name = "train" }

/// Problems with a configuration, as readable messages (empty when valid).
let problems (c: TrainConfig) : string list =
    [ if c.Steps <= 0 then sprintf "Steps must be > 0, got %d" c.Steps
      if c.LogEvery <= 0 then sprintf "LogEvery must be > 0, got %d" c.LogEvery
      if c.EvalEvery < 0 then sprintf "EvalEvery must be >= 0, got %d" c.EvalEvery
      if c.CheckpointEvery < 0 then sprintf "CheckpointEvery must be >= 0, got %d" c.CheckpointEvery
      if c.KeepCheckpoints < 0 then sprintf "KeepCheckpoints must be >= 0, got %d" c.KeepCheckpoints
      match c.ClipGradNorm with
      | Some v when not (v > 0.0 && Double.IsFinite v) -> sprintf "ClipGradNorm must be finite and > 0, got %g" v
      | _ -> ()
      if String.IsNullOrWhiteSpace c.OutputDir then "OutputDir must be set"
      yield! Schedule.problems c.Schedule |> List.map (fun p -> "Schedule: " + p)
      yield! Optim.problems c.Optimizer |> List.map (fun p -> "Optimizer: " + p) ]

/// Raises ArgumentException listing every problem.
let validate (c: TrainConfig) =
    match problems c with
    | [] -> ()
    | ps -> invalidArg "config" (sprintf "invalid TrainConfig: %s" (String.concat "; " ps))

/// The configuration as JSON (saved in config.json and in every checkpoint).
let configToJson (c: TrainConfig) : JsonObject =
    let o = JsonObject()
    o["steps"] <- JsonValue.Create c.Steps
    o["schedule"] <- Schedule.toJson c.Schedule
    o["optimizer"] <- Optim.toJson c.Optimizer
    o["clip_grad_norm"] <- (match c.ClipGradNorm with Some v -> JsonValue.Create v :> JsonNode | None -> null)
    o["log_every"] <- JsonValue.Create c.LogEvery
    o["eval_every"] <- JsonValue.Create c.EvalEvery
    o["checkpoint_every"] <- JsonValue.Create c.CheckpointEvery
    o["keep_checkpoints"] <- JsonValue.Create c.KeepCheckpoints
    o["output_dir"] <- JsonValue.Create c.OutputDir
    o["seed"] <- JsonValue.Create c.Seed
    o["name"] <- JsonValue.Create c.Name
    o

/// Reads `configToJson`'s output (Resume = Latest, Progress = Auto), naming a missing field.
let configOfJson (node: JsonNode) : TrainConfig =
    let field (k: string) =
        match node[k] with
        | null -> failwithf "TrainConfig JSON: missing field '%s'" k
        | v -> v
    let c =
        { Steps = (field "steps").GetValue<int>()
          Schedule = Schedule.ofJson (field "schedule")
          Optimizer = Optim.ofJson (field "optimizer")
          ClipGradNorm = (match node["clip_grad_norm"] with null -> None | v -> Some(v.GetValue<float>()))
          LogEvery = (field "log_every").GetValue<int>()
          EvalEvery = (field "eval_every").GetValue<int>()
          CheckpointEvery = (field "checkpoint_every").GetValue<int>()
          KeepCheckpoints = (field "keep_checkpoints").GetValue<int>()
          OutputDir = (field "output_dir").GetValue<string>()
          Seed = (field "seed").GetValue<int64>()
          Resume = Latest
          Progress = Progress.Auto
          Name = (match node["name"] with null -> "train" | v -> v.GetValue<string>()) }
    validate c
    c

/// What is trained: named parameters and the loss of each step.
type Objective =
    { /// The trainable parameters, by name (names are the checkpoint's tensor names).
      Parameters: (string * Parameter) list
      /// Non-trainable state to checkpoint and restore with the model (running statistics, counters).
      Buffers: (string * torch.Tensor) list
      /// The scalar loss of the `i`-th update (0-based), with its autograd graph. It runs inside the
      /// step's dispose scope. Batches should be a pure function of (seed, i) for exact resume.
      Loss: int -> torch.Tensor
      /// Tokens (or examples) per update, for throughput (0 if not meaningful).
      TokensPerStep: int64
      /// Evaluation metrics (runs under no_grad in its own dispose scope; switch dropout off inside).
      Evaluate: (unit -> Map<string, float>) option
      /// Which parameters get weight decay (default: ≥ 2-D ones).
      Decay: string -> Parameter -> bool
      /// Called with the update index after backward and before clipping (e.g. remove the gradient
      /// component parallel to a sparse coder's decoder directions). Runs inside the step's scope.
      AfterBackward: int -> unit
      /// Called with the update index after the optimizer update (e.g. renormalise decoder rows,
      /// update dead-feature counters). Runs inside the step's scope, under no_grad.
      AfterStep: int -> unit
      /// Training-side metrics gathered by the caller (L0, reconstruction error, …), read whenever a
      /// metrics record is written and logged under "train".
      TrainMetrics: (unit -> Map<string, float>) option
      /// Saved with every checkpoint's model file (e.g. "model_config" → the model's JSON, to rebuild it).
      Metadata: Map<string, string> }

/// An objective with no buffers, evaluation or metadata, and the default weight-decay rule.
let objective (parameters: (string * Parameter) seq) (tokensPerStep: int64) (loss: int -> torch.Tensor) =
    { Parameters = List.ofSeq parameters
      Buffers = []
      Loss = loss
      TokensPerStep = tokensPerStep
      Evaluate = None
      Decay = Optim.decays
      AfterBackward = ignore
      AfterStep = ignore
      TrainMetrics = None
      Metadata = Map.empty }

/// The seed torch's generators get before update `step` of a run seeded with `seed` (SplitMix64 of both).
let stepSeed (seed: int64) (step: int) : int64 =
    let mutable z = uint64 seed + 0x9E3779B97F4A7C15UL * (uint64 step + 1UL)
    z <- (z ^^^ (z >>> 30)) * 0xBF58476D1CE4E5B9UL
    z <- (z ^^^ (z >>> 27)) * 0x94D049BB133111EBUL
    z <- z ^^^ (z >>> 31)
    int64 (z >>> 1)

/// What one update measured. Non-finite `Loss` or `GradNorm` means the update was NOT applied.
type StepStats = { Loss: float; GradNorm: float; Lr: float }

/// Applies single updates: owns the AdamW optimizer over the objective's parameters.
type Stepper(config: TrainConfig, objective: Objective) =
    do
        validate config
        if objective.Parameters.IsEmpty then invalidArg "objective" "the objective has no parameters"
    let optimizer = new Optim.AdamW(objective.Parameters, config.Optimizer, objective.Decay)
    let parameters = objective.Parameters |> List.map snd |> Array.ofList

    member _.Optimizer = optimizer

    /// The `step`-th update (0-based): seed, set the learning rate, zero the gradients, loss, backward,
    /// clip, and apply AdamW unless the loss or gradient norm is not finite. Every temporary is disposed.
    member _.Update(step: int) : StepStats =
        use scope = torch.NewDisposeScope()
        let seed = stepSeed config.Seed step
        Transcoders.Tensors.Rng.seed seed
        let lr = Schedule.lrAt config.Schedule step
        optimizer.SetLearningRate lr
        optimizer.ZeroGrad()
        let loss = objective.Loss step
        if isNull loss then invalidOp (sprintf "the loss of step %d is null" step)
        if loss.numel () <> 1L then
            invalidOp (sprintf "the loss of step %d must be a scalar, got shape [%s]" step (loss.shape |> Array.map string |> String.concat ", "))
        if not loss.requires_grad then
            invalidOp (sprintf "the loss of step %d does not require a gradient (computed under no_grad, or from no parameter?)" step)
        loss.backward ()
        objective.AfterBackward step
        let lossValue = loss.detach().cpu().to_type(torch.float64).item<float>()
        let norm =
            match config.ClipGradNorm with
            | Some c -> Optim.clipGradNorm parameters c
            | None -> Optim.gradNorm parameters
        if Double.IsFinite lossValue && Double.IsFinite norm then
            optimizer.Step()
            use _ = torch.no_grad ()
            objective.AfterStep step
        { Loss = lossValue; GradNorm = norm; Lr = lr }

    interface IDisposable with
        member _.Dispose() = (optimizer :> IDisposable).Dispose()

/// How a run ended.
type Outcome =
    /// All configured steps done.
    | Completed
    /// The loss or gradient norm was NaN/Inf at update `step` (0-based); that update was not applied
    /// and nothing was checkpointed after the last good checkpoint (`TrainResult.LastCheckpoint`, the one to use;
    /// the message names it). The parameters in memory are those of the last update applied: not a result.
    | Diverged of step: int * message: string
    /// Stopped on request after `step` updates (checkpointed there).
    | Cancelled of step: int

/// What a run did.
type TrainResult =
    { Outcome: Outcome
      /// Updates already done when the run started (0, or the resumed checkpoint's step).
      StartStep: int
      /// Updates done when it ended.
      FinalStep: int
      /// The loss of every update this run applied, in order (update StartStep first).
      Losses: float[]
      /// The newest checkpoint folder, if any.
      LastCheckpoint: string option
      /// The checkpoint to use after `Diverged`: of those kept, the one taken at the lowest training loss (the
      /// mean over the updates since the checkpoint before it). Pruning keeps it once a newer checkpoint's loss is
      /// more than `RisenFactor` times its loss, so a run that diverges slowly still has a good one to offer.
      BestCheckpoint: string option
      /// Newer checkpoints passed over when resuming (folder, why: a file missing, truncated or not matching its
      /// checksum), newest first.
      Skipped: (string * string) list
      MetricsLog: string
      Tokens: int64
      ElapsedSeconds: float }

/// A checkpoint whose training loss is more than this many times a kept older one's is taken after the loss
/// rose: pruning then keeps the older one (see `TrainResult.BestCheckpoint`).
let [<Literal>] RisenFactor = 1.5

/// The checkpoints folder of a run's output folder.
let checkpointsDir (outputDir: string) = Path.Combine(outputDir, "checkpoints")

/// The metrics log of a run's output folder.
let metricsPath (outputDir: string) = Path.Combine(outputDir, "metrics.jsonl")

/// The fields that decide the trajectory must match between a checkpoint and the resumed run.
let private checkCompatible (dir: string) (saved: JsonObject) (current: TrainConfig) =
    let now = configToJson current
    let differs =
        [ for k in [ "schedule"; "optimizer"; "clip_grad_norm"; "seed" ] do
              let a = match saved[k] with null -> "null" | v -> v.ToJsonString()
              let b = match now[k] with null -> "null" | v -> v.ToJsonString()
              if a <> b then sprintf "%s: checkpoint %s, now %s" k a b ]
    if not differs.IsEmpty then
        invalidOp (
            sprintf "cannot resume from %s exactly: the configuration differs (%s). Use the same settings, or start a fresh run in another folder."
                dir (String.concat "; " differs))

/// The sums behind the next metrics record: the updates since the previous record. Part of the resumable state
/// (saved in trainer.json's "state"), so a resumed run's next record averages the same updates as an
/// uninterrupted run's.
type private Window =
    { mutable Loss: float
      mutable Grad: float
      mutable N: int
      mutable Lr: float
      mutable Seconds: float
      mutable Tokens: int64 }
    member w.Clear() =
        w.Loss <- 0.0; w.Grad <- 0.0; w.N <- 0; w.Seconds <- 0.0; w.Tokens <- 0L
    member w.ToJson() =
        let o = JsonObject()
        o["loss_sum"] <- JsonNumbers.node w.Loss
        o["grad_norm_sum"] <- JsonNumbers.node w.Grad
        o["updates"] <- JsonValue.Create w.N
        o["lr"] <- JsonNumbers.node w.Lr
        o["seconds"] <- JsonNumbers.node w.Seconds
        o["tokens"] <- JsonValue.Create w.Tokens
        o
    static member Empty() = { Loss = 0.0; Grad = 0.0; N = 0; Lr = 0.0; Seconds = 0.0; Tokens = 0L }
    static member OfJson(source: string, node: JsonNode) =
        match node with
        | :? JsonObject as o ->
            let get (k: string) = match o[k] with null -> failwithf "%s: the metrics window lacks '%s'" source k | v -> v
            { Loss = JsonNumbers.ofNode (get "loss_sum"); Grad = JsonNumbers.ofNode (get "grad_norm_sum")
              N = (get "updates").GetValue<int>(); Lr = JsonNumbers.ofNode (get "lr")
              Seconds = JsonNumbers.ofNode (get "seconds"); Tokens = (get "tokens").GetValue<int64>() }
        | _ -> Window.Empty() // a checkpoint written right after a record, by an older version

/// The training loss a checkpoint was taken at (its state's "checkpoint_loss"; NaN when unknown).
let checkpointLoss (info: Checkpointing.Info) = JsonNumbers.ofNode info.State["checkpoint_loss"]

/// The checkpoint under `root` with the lowest finite training loss (folder, step, loss), if any.
let bestCheckpoint (root: string) : (string * int * float) option =
    Checkpointing.list root
    |> List.choose (fun (step, d) ->
        try
            let loss = checkpointLoss (Checkpointing.readInfo d)
            if Double.IsFinite loss then Some(d, step, loss) else None
        with _ -> None)
    |> function
        | [] -> None
        | cks -> Some(cks |> List.minBy (fun (_, step, loss) -> loss, -step))

/// Trains `objective` as `config` says, stopping early when `cancel` is signalled (after
/// checkpointing the current step). See `TrainConfig` and `Objective`.
let runCancellable (cancel: CancellationToken) (config: TrainConfig) (objective: Objective) : TrainResult =
    validate config
    let root = checkpointsDir config.OutputDir
    let logPath = metricsPath config.OutputDir
    Directory.CreateDirectory config.OutputDir |> ignore
    use stepper = new Stepper(config, objective)
    let optimizer = stepper.Optimizer
    let paramTensors = objective.Parameters |> List.map (fun (n, p) -> n, p :> torch.Tensor)
    let resumeDir, skipped =
        match config.Resume with
        | Fresh ->
            match Checkpointing.list root with
            | [] -> None, []
            | cks ->
                invalidOp (
                    sprintf "%s already holds checkpoints (newest: %s); resume with Resume = Latest, or choose another OutputDir"
                        root (snd (List.last cks)))
        | Latest ->
            let found, skipped = Checkpointing.newestIntact root
            found |> Option.map fst, skipped
        | From d -> Some d, []
    let start, tokens0, elapsed0, window =
        match resumeDir with
        | Some d ->
            let saved = Checkpointing.readInfo d
            checkCompatible d saved.Config config
            if saved.Step > config.Steps then
                invalidOp (sprintf "%s is at step %d, beyond this run's Steps (%d)" d saved.Step config.Steps)
            let info = Checkpointing.load d paramTensors objective.Buffers optimizer
            let trainerFile = Path.Combine(d, Checkpointing.TrainerFile)
            info.Step, info.Tokens, info.ElapsedSeconds, Window.OfJson(trainerFile, info.State["metrics_window"])
        | None -> 0, 0L, 0.0, Window.Empty()
    match resumeDir with
    | Some _ -> Metrics.truncateAfter logPath start
    | None -> if File.Exists logPath then File.Delete logPath
    AtomicFile.writeAllText (Path.Combine(config.OutputDir, "config.json"))
        ((configToJson config).ToJsonString(JsonSerializerOptions(WriteIndented = true)))
    use log = new Metrics.Log(logPath)
    let losses = ResizeArray<float>()
    let clock = Stopwatch.StartNew()
    let elapsed () = elapsed0 + clock.Elapsed.TotalSeconds
    let mutable step = start
    let mutable tokens = tokens0
    let mutable lastCheckpoint = resumeDir
    let mutable checkpointedAt = if resumeDir.IsSome then start else -1
    // the training losses since the previous checkpoint (none at a resumed one): their mean is the checkpoint's loss
    let mutable sinceSum, sinceN = 0.0, 0
    let mutable outcome = None
    let evaluate () =
        match objective.Evaluate with
        | None -> Map.empty
        | Some f ->
            use _ = torch.no_grad ()
            use scope = torch.NewDisposeScope()
            f ()
    let record (eval: Map<string, float>) =
        let r: Metrics.Record =
            { Step = step
              Loss = (if window.N > 0 then window.Loss / float window.N else nan)
              Lr = window.Lr
              GradNorm = (if window.N > 0 then window.Grad / float window.N else nan)
              Tokens = tokens
              TokensPerSecond = (if window.Seconds > 0.0 then float window.Tokens / window.Seconds else nan)
              ElapsedSeconds = elapsed ()
              Train = (match objective.TrainMetrics with Some f -> f () | None -> Map.empty)
              Eval = eval }
        log.Write r
        window.Clear()
        r
    let checkpoint () =
        let state = JsonObject()
        state["metrics_window"] <- window.ToJson()
        let loss = if sinceN > 0 then sinceSum / float sinceN else nan
        state["checkpoint_loss"] <- JsonNumbers.node loss
        sinceSum <- 0.0
        sinceN <- 0
        let info: Checkpointing.Info =
            { Step = step; Tokens = tokens; ElapsedSeconds = elapsed (); Config = configToJson config
              Metadata = objective.Metadata; State = state }
        let dir = Checkpointing.save root info paramTensors objective.Buffers optimizer
        // keep the best checkpoint once the loss has risen well above it: the one to use if the run diverges
        let protect =
            if config.KeepCheckpoints = 0 then []
            else
                match bestCheckpoint root with
                | Some (best, _, bestLoss) when Double.IsFinite loss && loss > RisenFactor * bestLoss -> [ best ]
                | _ -> []
        Checkpointing.pruneKeeping root config.KeepCheckpoints protect
        lastCheckpoint <- Some dir
        checkpointedAt <- step
    Progress.run config.Progress config.Name start config.Steps (fun reporter ->
        for d, why in skipped do
            reporter.Message(sprintf "skipped checkpoint %s: %s" d why)
        match resumeDir with
        | Some d -> reporter.Message(sprintf "resuming from %s (step %d of %d)" d start config.Steps)
        | None -> ()
        while outcome.IsNone && step < config.Steps do
            if cancel.IsCancellationRequested then
                if checkpointedAt <> step then checkpoint ()
                reporter.Message(sprintf "stopped on request after step %d; checkpoint %s" step (defaultArg lastCheckpoint "-"))
                outcome <- Some(Cancelled step)
            else
                let sw = Stopwatch.StartNew()
                let s = stepper.Update step
                sw.Stop()
                if not (Double.IsFinite s.Loss && Double.IsFinite s.GradNorm) then
                    if window.N > 0 then record Map.empty |> ignore
                    let advice =
                        match bestCheckpoint root, lastCheckpoint with
                        | Some (best, bestStep, bestLoss), Some last ->
                            let newest =
                                if Path.GetFullPath best = Path.GetFullPath last then ""
                                else
                                    let lastLoss = try checkpointLoss (Checkpointing.readInfo last) with _ -> nan
                                    sprintf "; the newest is %s (step %d, training loss %.4g)" last checkpointedAt lastLoss
                            sprintf "The model in memory is not a result. Checkpoint to use: %s (step %d, training loss %.4g, the lowest of the checkpoints kept; its %s holds that step's weights)%s"
                                best bestStep bestLoss Checkpointing.ModelFile newest
                        | _, Some last ->
                            sprintf "The model in memory is not a result. Last checkpoint: %s (step %d); its %s holds that step's weights"
                                last checkpointedAt Checkpointing.ModelFile
                        | _, None -> "The model in memory is not a result, and no checkpoint was written before it: lower the learning rate and start over"
                    let message =
                        sprintf "training stopped at update %d: the loss is %g and the gradient norm %g (not finite); the update was not applied. %s"
                            step s.Loss s.GradNorm advice
                    reporter.Message message
                    outcome <- Some(Diverged(step, message))
                else
                    losses.Add s.Loss
                    sinceSum <- sinceSum + s.Loss
                    sinceN <- sinceN + 1
                    step <- step + 1
                    tokens <- tokens + objective.TokensPerStep
                    window.Loss <- window.Loss + s.Loss; window.Grad <- window.Grad + s.GradNorm; window.N <- window.N + 1
                    window.Lr <- s.Lr
                    window.Seconds <- window.Seconds + sw.Elapsed.TotalSeconds
                    window.Tokens <- window.Tokens + objective.TokensPerStep
                    reporter.Update
                        { Step = step; Total = config.Steps; Loss = s.Loss; Lr = s.Lr
                          TokensPerSecond = (if window.Seconds > 0.0 then float window.Tokens / window.Seconds else nan) }
                    let evalNow = config.EvalEvery > 0 && objective.Evaluate.IsSome && (step % config.EvalEvery = 0 || step = config.Steps)
                    if evalNow || step % config.LogEvery = 0 || step = config.Steps then
                        let r = record (if evalNow then evaluate () else Map.empty)
                        reporter.Logged(r, config.Steps)
                    if (config.CheckpointEvery > 0 && step % config.CheckpointEvery = 0) || step = config.Steps then
                        checkpoint ()
        if outcome.IsNone then outcome <- Some Completed
        { Outcome = outcome.Value
          StartStep = start
          FinalStep = step
          Losses = losses.ToArray()
          LastCheckpoint = lastCheckpoint
          BestCheckpoint =
            (match bestCheckpoint root with
             | Some (best, _, _) -> Some best
             | None -> lastCheckpoint)
          Skipped = skipped
          MetricsLog = logPath
          Tokens = tokens
          ElapsedSeconds = elapsed () })

/// A cancellation source that the first Ctrl+C cancels (the run then checkpoints and stops cleanly);
/// a second Ctrl+C ends the process as usual.
let cancelOnCtrlC () : CancellationTokenSource =
    let cts = new CancellationTokenSource()
    Console.CancelKeyPress.Add(fun e ->
        if not cts.IsCancellationRequested then
            e.Cancel <- true
            cts.Cancel())
    cts

/// Trains `objective` as `config` says. See `TrainConfig`, `Objective` and `TrainResult`.
let run (config: TrainConfig) (objective: Objective) : TrainResult = runCancellable CancellationToken.None config objective
