namespace Transcoders.Coders

open System
open System.IO
open System.Text.Json
open TorchSharp
open Transcoders.Coders.Scalars
open Transcoders.Training

/// How the encoder starts.
type EncoderInit =
    /// Independent uniform draws (Kaiming), unrelated to the decoder.
    | RandomEncoder
    /// Each feature's encoder column along its own decoder row (W_enc = W_decᵀ, at the random draw's column norm),
    /// as sparsify and OpenAI initialise TopK coders: a feature starts reading the direction it writes, so every
    /// feature starts near the data it reconstructs instead of pointing away from it. Needs d_in = d_out (SAEs,
    /// transcoders of the residual width, the CLT's own-layer decoder); other coders keep the random draw.
    | DecoderTranspose

/// How a coder is trained on activation batches.
type TrainConfig =
    { Steps: int
      /// Tokens per batch the source is expected to deliver (the paper: 4,096). Used for the dead-window default only.
      BatchSize: int
      Lr: float
      Beta1: float
      Beta2: float
      Eps: float
      Schedule: LrSchedule
      Loss: LossConfig
      /// λ ramps linearly from 0 to `Loss.SparsityCoefficient` over this many steps (0 = no warm-up).
      SparsityWarmupSteps: int
      /// A feature is dead once it has not fired for this many tokens (ghost grads, AuxK, pre-act loss, resampling).
      DeadAfterTokens: int64
      Resampling: ResampleConfig option
      /// Estimate per-layer scales so that E‖x·s‖ = √d before training (folded into the weights when saving).
      Normalise: bool
      NormalisationBatches: int
      BiasInit: Normalisation.BiasInit
      BiasInitBatches: int
      EncoderInit: EncoderInit
      /// EMA momentum of the BatchTopK threshold estimate (dictionary_learning: 0.999).
      BatchTopKMomentum: float
      /// Seeds torch's generators at the start of `run` (initialisation, resampling draws).
      Seed: int64
      /// JSONL metrics log (one object per logged step), or none.
      LogPath: string option
      LogEvery: int
      /// Firing-frequency window in steps (the paper's feature_sampling_window); 0 = the whole run.
      DensityWindowSteps: int
      /// How the forward pass computes (dtype of the products, sparse decoding); float32 and dense by default.
      Compute: ComputeOptions }

    /// The transcoder paper's settings (GPT-2 small, layer 8): Adam lr 4e-4, β = (0.9, 0.999), 5,000 warm-up steps then
    /// constant, batches of 4,096 tokens, 60M tokens (14,648 steps), normalised MSE + 1.4e-4·L1 + ghost grads with a
    /// 5,000-step dead window, b_dec initialised to the data mean, no activation normalisation, seed 42.
    static member Paper =
        { Steps = 60_000_000 / 4096; BatchSize = 4096; Lr = 4e-4; Beta1 = 0.9; Beta2 = 0.999; Eps = 1e-8
          Schedule = { WarmupSteps = 5000; DecayFraction = 0.0; FinalFraction = 0.0 }
          Loss = LossConfig.Paper; SparsityWarmupSteps = 0; DeadAfterTokens = 5000L * 4096L; Resampling = None
          Normalise = false; NormalisationBatches = 0; BiasInit = Normalisation.MeanBias; BiasInitBatches = 1
          EncoderInit = RandomEncoder; BatchTopKMomentum = 0.999; Seed = 42L; LogPath = None; LogEvery = 100; DensityWindowSteps = 1000
          Compute = ComputeOptions.Default }

    /// All problems with a training configuration (empty when valid).
    member c.Problems =
        [ if c.Steps < 0 then yield sprintf "Steps must be ≥ 0 (got %d)" c.Steps
          if c.BatchSize <= 0 then yield sprintf "BatchSize must be positive (got %d)" c.BatchSize
          if not (c.Lr > 0.0 && Double.IsFinite c.Lr) then yield sprintf "Lr must be positive and finite (got %g)" c.Lr
          if not (c.Beta1 >= 0.0 && c.Beta1 < 1.0) then yield sprintf "Beta1 must be in [0, 1) (got %g)" c.Beta1
          if not (c.Beta2 >= 0.0 && c.Beta2 < 1.0) then yield sprintf "Beta2 must be in [0, 1) (got %g)" c.Beta2
          if not (c.Eps > 0.0) then yield sprintf "Eps must be positive (got %g)" c.Eps
          if c.Schedule.WarmupSteps < 0 then yield "Schedule.WarmupSteps must be ≥ 0"
          if c.Schedule.DecayFraction < 0.0 || c.Schedule.DecayFraction > 1.0 then yield "Schedule.DecayFraction must be in [0, 1]"
          if c.Schedule.FinalFraction < 0.0 || c.Schedule.FinalFraction > 1.0 then yield "Schedule.FinalFraction must be in [0, 1]"
          if c.Loss.SparsityCoefficient < 0.0 then yield "Loss.SparsityCoefficient must be ≥ 0"
          if c.Loss.PreActCoefficient < 0.0 then yield "Loss.PreActCoefficient must be ≥ 0"
          match c.Loss.Auxiliary with
          | AuxK(k, a) -> if k < 1 || a < 0.0 then yield sprintf "Loss.Auxiliary AuxK needs kAux ≥ 1 and coefficient ≥ 0 (got %d, %g)" k a
          | _ -> ()
          if c.SparsityWarmupSteps < 0 then yield "SparsityWarmupSteps must be ≥ 0"
          if c.DeadAfterTokens <= 0L then yield "DeadAfterTokens must be positive"
          if c.Normalise && c.NormalisationBatches < 1 then yield "NormalisationBatches must be ≥ 1 when Normalise is set"
          if c.BiasInit <> Normalisation.ZeroBias && c.BiasInitBatches < 1 then yield "BiasInitBatches must be ≥ 1 unless BiasInit is ZeroBias"
          if not (c.BatchTopKMomentum >= 0.0 && c.BatchTopKMomentum < 1.0) then yield "BatchTopKMomentum must be in [0, 1)"
          if c.LogEvery < 1 then yield "LogEvery must be ≥ 1"
          if c.DensityWindowSteps < 0 then yield "DensityWindowSteps must be ≥ 0"
          match c.Resampling with
          | Some r ->
              if r.EverySteps < 1 || r.Batches < 1 || not (r.EncoderScale > 0.0) then
                  yield "Resampling needs EverySteps ≥ 1, Batches ≥ 1 and EncoderScale > 0"
          | None -> () ]

/// What one training step did (host values, ready to log).
type StepLog =
    { Step: int
      /// Tokens seen so far, this step included.
      Tokens: int64
      Lr: float
      SparsityCoefficient: float
      Loss: float
      Reconstruction: float
      Sparsity: float
      PreAct: float
      Auxiliary: float
      /// Mean active features per token (per layer, averaged over layers).
      L0: float
      /// FVU of this batch in normalised units.
      Fvu: float
      /// Fraction of features dead at this step (not fired for `DeadAfterTokens`).
      DeadFraction: float
      /// Features resampled at this step.
      Resampled: int }

/// Training diverged or was fed bad data.
exception CoderTrainingError of string with
    override this.Message = this.Data0

/// The state of a training run: the coder, its optimiser and firing statistics. Everything a checkpoint needs is
/// reachable from here (`Coder.StateDict`, `Optimizer.StateTensors`, `Stats.StateDict`, `Step`).
type TrainState =
    { Config: TrainConfig
      Coder: Coder
      /// Training's AdamW (no weight decay; see `CoderOptimizer`).
      Optimizer: Optim.AdamW
      Stats: FiringStats
      mutable Step: int }

    interface IDisposable with
        member s.Dispose() =
            (s.Optimizer :> IDisposable).Dispose()
            (s.Stats :> IDisposable).Dispose()

/// Training a coder on activation batches: `prepare` (scales, biases), `step` (one optimiser step, pure apart from
/// the state it updates), `train` (the loop, JSONL log), `run` (seed, create, prepare, train).
module CoderTraining =

    let private fail fmt = Printf.kprintf (fun s -> raise (CoderTrainingError s)) fmt

    /// Layer-major, normalised copies of a user-layout batch (x [.., d_in] / [.., L, d_in], y likewise with d_out).
    let normaliseBatch (coder: Coder) (x: torch.Tensor) (y: torch.Tensor) : torch.Tensor * torch.Tensor =
        let xl = coder.ToLayerMajor(x, coder.Config.DIn, "x")
        let yl = coder.ToLayerMajor(y, coder.Config.DOut, "target")
        if xl.shape[1] <> yl.shape[1] then
            invalidArg "target" (sprintf "x and target hold different token counts (%d vs %d)" xl.shape[1] yl.shape[1])
        let xd = xl.``to``(torch.float32, coder.Device)
        let yd = yl.``to``(torch.float32, coder.Device)
        coder.NormaliseIn xd, coder.NormaliseOut yd

    /// λ at `step`: linear warm-up over `SparsityWarmupSteps`.
    let sparsityCoefficient (cfg: TrainConfig) (step: int) =
        let ramp = if cfg.SparsityWarmupSteps > 0 then min 1.0 (float (step + 1) / float cfg.SparsityWarmupSteps) else 1.0
        cfg.Loss.SparsityCoefficient * ramp

    /// Estimates activation scales (if `Normalise`) and initialises b_dec / b_in (per `BiasInit`) from the source's
    /// first batches (steps 0, 1, …).
    let prepare (cfg: TrainConfig) (coder: Coder) (source: int -> torch.Tensor * torch.Tensor) =
        if cfg.Normalise then
            use scope = torch.NewDisposeScope()
            let batches =
                [ for i in 0 .. cfg.NormalisationBatches - 1 ->
                    let x, y = source i
                    coder.ToLayerMajor(x, coder.Config.DIn, "x").``to``(torch.float32, coder.Device),
                    coder.ToLayerMajor(y, coder.Config.DOut, "target").``to``(torch.float32, coder.Device) ]
            let sIn = Normalisation.estimateScale (batches |> List.map fst)
            let sOut = if coder.Config.Kind = Sae then sIn else Normalisation.estimateScale (batches |> List.map snd)
            coder.SetScale { In = sIn; Out = sOut }
        if cfg.BiasInit <> Normalisation.ZeroBias then
            use scope = torch.NewDisposeScope()
            let pairs = [ for i in 0 .. cfg.BiasInitBatches - 1 -> let x, y = source i in normaliseBatch coder x y ]
            let xn = torch.cat((pairs |> List.map fst |> Array.ofList), 1L)
            let yn = torch.cat((pairs |> List.map snd |> Array.ofList), 1L)
            Normalisation.initBiases cfg.BiasInit coder xn yn
        match coder.Config.Decoder with
        | UnitNorm -> DecoderConstraint.renormalise coder
        | Free -> ()
        if cfg.EncoderInit = DecoderTranspose && coder.Config.DIn = coder.Config.DOut then
            use scope = torch.NewDisposeScope()
            use _ = torch.no_grad ()
            for l in 0 .. coder.NLayers - 1 do
                // W_dec_l [d_sae, L−l, d_out]: slice 0 writes to layer l itself
                let dir = coder.WDec[l].select(1, 0L).t()
                let dirNorm = dir.square().sum([| 0L |], keepdim = true).sqrt().clamp_min 1e-12
                let w = coder.WEnc[l]
                let colNorm = w.square().sum([| 0L |]).sqrt().mean()
                w.copy_(dir / dirNorm * colNorm) |> ignore

    /// A fresh training state for `coder` (Adam moments at zero, no firing history).
    let init (cfg: TrainConfig) (coder: Coder) : TrainState =
        match cfg.Problems with
        | [] -> ()
        | ps -> invalidArg "cfg" ("invalid TrainConfig: " + String.Join("; ", ps))
        match coder.Config.Activation with
        | TopK _ | GroupMax _ -> ()
        | a when cfg.Compute.SparseDecode ->
            invalidArg "cfg" (sprintf "invalid TrainConfig: Compute.SparseDecode needs a TopK or GroupMax coder (this one uses %A)" a)
        | _ -> ()
        { Config = cfg
          Coder = coder
          Optimizer = CoderOptimizer.create coder.NamedParameters cfg.Beta1 cfg.Beta2 cfg.Eps
          Stats = new FiringStats(coder.NLayers, coder.Config.DSae, coder.Device)
          Step = 0 }

    /// Folds a batch's smallest kept BatchTopK values [L] into the coder's running threshold (EMA; NaN entries skipped).
    let updateBatchTopKThreshold (coder: Coder) (minKept: torch.Tensor) (momentum: float) =
        match coder.BatchTopKThreshold with
        | Some th ->
            use _ = torch.no_grad ()
            use v = minKept.detach ()
            use thNan = th.isnan ()
            use vNan = v.isnan ()
            use ema = th.mul(sc momentum).add(v.mul(sc (1.0 - momentum)))
            use first = torch.where(thNan, v, ema)
            use next = torch.where(vNan, th, first)
            th.copy_ next |> ignore
        | None -> ()

    /// Averages, over calibration batches, the smallest positive value BatchTopK keeps per layer: the JumpReLU threshold
    /// to use with `Coder.toJumpReLU` for batch-independent inference.
    let calibrateBatchTopKThreshold (coder: Coder) (batches: (torch.Tensor * torch.Tensor) seq) : float[] =
        let sums = Array.zeroCreate coder.NLayers
        let counts = Array.zeroCreate coder.NLayers
        for x, y in batches do
            use scope = torch.NewDisposeScope()
            use _ = torch.no_grad ()
            let xn, _ = normaliseBatch coder x y
            let p = coder.PassNormalised xn
            match p.BatchMinKept with
            | Some m ->
                let v = m.cpu().data<float32>().ToArray()
                for l in 0 .. v.Length - 1 do
                    if not (Single.IsNaN v[l]) then
                        sums[l] <- sums[l] + float v[l]
                        counts[l] <- counts[l] + 1
            | None -> invalidArg "coder" (sprintf "calibrateBatchTopKThreshold needs a BatchTopK coder (this one uses %A)" coder.Config.Activation)
        Array.init coder.NLayers (fun l ->
            if counts[l] = 0 then fail "BatchTopK calibration: layer %d kept no positive activation in any batch" l
            sums[l] / float counts[l])

    /// The differentiable part of one step, computed in the caller's dispose scope.
    type StepForward =
        { /// Normalised layer-major batch.
          Xn: torch.Tensor
          Yn: torch.Tensor
          Pass: CoderPass
          Terms: LossTerms
          /// Dead features [L, d_sae] before this step.
          Dead: torch.Tensor }

    /// Forward pass and loss terms of step `state.Step` on a user-layout batch (for an SAE target = x).
    let forwardLoss (state: TrainState) (x: torch.Tensor) (y: torch.Tensor) : StepForward =
        let cfg = state.Config
        let xn, yn = normaliseBatch state.Coder x y
        let dead = state.Stats.Dead cfg.DeadAfterTokens
        // only these terms differentiate the pre-activations themselves (the rest go through activations/predictions)
        let preGradient = cfg.Loss.Auxiliary <> NoAuxiliary || cfg.Loss.PreActCoefficient > 0.0 || cfg.Loss.Sparsity = L0
        let pass = state.Coder.PassWith(xn, cfg.Compute, preGradient)
        let terms = Losses.compute cfg.Loss (sparsityCoefficient cfg state.Step) state.Coder pass yn dead
        { Xn = xn; Yn = yn; Pass = pass; Terms = terms; Dead = dead }

    /// Host values of a step's loss terms and diagnostics (one device sync): total, reconstruction, sparsity,
    /// pre-act, auxiliary, L0 (per layer, averaged), FVU, dead fraction.
    let diagnostics (f: StepForward) : float[] =
        use _ = torch.no_grad ()
        let active = match f.Pass.Active with Some a -> a.Values | None -> f.Pass.Acts
        // activations are non-negative, so sign() is the firing indicator (a float sum: no [L, B, d_sae] bool mask)
        let l0 = active.sign().sum([| 2L |], false, torch.float32).mean()
        let fvu = Losses.fvu (f.Pass.Prediction.detach ()) f.Yn
        let deadFrac = f.Dead.to_type(torch.float32).mean()
        let t = f.Terms
        let values = [| t.Total; t.Reconstruction; t.Sparsity; t.PreAct; t.Auxiliary; l0; fvu; deadFrac |]
        torch.stack([| for v in values -> v.detach().to_type torch.float64 |]).cpu().data<float>().ToArray()

    /// After backward, before the optimiser: removes the decoder gradient's component parallel to each feature's
    /// decoder (unit-norm decoders only).
    let afterBackward (state: TrainState) =
        if state.Coder.Config.Decoder = UnitNorm then DecoderConstraint.removeParallelGradient state.Coder

    /// After the optimiser: renormalises unit-norm decoders, records firings, updates the BatchTopK threshold,
    /// resamples dead features when due (extra batches from `resampleSource`, moments reset through `resetMoments`),
    /// rolls the density window and advances `state.Step`. Returns how many features were resampled.
    let afterStep (state: TrainState) (f: StepForward) (resampleSource: int -> torch.Tensor * torch.Tensor) (resetMoments: string -> torch.Tensor -> unit) : int =
        let cfg = state.Config
        let coder = state.Coder
        let step = state.Step
        if coder.Config.Decoder = UnitNorm then DecoderConstraint.renormalise coder
        match f.Pass.Active with
        | Some a -> state.Stats.UpdateActive(a.Indices, a.Values.detach ())
        | None -> state.Stats.Update(f.Pass.Acts.detach ())
        match f.Pass.BatchMinKept with
        | Some m -> updateBatchTopKThreshold coder m cfg.BatchTopKMomentum
        | None -> ()
        let resampled =
            match cfg.Resampling with
            | Some r when (step + 1) % r.EverySteps = 0 && step <= r.StopAfterStep ->
                // the draws are a function of (seed, step), so a run resumed from a checkpoint draws the same
                Transcoders.Tensors.Rng.seed (Trainer.stepSeed cfg.Seed step)
                let deadNow = state.Stats.Dead cfg.DeadAfterTokens
                let extra = [ for i in 1 .. r.Batches -> let bx, by = resampleSource (step + i) in normaliseBatch coder bx by ]
                let rx = torch.cat((extra |> List.map fst |> Array.ofList), 1L)
                let ry = torch.cat((extra |> List.map snd |> Array.ofList), 1L)
                DeadFeatures.resample coder resetMoments state.Stats deadNow rx ry r.EncoderScale
            | _ -> 0
        if cfg.DensityWindowSteps > 0 && (step + 1) % cfg.DensityWindowSteps = 0 && step + 1 < cfg.Steps then
            state.Stats.ResetWindow()
        state.Step <- step + 1
        resampled

    /// One training step on a batch (user layout; for an SAE target = x): `forwardLoss`, a NaN/Inf check, backward,
    /// `afterBackward`, Adam at the scheduled learning rate, `afterStep`. Runs in its own dispose scope; raises
    /// `CoderTrainingError` on a NaN/Inf loss (before any parameter changes). `resampleSource` supplies the extra
    /// batches resampling draws from (it receives step indices after the current one).
    let stepWith (state: TrainState) (resampleSource: int -> torch.Tensor * torch.Tensor) (x: torch.Tensor) (y: torch.Tensor) : StepLog =
        let cfg = state.Config
        let step = state.Step
        use scope = torch.NewDisposeScope()
        let lambda = sparsityCoefficient cfg step
        let lr = Schedule.lrAt (cfg.Schedule.ToSchedule(cfg.Lr, cfg.Steps)) step
        let f = forwardLoss state x y
        let diag = diagnostics f
        if not (Double.IsFinite diag[0]) then
            let badInput =
                use _ = torch.no_grad ()
                not (f.Xn.isfinite().all().item<bool> () && f.Yn.isfinite().all().item<bool> ())
            fail "coder training diverged at step %d: loss %g (reconstruction %g, sparsity %g, pre-act %g, auxiliary %g)%s"
                step diag[0] diag[1] diag[2] diag[3] diag[4]
                (if badInput then "; the batch itself holds NaN/Inf values" else "; lower the learning rate or the sparsity coefficient")
        state.Optimizer.ZeroGrad()
        f.Terms.Total.backward()
        SparseActivations.BackwardTensors.release ()
        afterBackward state
        state.Optimizer.SetLearningRate lr
        state.Optimizer.Step()
        let resampled = afterStep state f resampleSource (fun name mask -> state.Optimizer.ResetMasked(name, mask))
        { Step = step; Tokens = state.Stats.TotalTokens; Lr = lr; SparsityCoefficient = lambda
          Loss = diag[0]; Reconstruction = diag[1]; Sparsity = diag[2]; PreAct = diag[3]; Auxiliary = diag[4]
          L0 = diag[5]; Fvu = diag[6]; DeadFraction = diag[7]; Resampled = resampled }

    /// One training step without resampling batches (resampling, if configured, reuses this batch).
    let step (state: TrainState) (x: torch.Tensor) (y: torch.Tensor) : StepLog =
        stepWith state (fun _ -> x, y) x y

    /// The JSON line of a step log (non-finite numbers as null, as in every metrics log; see `Metrics`).
    let logLine (l: StepLog) : string =
        Metrics.jsonLine (fun w ->
            let num = JsonNumbers.write w
            w.WriteNumber("step", l.Step)
            w.WriteNumber("tokens", l.Tokens)
            num "lr" l.Lr
            num "sparsity_coefficient" l.SparsityCoefficient
            num "loss" l.Loss
            num "reconstruction" l.Reconstruction
            num "sparsity" l.Sparsity
            num "pre_act" l.PreAct
            num "auxiliary" l.Auxiliary
            num "l0" l.L0
            num "fvu" l.Fvu
            num "dead_fraction" l.DeadFraction
            w.WriteNumber("resampled", l.Resampled))

    /// Reads a line written by `logLine`; `source` names the file in errors.
    let parseLogLine (source: string) (line: string) : StepLog =
        Metrics.parseLine source line (fun e ->
            let prop (k: string) =
                match e.TryGetProperty k with
                | true, v -> v
                | _ -> failwithf "%s: log line without '%s': %s" source k line
            let num (k: string) = JsonNumbers.ofElement (prop k)
            { Step = (prop "step").GetInt32(); Tokens = (prop "tokens").GetInt64(); Lr = num "lr"
              SparsityCoefficient = num "sparsity_coefficient"; Loss = num "loss"; Reconstruction = num "reconstruction"
              Sparsity = num "sparsity"; PreAct = num "pre_act"; Auxiliary = num "auxiliary"; L0 = num "l0"
              Fvu = num "fvu"; DeadFraction = num "dead_fraction"; Resampled = (prop "resampled").GetInt32() })

    /// Whether step `s` (0-based) of a run of `steps` steps is logged (every `LogEvery`-th, the last, and any that
    /// resampled features).
    let isLogged (cfg: TrainConfig) (l: StepLog) =
        l.Step % cfg.LogEvery = 0 || l.Step = cfg.Steps - 1 || l.Resampled > 0

    /// Trains a prepared coder for `Steps` steps on `source step = (x, target)` (tensors the source creates are disposed
    /// after their step). Writes every `LogEvery`-th step (and the last) to the JSONL log, calls `onLog` with it, and
    /// returns the state and the logged steps.
    let trainWith (cfg: TrainConfig) (coder: Coder) (source: int -> torch.Tensor * torch.Tensor) (onLog: StepLog -> unit) : TrainState * StepLog list =
        let state = init cfg coder
        let writer =
            cfg.LogPath |> Option.map (fun p ->
                if File.Exists p then File.Delete p
                new Metrics.Log(p))
        let logs = Collections.Generic.List<StepLog>()
        try
            for s in 0 .. cfg.Steps - 1 do
                let log =
                    use scope = torch.NewDisposeScope()
                    let x, y = source s
                    stepWith state source x y
                if isLogged cfg log then
                    logs.Add log
                    writer |> Option.iter (fun w -> w.WriteLine(logLine log))
                    onLog log
        finally
            writer |> Option.iter (fun w -> (w :> IDisposable).Dispose())
        state, List.ofSeq logs

    /// `trainWith` without a callback.
    let train (cfg: TrainConfig) (coder: Coder) (source: int -> torch.Tensor * torch.Tensor) : TrainState * StepLog list =
        trainWith cfg coder source ignore

    /// Seeds torch, creates a coder, prepares it on the source's first batches and trains it.
    let run (cfg: TrainConfig) (coderConfig: CoderConfig) (device: torch.Device) (source: int -> torch.Tensor * torch.Tensor) : TrainState * StepLog list =
        Transcoders.Tensors.Device.seed cfg.Seed
        let coder = Coder.create coderConfig device
        prepare cfg coder source
        train cfg coder source
