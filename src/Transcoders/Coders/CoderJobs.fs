namespace Transcoders.Coders

open System
open System.Diagnostics
open System.Globalization
open System.IO
open System.Text.Json
open System.Text.Json.Nodes
open TorchSharp
open Transcoders.Activations
open Transcoders.Files
open Transcoders.Models
open Transcoders.Training

/// One coder to train: its name (the folder it is saved in), its configuration and how it is trained. (`Train.LogPath`
/// is not used: each coder logs to `<Out>/<name>/log.jsonl`.)
type CoderJob =
    { Name: string
      Coder: CoderConfig
      Train: TrainConfig }

/// Evaluation of trained coders.
type JobEval =
    { /// Held-out activation rows (from the validation text) for L0, FVU, MSE, dead features; 0 skips it.
      ActivationRows: int64
      /// Validation rows of `StoreConfig.Ctx` tokens for the spliced model (CE, KL, top-1); 0 skips it.
      SplicedRows: int
      /// Rows per model pass of the spliced evaluation.
      SplicedBatch: int
      /// Also splice all transcoders of the run at once (when they sit at distinct layers), as the transcoder
      /// paper's "every MLP replaced".
      Joint: bool }

    /// 32,768 held-out rows; 128 validation rows spliced, 16 at a time; the joint replacement too.
    static member Default = { ActivationRows = 32_768L; SplicedRows = 128; SplicedBatch = 16; Joint = true }

/// Settings of a training run on a model (shared by all its coders).
type JobsConfig =
    { /// Output folder: one sub-folder per coder, checkpoints, run description and metrics tables.
      Out: string
      /// Text rows, passes and the shuffle buffer; `Buffer.BatchSize` must equal every job's `Train.BatchSize`,
      /// and `Buffer.ServeDevice` is where the coders train.
      Store: StoreConfig
      /// Cache activations on disk (written once, then read by this and later runs) instead of running the
      /// model for every batch.
      Cache: DiskCache option
      /// Steps between checkpoints (0: only the final one). Resuming from one continues bit for bit.
      CheckpointEvery: int
      /// Continue from the newest intact checkpoint in `Out` when there is one (it must come from the same run
      /// description; damaged newer ones are skipped and named); otherwise the checkpoints there are discarded and
      /// training starts over.
      Resume: bool
      Eval: JobEval
      /// Keep the newest this many checkpoints (0: all), so that a damaged one leaves an older one to resume from.
      KeepCheckpoints: int
      /// Once cancelled (a scheduler's SIGTERM), the run writes a checkpoint after the current step and stops with
      /// `OperationCanceledException`; resuming from that checkpoint continues bit for bit.
      Stop: Threading.CancellationToken }

    static member Default(out: string) =
        { Out = out; Store = StoreConfig.Default; Cache = None; CheckpointEvery = 1000; Resume = true; Eval = JobEval.Default
          KeepCheckpoints = 3; Stop = Threading.CancellationToken.None }

/// What a run reports while it works.
type JobsProgress =
    | Preparing of what: string
    /// After a step: the step (from 1), the total, tokens per coder so far, and the coders logged at this step.
    | Trained of step: int * steps: int * tokens: int64 * logs: (string * StepLog) list
    | Checkpointed of step: int * folder: string
    | Evaluating of coder: string

/// One coder's evaluation: activation metrics (held-out rows) and spliced-model metrics (validation text).
type CoderResult =
    { Name: string
      /// The folder the coder is saved in (`CoderFile.load` reads it).
      Path: string
      /// The saved configuration (scales folded).
      Config: CoderConfig
      Train: TrainConfig option
      /// The last logged training step.
      LastLog: StepLog option
      Metrics: EvalResult option
      Spliced: SplicedEval.SplicedMetrics option }

/// What `CoderJobs.run` did.
type JobsResult =
    { Coders: CoderResult list
      /// Every transcoder spliced at once (see `JobEval.Joint`).
      Joint: SplicedEval.SplicedMetrics option
      Steps: int
      /// Tokens each coder trained on.
      Tokens: int64
      /// The step training resumed from (None: it started fresh).
      ResumedFrom: int option
      TrainSeconds: float
      EvalSeconds: float }

/// A coder that does not fit the model, a run that cannot resume, a diverged coder: the message says which and why.
exception CoderJobError of string with
    override this.Message = this.Data0

/// One row of a metrics table (NaN where a metric was not computed).
type MetricsRow =
    { Name: string
      Kind: string
      Layers: string
      HookIn: string
      HookOut: string
      Width: int
      Activation: string
      /// TopK / BatchTopK / GroupMax k (NaN otherwise).
      K: float
      /// The sparsity coefficient λ (NaN for TopK coders, which have none).
      Lambda: float
      Tokens: int64
      L0: float
      Fvu: float
      Mse: float
      NormalizedMse: float
      CosineSimilarity: float
      DeadFraction: float
      DenseFraction: float
      CeClean: float
      CeSpliced: float
      CeAblated: float
      CeRecovered: float
      KlToClean: float
      KlRecovered: float
      Top1Agreement: float }

/// Metrics tables (CSV for plots, markdown for reading).
module MetricsTable =
    let private inv (v: float) = if Double.IsNaN v then "" else v.ToString("G6", CultureInfo.InvariantCulture)

    let private csvField (s: string) =
        if s.IndexOfAny([| ','; '"'; '\n' |]) >= 0 then "\"" + s.Replace("\"", "\"\"") + "\"" else s

    /// The activation's name and its k (NaN when it has none).
    let activationOf (c: CoderConfig) =
        match c.Activation with
        | ReLU -> "relu", nan
        | JumpReLU _ -> "jumprelu", nan
        | TopK k -> "topk", float k
        | BatchTopK k -> "batchtopk", k
        | GroupMax k -> "groupmax", float k

    /// The row of a coder result.
    let row (r: CoderResult) : MetricsRow =
        let c = r.Config
        let act, k = activationOf c
        let lambda =
            match c.Activation, r.Train with
            | (TopK _ | BatchTopK _), _ -> nan
            | _, Some t -> t.Loss.SparsityCoefficient
            | _, None -> nan
        let m f = match r.Metrics with Some e -> f e | None -> nan
        let s f = match r.Spliced with Some e -> f e | None -> nan
        { Name = r.Name; Kind = CoderConfig.kindName c.Kind
          Layers = String.Join("-", c.Layers |> Array.map string)
          HookIn = String.Join(";", c.HookIn); HookOut = String.Join(";", c.HookOut)
          Width = c.DSae; Activation = act; K = k; Lambda = lambda
          Tokens = (match r.LastLog with Some l -> l.Tokens | None -> 0L)
          L0 = m (fun e -> e.L0); Fvu = m (fun e -> e.Fvu); Mse = m (fun e -> e.Mse); NormalizedMse = m (fun e -> e.NormalizedMse)
          CosineSimilarity = m (fun e -> e.CosineSimilarity); DeadFraction = m (fun e -> e.DeadFraction)
          DenseFraction = m (fun e -> e.DenseFraction)
          CeClean = s (fun e -> e.CeClean); CeSpliced = s (fun e -> e.CeSpliced); CeAblated = s (fun e -> e.CeAblated)
          CeRecovered = s (fun e -> e.CeRecovered); KlToClean = s (fun e -> e.KlToClean)
          KlRecovered = s (fun e -> e.KlRecovered); Top1Agreement = s (fun e -> e.Top1Agreement) }

    let private columns : (string * (MetricsRow -> string)) list =
        [ "name", (fun r -> r.Name); "kind", (fun r -> r.Kind); "layers", (fun r -> r.Layers)
          "hook_in", (fun r -> r.HookIn); "hook_out", (fun r -> r.HookOut); "width", (fun r -> string r.Width)
          "activation", (fun r -> r.Activation); "k", (fun r -> inv r.K); "lambda", (fun r -> inv r.Lambda)
          "tokens", (fun r -> string r.Tokens); "l0", (fun r -> inv r.L0); "fvu", (fun r -> inv r.Fvu)
          "mse", (fun r -> inv r.Mse); "nmse", (fun r -> inv r.NormalizedMse); "cosine", (fun r -> inv r.CosineSimilarity)
          "dead_fraction", (fun r -> inv r.DeadFraction); "dense_fraction", (fun r -> inv r.DenseFraction)
          "ce_clean", (fun r -> inv r.CeClean); "ce_spliced", (fun r -> inv r.CeSpliced); "ce_ablated", (fun r -> inv r.CeAblated)
          "ce_recovered", (fun r -> inv r.CeRecovered); "kl", (fun r -> inv r.KlToClean); "kl_recovered", (fun r -> inv r.KlRecovered); "top1_agreement", (fun r -> inv r.Top1Agreement) ]

    /// CSV text with a header line (numbers in invariant culture, empty where not computed).
    let csv (rows: MetricsRow list) =
        let lines =
            [ yield String.Join(",", columns |> List.map fst)
              for r in rows -> String.Join(",", columns |> List.map (fun (_, f) -> csvField (f r))) ]
        String.Join("\n", lines) + "\n"

    let private fmt (digits: int) (v: float) = if Double.IsNaN v then "–" else v.ToString("F" + string digits, CultureInfo.InvariantCulture)

    /// A markdown table of the main metrics.
    let markdown (rows: MetricsRow list) =
        let header = [ "coder"; "kind"; "layer"; "width"; "k / λ"; "L0"; "FVU"; "MSE"; "CE clean"; "CE spliced"; "CE ablated"; "CE rec."; "KL"; "top-1"; "dead" ]
        let sparsity (r: MetricsRow) =
            if not (Double.IsNaN r.K) then sprintf "k=%s" (r.K.ToString("G4", CultureInfo.InvariantCulture))
            elif not (Double.IsNaN r.Lambda) then sprintf "λ=%s" (r.Lambda.ToString("G3", CultureInfo.InvariantCulture))
            else "–"
        let cells (r: MetricsRow) =
            [ r.Name; r.Kind; r.Layers; string r.Width; sparsity r; fmt 1 r.L0; fmt 3 r.Fvu; fmt 4 r.Mse
              fmt 4 r.CeClean; fmt 4 r.CeSpliced; fmt 4 r.CeAblated; fmt 3 r.CeRecovered; fmt 4 r.KlToClean
              fmt 3 r.Top1Agreement; fmt 3 r.DeadFraction ]
        let line (xs: string list) = "| " + String.Join(" | ", xs) + " |"
        String.Join("\n", [ yield line header; yield line (header |> List.map (fun _ -> "---")); for r in rows -> line (cells r) ]) + "\n"

/// Recommended training settings for coders on small models (validated on stories260K, see the sweep in the
/// project's notes): activations normalised to E‖x‖ = √d, biases from the data mean, Adam with a short warm-up and a
/// linear decay over the last 20% (Anthropic).
module CoderDefaults =
    /// The learning rate for `dSae` features: 8e-4·√(16384/d_sae), capped at 4e-3 (sparsify's 1/√d_sae scaling; the
    /// constant measured on stories260K, where 4e-3 beat 2e-3 and 8e-4 for d_sae 1,024 in runs of 600k tokens; for
    /// GPT-2 small's 24,576 features it gives 6.5e-4, near the transcoder paper's 4e-4).
    let lr (dSae: int) = min 4e-3 (8e-4 * sqrt (16384.0 / float dSae))

    /// sparsify's TopK recipe: FVU + AuxK (k_aux = d_in/2, coefficient 1/32), learning rate `lr`.
    let topK (dIn: int) (dSae: int) (steps: int) (batch: int) : TrainConfig =
        { TrainConfig.Paper with
            Steps = steps; BatchSize = batch
            Lr = lr dSae
            Schedule = { WarmupSteps = max 1 (min 1000 (steps / 20)); DecayFraction = 0.2; FinalFraction = 0.0 }
            Loss = LossConfig.TopK(max 1 (dIn / 2))
            DeadAfterTokens = max 1L (min 10_000_000L (int64 steps * int64 batch / 4L))
            Normalise = true; NormalisationBatches = 1; BiasInit = Normalisation.MeanBias; BiasInitBatches = 1
            LogEvery = max 1 (steps / 100); DensityWindowSteps = 0
            Compute = ComputeOptions.Default }

    /// The transcoder paper's ReLU recipe on normalised activations: MSE (summed over dimensions) + λ·L1 with
    /// unit-norm decoders, ghost grads for dead features, the same optimiser settings as `topK`.
    let relu (lambda: float) (dIn: int) (dSae: int) (steps: int) (batch: int) : TrainConfig =
        { topK dIn dSae steps batch with
            Loss = { Reconstruction = Mse; Sparsity = L1 false; SparsityCoefficient = lambda
                     PreActCoefficient = 0.0; PreActDeadOnly = true; Auxiliary = GhostGrads } }

    /// The recommended training settings for a coder configuration: `topK` for TopK/BatchTopK coders, `relu` with
    /// λ = `lambda` for ReLU coders, and for JumpReLU coders `relu`'s optimiser with Anthropic's loss (MSE +
    /// λ·tanh(4·‖W_dec‖·a) + 3e-6 pre-activation loss).
    let forCoder (c: CoderConfig) (lambda: float) (steps: int) (batch: int) : TrainConfig =
        match c.Activation with
        | TopK _ | BatchTopK _ | GroupMax _ -> topK c.DIn c.DSae steps batch
        | ReLU -> relu lambda c.DIn c.DSae steps batch
        | JumpReLU _ -> { relu lambda c.DIn c.DSae steps batch with Loss = LossConfig.Anthropic lambda }

/// Training coders on a model end to end: one activation stream feeds every coder (each with its own optimiser),
/// metrics are logged as JSONL, checkpoints resume exactly, coders are saved with `CoderFile.save` and evaluated on
/// held-out activations (`CoderEval`) and spliced into the model on validation text (`SplicedEval`).
module CoderJobs =
    let private fail fmt = Printf.kprintf (fun s -> raise (CoderJobError s)) fmt

    let private json (o: JsonNode) = o.ToJsonString(JsonSerializerOptions(WriteIndented = true))

    /// The block index of a `blocks.{l}.…` hook.
    let private hookLayer (hook: string) =
        if hook.StartsWith "blocks." then
            match Int32.TryParse(hook.Split('.')[1]) with
            | true, l -> Some l
            | _ -> None
        else None

    /// The hooks a coder reads and predicts, as the activation layer names them.
    let hooksOf (name: string) (c: CoderConfig) : CoderHooks =
        CoderHooks.crossLayer name (List.ofArray c.HookIn) (List.ofArray c.HookOut)

    /// Every problem that keeps `job` from training on `model` (empty when it fits): an invalid configuration, a
    /// hook the model does not have, a hook at another layer than the coder's, widths that differ from the model's
    /// activations, an invalid training configuration.
    let problems (model: Transformer) (job: CoderJob) : string list =
        let c = job.Coder
        let known = HookNames.all model.Config
        let configProblems = CoderConfig.problems c
        let unknown =
            [ for h in Array.append c.HookIn c.HookOut |> Array.distinct do
                  if not (List.contains h known) then
                      let hint = try HookNames.resolveAmong known h |> ignore; "globs are not allowed" with e -> e.Message
                      yield sprintf "hook '%s' is not a hook point of this model: %s" h hint ]
        let layers =
            [ for i in 0 .. min c.Layers.Length c.HookIn.Length - 1 do
                  for h in [ c.HookIn[i]; (if i < c.HookOut.Length then c.HookOut[i] else c.HookIn[i]) ] do
                      match hookLayer h with
                      | Some l when l <> c.Layers[i] -> yield sprintf "hook '%s' is in block %d, but the coder's layer %d is %d" h l i c.Layers[i]
                      | _ -> () ]
        let widths =
            if not configProblems.IsEmpty || not unknown.IsEmpty then []
            else
                let w = ActivationStore.Widths(model, List.ofArray (Array.append c.HookIn c.HookOut |> Array.distinct))
                [ for h in c.HookIn do
                      if w[h] <> int64 c.DIn then yield sprintf "d_in is %d, but the model's '%s' has width %d" c.DIn h w[h]
                  for h in c.HookOut do
                      if w[h] <> int64 c.DOut then yield sprintf "d_out is %d, but the model's '%s' has width %d" c.DOut h w[h] ]
        configProblems @ unknown @ layers @ widths @ job.Train.Problems

    /// Fails with `CoderJobError` listing every problem of every job (see `problems`), duplicate or unusable names,
    /// and batch sizes that differ from the store's.
    let validate (model: Transformer) (store: StoreConfig) (jobs: CoderJob list) =
        if jobs.IsEmpty then fail "no coders to train"
        let issues =
            [ for name, n in jobs |> List.countBy (fun j -> j.Name) do
                  if n > 1 then yield sprintf "coder name '%s' is used %d times" name n
              for j in jobs do
                  if String.IsNullOrWhiteSpace j.Name || j.Name.IndexOfAny(Path.GetInvalidFileNameChars()) >= 0
                     || j.Name = "checkpoint" || j.Name.StartsWith "." then
                      yield sprintf "coder name '%s' cannot be a folder name (no path separators, not 'checkpoint')" j.Name
                  if j.Train.BatchSize <> int store.Buffer.BatchSize then
                      yield sprintf "coder '%s': Train.BatchSize %d differs from the store's batch size %d (one stream feeds every coder)" j.Name j.Train.BatchSize store.Buffer.BatchSize
                  for p in problems model j do yield sprintf "coder '%s': %s" j.Name p ]
        if not issues.IsEmpty then
            raise (CoderJobError("the coders do not fit the model:\n  " + String.Join("\n  ", issues)))

    /// The coder's (input, target) of a batch: [B, d] for one layer, [B, L, d] for a cross-layer transcoder.
    let pair (c: CoderConfig) (batch: Batch) : torch.Tensor * torch.Tensor =
        let pick (hooks: string[]) =
            if hooks.Length = 1 then (Batch.hook hooks[0] batch).alias()
            else torch.stack([| for h in hooks -> Batch.hook h batch |], 1L)
        pick c.HookIn, pick c.HookOut

    // ------------------------------------------------------------------------------------------ run description

    let private trainJson (t: TrainConfig) =
        let o = JsonObject()
        o["steps"] <- t.Steps
        o["batch_size"] <- t.BatchSize
        o["lr"] <- t.Lr
        o["betas"] <- JsonArray(JsonValue.Create t.Beta1, JsonValue.Create t.Beta2)
        o["eps"] <- t.Eps
        o["schedule"] <- sprintf "%A" t.Schedule
        o["loss"] <- sprintf "%A" t.Loss
        o["sparsity_warmup_steps"] <- t.SparsityWarmupSteps
        o["dead_after_tokens"] <- t.DeadAfterTokens
        o["resampling"] <- sprintf "%A" t.Resampling
        o["normalise"] <- t.Normalise
        o["normalisation_batches"] <- t.NormalisationBatches
        o["bias_init"] <- sprintf "%A" t.BiasInit
        o["bias_init_batches"] <- t.BiasInitBatches
        o["batchtopk_momentum"] <- t.BatchTopKMomentum
        o["seed"] <- t.Seed
        o["log_every"] <- t.LogEvery
        o["density_window_steps"] <- t.DensityWindowSteps
        o

    /// The run description saved as `run.json`: a checkpoint resumes only under the same description.
    let private describe (store: ActivationStore) (config: JobsConfig) (jobs: CoderJob list) =
        let o = JsonObject()
        o["format"] <- "transcoders.coder-run"
        o["version"] <- 1
        let src = JsonObject()
        for KeyValue(k, v) in store.Provenance do src[k] <- v
        o["source"] <- src
        let s = config.Store
        let st = JsonObject()
        st["ctx"] <- s.Ctx
        st["pass_rows"] <- s.PassRows
        st["buffer_rows"] <- s.Buffer.Rows
        st["batch_size"] <- s.Buffer.BatchSize
        st["mix"] <- s.Buffer.Mix
        st["buffer_seed"] <- s.Buffer.Seed
        st["storage_dtype"] <- string s.Buffer.StorageDType
        st["cache"] <- (match config.Cache with Some c -> Path.GetFullPath c.Dir | None -> "")
        o["store"] <- st
        let arr = JsonArray()
        for j in jobs do
            let e = JsonObject()
            e["name"] <- j.Name
            e["coder"] <- CoderConfig.toJsonNode j.Coder
            e["train"] <- trainJson j.Train
            arr.Add e
        o["coders"] <- arr
        json o

    // ------------------------------------------------------------------------------------------ checkpoints

    // Checkpoints go through Training's `Checkpointing` (atomic folders with a manifest of checksums, the newest
    // intact one resumed, older ones kept): every coder's parameters under "{name}/" in model.safetensors, its
    // BatchTopK threshold and firing statistics as buffers, its AdamW state under "{name}/" in
    // optimizer.safetensors, the shuffle buffer as the extra file buffer.safetensors, and per coder its step,
    // configuration (with the normalisation scale) and firing-window counters in trainer.json's state.

    let private checkpointDir (config: JobsConfig) = Path.Combine(config.Out, "checkpoint")
    let [<Literal>] private BufferFile = "buffer.safetensors"

    let private prefix (job: CoderJob) = job.Name + "/"

    /// The live tensors of a coder's training state that a checkpoint holds (loading copies into them):
    /// parameters, and as buffers the BatchTopK threshold and the firing statistics.
    let private stateTensors (job: CoderJob) (s: TrainState) =
        let p = prefix job
        [ for n, t in s.Coder.NamedParameters -> p + n, t :> torch.Tensor ],
        [ match s.Coder.BatchTopKThreshold with
          | Some t -> yield p + "batchtopk_threshold", t
          | None -> ()
          yield p + "stats.since_fired", s.Stats.TokensSinceFired
          yield p + "stats.counts", s.Stats.Counts ]

    /// Writes every coder's training state and the buffer's state as the checkpoint after `step` steps, and prunes
    /// the oldest beyond `KeepCheckpoints`. Returns its folder.
    let private saveCheckpoint (config: JobsConfig) (description: string) (step: int) (elapsed: float) (buffer: ShuffleBuffer)
                               (states: (CoderJob * TrainState) list) =
        let root = checkpointDir config
        let coders = JsonArray()
        for job, s in states do
            let o = JsonObject()
            o["name"] <- job.Name
            o["step"] <- s.Step
            o["config"] <- CoderConfig.toJsonNode s.Coder.Config
            o["window_tokens"] <- s.Stats.WindowTokens
            o["total_tokens"] <- s.Stats.TotalTokens
            coders.Add o
        let state = JsonObject()
        state["coders"] <- coders
        let info: Checkpointing.Info =
            { Step = step; Tokens = int64 step * config.Store.Buffer.BatchSize; ElapsedSeconds = elapsed
              Config = JsonNode.Parse(description).AsObject(); Metadata = Map.empty; State = state }
        let parameters, buffers = states |> List.map (fun (j, s) -> stateTensors j s) |> List.unzip
        let folder =
            Checkpointing.saveWith root info (List.concat parameters) (List.concat buffers)
                [ for j, s in states -> prefix j, s.Optimizer ]
                [ { File = BufferFile; Write = fun path -> buffer.SaveState path } ]
        Checkpointing.prune root config.KeepCheckpoints
        folder

    /// Every job's training state from a checkpoint folder that `Checkpointing.newestIntact` verified (with its `info`).
    let private loadStates (folder: string) (info: Checkpointing.Info) (jobs: CoderJob list) (device: torch.Device) =
        let path = Path.Combine(folder, Checkpointing.TrainerFile)
        let saved =
            match info.State["coders"] with
            | :? JsonArray as a -> [ for o in a -> o["name"].GetValue<string>(), o.AsObject() ] |> Map.ofList
            | _ -> fail "%s: the checkpoint holds no coder states" path
        let states = Collections.Generic.List<CoderJob * TrainState * JsonObject>()
        try
            for job in jobs do
                let o =
                    match saved.TryFind job.Name with
                    | Some o -> o
                    | None -> fail "%s: the checkpoint has no state for coder '%s'" path job.Name
                let cfg = CoderConfig.ofJsonNode (sprintf "%s coder '%s'" path job.Name) (o["config"].AsObject())
                if { cfg with Scale = job.Coder.Scale; FoldedScale = job.Coder.FoldedScale } <> job.Coder then
                    fail "%s: coder '%s' was saved with another configuration" path job.Name
                let coder = Coder.create cfg device
                try states.Add((job, CoderTraining.init job.Train coder, o))
                with _ ->
                    (coder :> IDisposable).Dispose()
                    reraise ()
            let parameters, buffers = [ for j, s, _ in states -> stateTensors j s ] |> List.unzip
            (try
                Checkpointing.loadVerifiedWith folder info (List.concat parameters) (List.concat buffers) [ for j, s, _ in states -> prefix j, s.Optimizer ]
             with Checkpointing.CheckpointError (p, problem) -> fail "%s: %s" p problem)
            [ for j, s, o in states do
                  s.Stats.LoadStateDict(s.Stats.TokensSinceFired, s.Stats.Counts, o["window_tokens"].GetValue<int64>(),
                                        o["total_tokens"].GetValue<int64>())
                  s.Step <- o["step"].GetValue<int>()
                  yield j, s ]
        with _ ->
            for _, s, _ in states do
                (s :> IDisposable).Dispose()
                (s.Coder :> IDisposable).Dispose()
            reraise ()

    // ------------------------------------------------------------------------------------------ evaluation

    /// Evaluates named coders on `model`: `CoderEval` metrics on `eval.ActivationRows` held-out rows of the
    /// validation text (taken as `store` takes training rows, unshuffled), and `SplicedEval` on `eval.SplicedRows`
    /// validation rows; with `eval.Joint`, also every transcoder at once. Coders must be on the model's device.
    let evaluate (model: Transformer) (text: ModelText) (store: StoreConfig) (eval: JobEval) (onProgress: JobsProgress -> unit)
                 (coders: (string * Coder) list) : (string * EvalResult option * SplicedEval.SplicedMetrics option) list * SplicedEval.SplicedMetrics option =
        if coders.IsEmpty then [], None
        else
        let spec = { Coders = [ for n, c in coders -> hooksOf n c.Config ] }
        let metrics =
            if eval.ActivationRows <= 0L then coders |> List.map (fun (n, _) -> n, None)
            else
                onProgress (Preparing(sprintf "collecting %d held-out activation rows" eval.ActivationRows))
                let valStore = ActivationStore(model, text.Validation, text.Bos, spec, { store with Rows = Packed; TextSeed = 0L }, text.Name + " (validation)")
                let rows = valStore.Collect eval.ActivationRows
                try
                    let n = Rows.count rows
                    let b = max 1L store.Buffer.BatchSize
                    [ for name, c in coders ->
                        onProgress (Evaluating name)
                        let batches =
                            seq {
                                for start in 0L .. b .. n - 1L do
                                    let part = rows |> Map.map (fun _ t -> t.narrow(0L, start, min b (n - start)))
                                    yield pair c.Config part
                            }
                        use _ = torch.NewDisposeScope()
                        name, Some(CoderEval.evaluate c batches) ]
                finally Rows.dispose rows
        let transcoders =
            coders |> List.map snd |> List.filter (fun c -> c.Config.Kind = Transcoder || c.Config.Kind = SkipTranscoder)
        let jointWanted =
            let outs = transcoders |> List.collect (fun c -> List.ofArray c.Config.HookOut)
            eval.Joint && transcoders.Length > 1 && List.distinct outs = outs
        let spliced =
            if eval.SplicedRows <= 0 then None
            else
                onProgress (Evaluating(sprintf "%d coder(s) spliced into the model" coders.Length))
                let validation = ModelText.validationRows text store.Ctx eval.SplicedRows
                let sets = [ for _, c in coders -> [ c ] ] @ (if jointWanted then [ transcoders ] else [])
                Some(SplicedEval.evaluateMany model sets (ModelText.tokenBatches model.Device eval.SplicedBatch validation))
        let results =
            [ for i, ((name, m), _) in List.indexed (List.zip metrics coders) -> name, m, spliced |> Option.map (fun s -> s[i]) ]
        let joint = if jointWanted then spliced |> Option.map List.last else None
        results, joint

    let private evalJson (r: CoderResult) =
        let o = JsonObject()
        o["name"] <- r.Name
        o["coder"] <- CoderConfig.toJsonNode r.Config
        match r.Metrics with
        | Some e ->
            let m = JsonObject()
            m["tokens"] <- e.Tokens
            m["l0"] <- JsonNumbers.node e.L0
            m["l0_per_layer"] <- JsonArray([| for v in e.L0PerLayer -> JsonNumbers.node v |])
            m["mse"] <- JsonNumbers.node e.Mse
            m["normalized_mse"] <- JsonNumbers.node e.NormalizedMse
            m["fvu"] <- JsonNumbers.node e.Fvu
            m["fvu_per_layer"] <- JsonArray([| for v in e.FvuPerLayer -> JsonNumbers.node v |])
            m["variance_explained"] <- JsonNumbers.node e.VarianceExplained
            m["cosine_similarity"] <- JsonNumbers.node e.CosineSimilarity
            m["dead_fraction"] <- JsonNumbers.node e.DeadFraction
            m["dense_fraction"] <- JsonNumbers.node e.DenseFraction
            let h = JsonObject()
            h["edges_log10"] <- JsonArray([| for v in e.Histogram.Edges -> JsonValue.Create v :> JsonNode |])
            h["counts"] <- JsonArray([| for v in e.Histogram.Counts -> JsonValue.Create v :> JsonNode |])
            h["dead"] <- e.Histogram.Dead
            m["density_histogram"] <- h
            o["activations"] <- m
        | None -> ()
        match r.Spliced with
        | Some s ->
            let m = JsonObject()
            m["tokens"] <- s.Tokens
            m["ce_clean"] <- JsonNumbers.node s.CeClean
            m["ce_spliced"] <- JsonNumbers.node s.CeSpliced
            m["ce_ablated"] <- JsonNumbers.node s.CeAblated
            m["ce_recovered"] <- JsonNumbers.node s.CeRecovered
            m["ce_delta"] <- JsonNumbers.node s.CeDelta
            m["kl_to_clean"] <- JsonNumbers.node s.KlToClean
            m["kl_ablated"] <- JsonNumbers.node s.KlAblated
            m["kl_recovered"] <- JsonNumbers.node s.KlRecovered
            m["top1_agreement_ablated"] <- JsonNumbers.node s.Top1AgreementAblated
            m["logit_cosine"] <- JsonNumbers.node s.LogitCosine
            m["top1_agreement"] <- JsonNumbers.node s.Top1Agreement
            o["spliced"] <- m
        | None -> ()
        json o

    /// Writes `metrics.csv` and `metrics.md` for `results` (plus the joint replacement, when evaluated) into `out`.
    let writeMetrics (out: string) (results: CoderResult list) (joint: SplicedEval.SplicedMetrics option) =
        Directory.CreateDirectory out |> ignore
        let rows = results |> List.map MetricsTable.row
        AtomicFile.writeAllText (Path.Combine(out, "metrics.csv")) (MetricsTable.csv rows)
        let jointText =
            match joint with
            | Some j ->
                sprintf "\nEvery transcoder spliced at once (%d tokens): CE clean %.4f, spliced %.4f, ablated %.4f, CE recovered %.3f, KL %.4f, top-1 agreement %.3f\n"
                    j.Tokens j.CeClean j.CeSpliced j.CeAblated j.CeRecovered j.KlToClean j.Top1Agreement
            | None -> ""
        AtomicFile.writeAllText (Path.Combine(out, "metrics.md")) (MetricsTable.markdown rows + jointText)

    // ------------------------------------------------------------------------------------------ the run

    /// Trains `jobs` on `model` over `text` (see the module doc), evaluates them, and writes into `config.Out`:
    /// `run.json` (the run description), `<name>/coder.safetensors` + `coder.json` (`CoderFile`), `<name>/log.jsonl`
    /// (one line per logged step), `<name>/eval.json`, `metrics.csv`, `metrics.md` and `checkpoint/`. A run whose
    /// latest checkpoint is its last step only evaluates. A diverging coder stops the run with the last checkpoint kept.
    let run (model: Transformer) (text: ModelText) (jobs: CoderJob list) (config: JobsConfig) (onProgress: JobsProgress -> unit) : JobsResult =
        ModelText.checkFits model.Config text
        validate model config.Store jobs
        let spec = { Coders = [ for j in jobs -> hooksOf j.Name j.Coder ] }
        let store = ActivationStore(model, text.Train, text.Bos, spec, config.Store, text.Name + " (train)")
        let device = config.Store.Buffer.ServeDevice
        Directory.CreateDirectory config.Out |> ignore
        let description = describe store config jobs
        let runFile = Path.Combine(config.Out, "run.json")
        let maxSteps = jobs |> List.map (fun j -> j.Train.Steps) |> List.max
        let root = checkpointDir config
        let resumeFrom =
            if not config.Resume then
                if Directory.Exists root then Directory.Delete(root, true)
                None
            else
                if File.Exists(Path.Combine(root, "latest.json")) then
                    fail "%s holds a checkpoint of an older version of this program, which cannot be resumed: start over (JobsConfig.Resume = false; --no-resume on the command line)" config.Out
                let found, skipped =
                    try Checkpointing.newestIntact root
                    with Checkpointing.CheckpointError (p, problem) -> fail "%s: %s" p problem
                for d, why in skipped do
                    onProgress (Preparing(sprintf "skipped checkpoint %s: %s" d why))
                match found with
                | Some(folder, info) ->
                    let saved = if File.Exists runFile then File.ReadAllText runFile else ""
                    if saved <> description then
                        let a = saved.Split('\n')
                        let b = description.Split('\n')
                        let i = Seq.zip a b |> Seq.tryFindIndex (fun (x, y) -> x <> y) |> Option.defaultValue (min a.Length b.Length)
                        fail "%s holds a checkpoint of another run (run.json differs at line %d: '%s' here, '%s' now): use another output folder, or start over (JobsConfig.Resume = false; --no-resume on the command line)"
                            config.Out (i + 1) (if i < a.Length then a[i].Trim() else "") (if i < b.Length then b[i].Trim() else "")
                    Some(info.Step, folder, info)
                | None -> None
        AtomicFile.writeAllText runFile description
        let logPath (j: CoderJob) = Path.Combine(config.Out, j.Name, "log.jsonl")
        let cacheRows = int64 maxSteps * config.Store.Buffer.BatchSize
        let sw = Stopwatch.StartNew()
        let buffer, states, prefetched =
            match resumeFrom with
            | Some(step, folder, info) ->
                onProgress (Preparing(sprintf "resuming from the checkpoint at step %d (%s)" step folder))
                let states = loadStates folder info jobs device
                let buffer =
                    try store.ResumeBuffer(Path.Combine(folder, BufferFile), ?cache = config.Cache)
                    with _ ->
                        for _, s in states do
                            (s :> IDisposable).Dispose()
                            (s.Coder :> IDisposable).Dispose()
                        reraise ()
                // the log lines of steps after the checkpoint are written again
                for j in jobs do Metrics.truncate (logPath j) (fun s -> s < step)
                buffer, states, [||]
            | None ->
                if config.Cache.IsSome then onProgress (Preparing(sprintf "caching %d activation rows" cacheRows))
                let buffer = store.OpenBuffer(?cache = config.Cache, cacheRows = cacheRows)
                let needed =
                    jobs
                    |> List.map (fun j ->
                        max (if j.Train.Normalise then j.Train.NormalisationBatches else 0)
                            (if j.Train.BiasInit <> Normalisation.ZeroBias then j.Train.BiasInitBatches else 0))
                    |> List.max
                onProgress (Preparing(sprintf "filling the shuffle buffer (%d rows)" config.Store.Buffer.Rows))
                let prefetched = Collections.Generic.List<Batch>()
                let created = Collections.Generic.List<CoderJob * TrainState>()
                try
                    for _ in 1 .. needed do
                        match buffer.Next() with
                        | Some b -> prefetched.Add(b |> Map.map (fun _ t -> t.DetachFromDisposeScope()))
                        | None -> fail "the activation source ended before the first batches"
                    for j in jobs do
                        onProgress (Preparing(sprintf "initialising coder '%s'" j.Name))
                        Transcoders.Tensors.Device.seed j.Train.Seed
                        let coder = Coder.create j.Coder device
                        try
                            CoderTraining.prepare j.Train coder (fun i -> pair j.Coder prefetched[i])
                            (use _ = torch.NewDisposeScope()
                             let x, y = pair j.Coder prefetched[0]
                             let centred = j.Coder.InputBias && j.Train.BiasInit <> Normalisation.ZeroBias
                             onProgress (Preparing(sprintf "coder '%s': %s" j.Name (Normalisation.meanStdReport coder centred x y))))
                            created.Add((j, CoderTraining.init j.Train coder))
                        with _ ->
                            (coder :> IDisposable).Dispose()
                            reraise ()
                with _ ->
                    for _, st in created do
                        (st :> IDisposable).Dispose()
                        (st.Coder :> IDisposable).Dispose()
                    for b in prefetched do Batch.dispose b
                    (buffer :> IDisposable).Dispose()
                    reraise ()
                let states = List.ofSeq created
                let prefetched = prefetched.ToArray()
                for j in jobs do
                    Directory.CreateDirectory(Path.Combine(config.Out, j.Name)) |> ignore
                    AtomicFile.writeAllText (logPath j) ""
                buffer, states, prefetched
        let startStep = match resumeFrom with Some(s, _, _) -> s | None -> 0
        let elapsed0 = match resumeFrom with Some(_, _, info) -> info.ElapsedSeconds | None -> 0.0
        let lastLogs = Collections.Generic.Dictionary<string, StepLog>()
        let mutable lastCheckpoint = resumeFrom |> Option.map (fun (s, folder, _) -> s, folder)
        let writers =
            jobs |> List.map (fun j ->
                Directory.CreateDirectory(Path.Combine(config.Out, j.Name)) |> ignore
                j.Name, new Metrics.Log(logPath j))
            |> dict
        try
            try
                for s in startStep .. maxSteps - 1 do
                    use scope = torch.NewDisposeScope()
                    let batch =
                        if s < prefetched.Length then prefetched[s]
                        else
                            match buffer.Next() with
                            | Some b -> b
                            | None -> fail "the activation source ran out at step %d" s
                    let logged = Collections.Generic.List<string * StepLog>()
                    for job, state in states do
                        if state.Step < job.Train.Steps then
                            use stepScope = torch.NewDisposeScope()
                            let x, y = pair job.Coder batch
                            let log =
                                try CoderTraining.stepWith state (fun _ -> x, y) x y
                                with CoderTrainingError msg ->
                                    fail "coder '%s' stopped: %s. No coder was saved. %s" job.Name msg
                                        (match lastCheckpoint with
                                         | Some (c, folder) -> sprintf "The last good checkpoint is %s (step %d)" folder c
                                         | None -> "No checkpoint was written yet")
                            lastLogs[job.Name] <- log
                            if CoderTraining.isLogged job.Train log then
                                writers[job.Name].WriteLine(CoderTraining.logLine log)
                                logged.Add((job.Name, log))
                    onProgress (Trained(s + 1, maxSteps, int64 (s + 1) * config.Store.Buffer.BatchSize, List.ofSeq logged))
                    let stopping = config.Stop.IsCancellationRequested && s + 1 < maxSteps && s + 1 >= prefetched.Length
                    let due = s + 1 = maxSteps || (config.CheckpointEvery > 0 && (s + 1) % config.CheckpointEvery = 0) || stopping
                    if due && s + 1 >= prefetched.Length then
                        let folder = saveCheckpoint config description (s + 1) (elapsed0 + sw.Elapsed.TotalSeconds) buffer states
                        lastCheckpoint <- Some(s + 1, folder)
                        onProgress (Checkpointed(s + 1, folder))
                    if stopping then raise (OperationCanceledException(sprintf "stopped after the checkpoint at step %d" (s + 1)))
            finally
                for w in writers.Values do (w :> IDisposable).Dispose()
                for b in prefetched do Batch.dispose b
                (buffer :> IDisposable).Dispose()
            let trainSeconds = sw.Elapsed.TotalSeconds
            // Save (scales and input biases folded), then evaluate what was saved, on the model's device.
            for job, state in states do
                CoderFile.save (Path.Combine(config.Out, job.Name)) state.Coder
            let evalWatch = Stopwatch.StartNew()
            let loaded = [ for job, _ in states -> job.Name, CoderFile.load (Path.Combine(config.Out, job.Name)) model.Device ]
            try
                let evaluated, joint = evaluate model text config.Store config.Eval onProgress loaded
                let results =
                    [ for (job, _), (_, metrics, spliced), (_, coder) in List.zip3 states evaluated loaded ->
                        { Name = job.Name
                          Path = Path.Combine(config.Out, job.Name)
                          Config = coder.Config
                          Train = Some job.Train
                          LastLog =
                            (match lastLogs.TryGetValue job.Name with
                             | true, l -> Some l
                             | _ -> Metrics.tryLast CoderTraining.parseLogLine (logPath job)) // resumed at the end: the log's last line
                          Metrics = metrics
                          Spliced = spliced } ]
                for r in results do
                    AtomicFile.writeAllText (Path.Combine(r.Path, "eval.json")) (evalJson r)
                    SaeLensMetrics.write r.Path (SaeLensMetrics.ofResults r.Metrics r.Spliced)
                    match r.Metrics with
                    | Some e ->
                        use flat = torch.tensor(Array.concat e.Frequencies |> Array.map float32)
                        use f = flat.reshape(int64 e.Frequencies.Length, int64 r.Config.DSae)
                        Safetensors.save (Path.Combine(r.Path, "feature_frequencies.safetensors")) (Map.ofList [ "format", "pt" ]) [ "frequency", f ]
                    | None -> ()
                writeMetrics config.Out results joint
                { Coders = results; Joint = joint; Steps = maxSteps; Tokens = int64 maxSteps * config.Store.Buffer.BatchSize
                  ResumedFrom = resumeFrom |> Option.map (fun (s, _, _) -> s); TrainSeconds = trainSeconds; EvalSeconds = evalWatch.Elapsed.TotalSeconds }
            finally
                for _, c in loaded do (c :> IDisposable).Dispose()
        finally
            for _, s in states do
                (s :> IDisposable).Dispose()
                (s.Coder :> IDisposable).Dispose()

    /// `run` with one training configuration for every coder; each coder is named by `nameOf`.
    let trainOnModel (model: Transformer) (text: ModelText) (coders: CoderConfig list) (train: TrainConfig) (config: JobsConfig) (onProgress: JobsProgress -> unit) : JobsResult =
        let nameOf (c: CoderConfig) =
            let layers = String.Join("-", c.Layers |> Array.map string)
            match c.Kind with
            | Sae -> sprintf "sae-%s" (c.HookIn[0].Replace("blocks.", "L").Replace(".hook_", ".").Replace(".", "-"))
            | Transcoder -> sprintf "tc-L%s" layers
            | SkipTranscoder -> sprintf "skiptc-L%s" layers
            | CrossLayerTranscoder -> sprintf "clt-L%s" layers
        run model text [ for c in coders -> { Name = nameOf c; Coder = c; Train = train } ] config onProgress
