namespace Transcoders.Coders

open TorchSharp
open Transcoders.Coders.Scalars

/// The reconstruction term.
type Reconstruction =
    /// Squared error summed over output dimensions (and layers), averaged over tokens: mean_t Σ_{ℓ,d} (ŷ − y)².
    | Mse
    /// The transcoder paper's per-token normalised MSE: mean over tokens, layers and dimensions of (ŷ − y)² / ‖y‖.
    | NormalizedMse
    /// Fraction of variance unexplained Σ‖y − ŷ‖² / Σ‖y − ȳ‖² (ȳ the batch mean per layer), as sparsify trains on.
    | Fvu
    /// Matryoshka (Bussmann et al. 2025; Nabeshima 2024): the first `prefixes[0]` features alone, the first
    /// `prefixes[1]`, …, and the whole dictionary each reconstruct the target; the term is the mean over those nested
    /// prefixes of `each`. Prefix sizes ascend, lie in 1..d_sae, and d_sae itself is implied as the last prefix.
    | Matryoshka of prefixes: int list * each: Reconstruction

/// The sparsity penalty, per token summed over features (and layers), averaged over tokens.
type Sparsity =
    /// None (TopK and BatchTopK are sparse by construction).
    | NoSparsity
    /// Σ_i |a_i| (× ‖W_dec,i‖ when weighted — use it with free decoder norms).
    | L1 of weightByDecoderNorm: bool
    /// Anthropic's Σ_i tanh(c·‖W_dec,i‖·a_i) (c ≈ 4).
    | Tanh of c: float
    /// Σ_i H(z_i − θ_i) with the JumpReLU straight-through estimator for θ (Gemma Scope "step" L0). JumpReLU only.
    | L0
    /// (L0 / target − 1)², L0 the mean active features per token and layer through the same estimator: pulls L0 to
    /// `target` from both sides (Gemma Scope 2's quadratic L0 penalty, made scale-free). JumpReLU only.
    | L0Target of target: float

/// An auxiliary loss that revives dead features.
type Auxiliary =
    | NoAuxiliary
    /// Ghost gradients (Anthropic, Feb 2024; the transcoder paper): dead features' exp(pre-activations) decoded,
    /// rescaled to half the residual's norm, fitted to the residual target − prediction.
    | GhostGrads
    /// AuxK (OpenAI, Gao et al. 2024): the top-kAux dead latents reconstruct the residual target − prediction;
    /// loss = coefficient · min(n_dead/kAux, 1) · Σ‖ê − e‖² / Σ‖y − ȳ‖². OpenAI: kAux = d_in/2, coefficient 1/32.
    | AuxK of kAux: int * coefficient: float

/// What the training loss is made of.
type LossConfig =
    { Reconstruction: Reconstruction
      Sparsity: Sparsity
      /// λ: multiplies the sparsity penalty (ramped up by the trainer's warm-up).
      SparsityCoefficient: float
      /// λ_p of Anthropic's pre-activation loss Σ_i ReLU(θ_i − z_i)·‖W_dec,i‖ (0 turns it off; Anthropic: 3e-6).
      PreActCoefficient: float
      /// Apply the pre-activation loss to dead features only (SAELens) rather than to all.
      PreActDeadOnly: bool
      Auxiliary: Auxiliary }

    /// The transcoder paper's loss: normalised MSE + 1.4e-4·L1 + ghost grads.
    static member Paper =
        { Reconstruction = NormalizedMse; Sparsity = L1 false; SparsityCoefficient = 1.4e-4
          PreActCoefficient = 0.0; PreActDeadOnly = true; Auxiliary = GhostGrads }

    /// Anthropic's JumpReLU recipe: MSE + λ·tanh(4·‖W_dec‖·a) + 3e-6 pre-activation loss.
    static member Anthropic(lambda: float) =
        { Reconstruction = Mse; Sparsity = Tanh 4.0; SparsityCoefficient = lambda
          PreActCoefficient = 3e-6; PreActDeadOnly = false; Auxiliary = NoAuxiliary }

    /// sparsify's TopK recipe: FVU + AuxK(kAux, 1/32).
    static member TopK(kAux: int) =
        { Reconstruction = Fvu; Sparsity = NoSparsity; SparsityCoefficient = 0.0
          PreActCoefficient = 0.0; PreActDeadOnly = true; Auxiliary = AuxK(kAux, 1.0 / 32.0) }

    /// Matryoshka BatchTopK (SAELens, dictionary_learning): the TopK recipe with every nested prefix of the dictionary
    /// reconstructing the target (use it with a `BatchTopK` activation).
    static member MatryoshkaBatchTopK(prefixes: int list, kAux: int) =
        { LossConfig.TopK kAux with Reconstruction = Matryoshka(prefixes, Fvu) }

    /// JumpReLU with an L0 penalty pulled to a target L0: MSE + λ·(L0/target − 1)², plus the pre-activation loss on
    /// dead features so that they can come back above their threshold.
    static member JumpReLUTargetL0(target: float, lambda: float) =
        { Reconstruction = Mse; Sparsity = L0Target target; SparsityCoefficient = lambda
          PreActCoefficient = 3e-6; PreActDeadOnly = true; Auxiliary = NoAuxiliary }

/// Each term of one step's loss (scalar tensors, differentiable). Total = Reconstruction + λ·Sparsity + λ_p·PreAct + Auxiliary.
type LossTerms =
    { Total: torch.Tensor
      Reconstruction: torch.Tensor
      /// The unweighted sparsity penalty.
      Sparsity: torch.Tensor
      /// The unweighted pre-activation penalty.
      PreAct: torch.Tensor
      /// The auxiliary loss, already weighted.
      Auxiliary: torch.Tensor
      /// λ used for this step (after warm-up).
      SparsityCoefficient: float }

/// Loss terms over layer-major tensors: predictions/targets [L, B, d_out], activations and pre-activations [L, B, d_sae],
/// dead masks [L, d_sae] (bool). Everything is averaged over the B tokens.
module Losses =

    /// ‖t‖ over the last dimension, kept as a size-1 dimension.
    let private lastNorm (t: torch.Tensor) =
        use sq = t.square ()
        use s = sq.sum([| -1L |], keepdim = true)
        s.sqrt ()

    let private sumLayersFeatures (t: torch.Tensor) = t.sum([| 0L; 2L |]).mean()

    /// mean_t Σ_{ℓ,d} (ŷ − y)².
    let mse (pred: torch.Tensor) (target: torch.Tensor) : torch.Tensor =
        use d = pred.sub target
        use sq = d.square ()
        sumLayersFeatures sq

    /// Per-element (ŷ − y)² / ‖y‖ [L, B, d] (‖y‖ over d, floored at 1e-8): the transcoder paper's unreduced MSE.
    let normalizedMseElements (pred: torch.Tensor) (target: torch.Tensor) : torch.Tensor =
        use d = pred.sub target
        use sq = d.square ()
        use n = lastNorm target
        use n' = n.clamp_min 1e-8
        sq.div n'

    /// The transcoder paper's normalised MSE: mean of (ŷ − y)² / ‖y‖ over tokens, layers and dimensions.
    let normalizedMse (pred: torch.Tensor) (target: torch.Tensor) : torch.Tensor =
        use e = normalizedMseElements pred target
        e.mean()

    /// Σ ‖y − ȳ‖² over the batch and layers, ȳ the batch mean of each layer.
    let totalVariance (target: torch.Tensor) : torch.Tensor =
        use m = target.mean([| 1L |], keepdim = true)
        use c = target.sub m
        use sq = c.square ()
        sq.sum()

    /// Fraction of variance unexplained Σ‖y − ŷ‖² / Σ‖y − ȳ‖².
    let fvu (pred: torch.Tensor) (target: torch.Tensor) : torch.Tensor =
        use d = pred.sub target
        use sq = d.square ()
        use num = sq.sum()
        use den = totalVariance target
        use den' = den.clamp_min 1e-12
        num.div den'

    /// The configured reconstruction term (a Matryoshka term needs the coder's features: `matryoshka`).
    let reconstruction (kind: Reconstruction) (pred: torch.Tensor) (target: torch.Tensor) : torch.Tensor =
        match kind with
        | Mse -> mse pred target
        | NormalizedMse -> normalizedMse pred target
        | Fvu -> fvu pred target
        | Matryoshka _ -> invalidArg "kind" "a Matryoshka reconstruction decodes prefixes of the features: use Losses.matryoshka"

    /// The nested prefix sizes of a Matryoshka term on `dSae` features, d_sae last; raises on sizes out of order or range.
    let matryoshkaPrefixes (prefixes: int list) (dSae: int) : int list =
        if prefixes |> List.exists (fun m -> m < 1 || m > dSae) then
            invalidArg "prefixes" (sprintf "Matryoshka prefix sizes must lie in 1..d_sae=%d (got %A)" dSae prefixes)
        if prefixes |> List.pairwise |> List.exists (fun (a, b) -> b <= a) then
            invalidArg "prefixes" (sprintf "Matryoshka prefix sizes must ascend strictly (got %A)" prefixes)
        if List.isEmpty prefixes || List.last prefixes <> dSae then prefixes @ [ dSae ] else prefixes

    /// The prediction [L, B, d_out] of the first `m` features alone (biases and skip path kept): the full prediction
    /// minus the decoded contribution of features m..d_sae−1.
    let prefixPrediction (coder: Coder) (pass: CoderPass) (m: int) : torch.Tensor =
        let dSae = int64 coder.Config.DSae
        if int64 m >= dSae then pass.Prediction.alias()
        else
            use rest = pass.Acts.narrow(2, int64 m, dSae - int64 m)
            use pad = torch.nn.functional.pad(rest, [| int64 m; 0L |])
            use tail = coder.DecodeNoBias pad
            pass.Prediction.sub tail

    /// The Matryoshka term: the mean over the nested prefixes of `each` on each prefix's prediction.
    let matryoshka (each: Reconstruction) (prefixes: int list) (coder: Coder) (pass: CoderPass) (target: torch.Tensor) : torch.Tensor =
        let ms = matryoshkaPrefixes prefixes coder.Config.DSae
        let terms =
            [ for m in ms ->
                use p = prefixPrediction coder pass m
                reconstruction each p target ]
        use stacked = torch.stack(terms, 0)
        for t in terms do t.Dispose()
        stacked.mean()

    /// mean_t Σ_{ℓ,i} |a_i| (·‖W_dec,i‖ when `decoderNorms` [L, d_sae] is given).
    let l1 (acts: torch.Tensor) (decoderNorms: torch.Tensor option) : torch.Tensor =
        use a = acts.abs ()
        match decoderNorms with
        | Some n ->
            use n1 = n.unsqueeze 1
            use w = a.mul n1
            sumLayersFeatures w
        | None -> sumLayersFeatures a

    /// Anthropic's mean_t Σ_{ℓ,i} tanh(c·‖W_dec,i‖·a_i).
    let tanhPenalty (c: float) (acts: torch.Tensor) (decoderNorms: torch.Tensor) : torch.Tensor =
        use n1 = decoderNorms.unsqueeze 1
        use w = acts.mul n1
        use s = w.mul(sc c)
        use t = s.tanh ()
        sumLayersFeatures t

    /// mean_t Σ_{ℓ,i} H(z_i − θ_i), differentiable in θ through the rectangle-kernel estimator.
    let l0 (pre: torch.Tensor) (threshold: torch.Tensor) (bandwidth: float) : torch.Tensor =
        use th = threshold.unsqueeze 1
        use h = SparseActivations.step pre th bandwidth
        sumLayersFeatures h

    /// (L0/target − 1)² with L0 = mean_t of Σ_i H(z_i − θ_i), averaged over layers; differentiable in θ.
    let l0Target (pre: torch.Tensor) (threshold: torch.Tensor) (bandwidth: float) (target: float) : torch.Tensor =
        if not (target > 0.0) then invalidArg "target" (sprintf "the target L0 must be positive (got %g)" target)
        use total = l0 pre threshold bandwidth
        use perLayer = total.div(sc (float pre.shape[0]))
        use rel = perLayer.div(sc target).sub(sc 1.0)
        rel.square ()

    /// Anthropic's pre-activation loss mean_t Σ_{ℓ,i} ReLU(θ_i − z_i)·‖W_dec,i‖, restricted to `mask` [L, d_sae] when given.
    let preAct (pre: torch.Tensor) (threshold: torch.Tensor) (decoderNorms: torch.Tensor) (mask: torch.Tensor option) : torch.Tensor =
        use th = threshold.unsqueeze 1
        use gap = th.sub pre
        use r = gap.relu ()
        use n1 = decoderNorms.unsqueeze 1
        use w = r.mul n1
        match mask with
        | Some m ->
            use m1 = m.unsqueeze(1).to_type(w.dtype)
            use wm = w.mul m1
            sumLayersFeatures wm
        | None -> sumLayersFeatures w

    /// The residual a dead-feature loss must explain: target − prediction (the transcoder paper's code uses
    /// input − prediction, which for a transcoder is wrong; reference notes §9.1).
    let residual (pred: torch.Tensor) (target: torch.Tensor) : torch.Tensor = target.sub pred

    /// Ghost-gradient loss (0 when no feature is dead). `pass` must come from `coder.PassNormalised`; `target` is
    /// [L, B, d_out]. Its value is scaled (detached) to equal the main reconstruction loss `reconstruction`, as in
    /// the paper, where the main loss is the normalised MSE.
    let ghostGrads (coder: Coder) (pass: CoderPass) (target: torch.Tensor) (dead: torch.Tensor) (reconstructionValue: torch.Tensor) : torch.Tensor =
        let anyDead = (use a = dead.any () in a.item<bool> ())
        if not anyDead then torch.zeros([||], dtype = pass.Prediction.dtype, device = pass.Prediction.device)
        else
            use r = residual pass.Prediction target
            use rd = r.detach ()
            use rNorm = lastNorm rd
            use dead1 = dead.unsqueeze 1
            use negInf = torch.full([||], System.Double.NegativeInfinity, dtype = pass.Pre.dtype, device = pass.Pre.device)
            use masked = torch.where(dead1, pass.Pre, negInf)
            use gActs = masked.exp ()
            use g = coder.DecodeNoBias gActs
            use gNorm = lastNorm g
            use denom = gNorm.mul(sc 2.0).add(sc 1e-6)
            use factor = rNorm.div denom
            use factorD = factor.detach ()
            use gs = g.mul factorD
            use diff = gs.sub rd
            use sq = diff.square ()
            use rNorm' = rNorm.clamp_min 1e-8
            use ghostEl = sq.div rNorm'
            use mainEl = (use p = pass.Prediction.detach () in normalizedMseElements p target)
            use ghostElD = ghostEl.detach ()
            use den = ghostElD.add(sc 1e-6)
            use ratio = mainEl.div den
            use weighted = ratio.mul ghostEl
            use ghost = weighted.mean()
            use nmse = mainEl.mean()
            use nmse' = nmse.clamp_min 1e-12
            use rv = reconstructionValue.detach ()
            use toMain = rv.div nmse'
            ghost.mul toMain

    /// AuxK loss (0 when no feature is dead): per layer, the top-kAux ReLU'd pre-activations among dead latents are
    /// decoded (no bias) and fitted to the residual target − prediction, normalised by the target's total variance and
    /// scaled by min(n_dead/kAux, 1); averaged over layers and multiplied by `coefficient`.
    let auxK (coder: Coder) (pass: CoderPass) (target: torch.Tensor) (dead: torch.Tensor) (kAux: int) (coefficient: float) : torch.Tensor =
        use nDead = dead.sum([| 1L |])
        let counts = (use c = nDead.cpu () in c.data<int64>().ToArray())
        let maxDead = Array.max counts
        if maxDead = 0L then torch.zeros([||], dtype = pass.Prediction.dtype, device = pass.Prediction.device)
        else
            let k = int (min (int64 kAux) maxDead)
            use r = pass.Pre.relu ()
            use dead1 = dead.unsqueeze 1
            use zero = torch.zeros([||], dtype = r.dtype, device = r.device)
            use masked = torch.where(dead1, r, zero)
            let struct (vals, idx) = masked.topk(k, dim = -1, sorted = false)
            use vals = vals
            use idx = idx
            use z = torch.zeros_like masked
            use auxActs = z.scatter(-1L, idx, vals)
            use eHat = coder.DecodeNoBias auxActs
            use e = (use rr = residual pass.Prediction target in rr.detach ())
            use diff = eHat.sub e
            use sq = diff.square ()
            use perLayer = sq.sum([| 1L; 2L |])
            use m = target.mean([| 1L |], keepdim = true)
            use c = target.sub m
            use csq = c.square ()
            use var = csq.sum([| 1L; 2L |])
            use var' = var.clamp_min 1e-12
            use ratio = perLayer.div var'
            let scale = counts |> Array.map (fun n -> float32 (min 1.0 (float n / float kAux)))
            use s = torch.tensor(scale, device = ratio.device)
            use scaled = ratio.mul s
            use mean = scaled.mean()
            mean.mul(sc coefficient)

    /// All terms of the configured loss. `sparsityCoefficient` is λ after warm-up; `dead` [L, d_sae] marks dead features.
    let compute (cfg: LossConfig) (sparsityCoefficient: float) (coder: Coder) (pass: CoderPass) (target: torch.Tensor) (dead: torch.Tensor) : LossTerms =
        let recon =
            match cfg.Reconstruction with
            | Matryoshka(prefixes, each) -> matryoshka each prefixes coder pass target
            | r -> reconstruction r pass.Prediction target
        let needNorms =
            match cfg.Sparsity with
            | L1 true | Tanh _ -> true
            | _ -> cfg.PreActCoefficient > 0.0
        use norms = if needNorms then coder.DecoderNorms() else null
        let zero () = torch.zeros([||], dtype = recon.dtype, device = recon.device)
        let threshold () =
            match coder.Threshold with
            | Some t -> t
            | None -> torch.zeros([| int64 coder.NLayers; int64 coder.Config.DSae |], dtype = recon.dtype, device = recon.device)
        let sparsity =
            match cfg.Sparsity with
            | NoSparsity -> zero ()
            | L1 weighted -> l1 pass.Acts (if weighted then Some norms else None)
            | Tanh c -> tanhPenalty c pass.Acts norms
            | L0 ->
                match coder.Config.Activation with
                | JumpReLU j -> (use th = threshold () in l0 pass.Pre th j.Bandwidth)
                | a -> invalidArg "cfg" (sprintf "LossConfig.Sparsity = L0 needs a JumpReLU coder (this one uses %A)" a)
            | L0Target target ->
                match coder.Config.Activation with
                | JumpReLU j -> (use th = threshold () in l0Target pass.Pre th j.Bandwidth target)
                | a -> invalidArg "cfg" (sprintf "LossConfig.Sparsity = L0Target needs a JumpReLU coder (this one uses %A)" a)
        let pre =
            if cfg.PreActCoefficient > 0.0 then
                use th = threshold ()
                preAct pass.Pre th norms (if cfg.PreActDeadOnly then Some dead else None)
            else zero ()
        let aux =
            match cfg.Auxiliary with
            | NoAuxiliary -> zero ()
            | GhostGrads -> ghostGrads coder pass target dead recon
            | AuxK(k, c) -> auxK coder pass target dead k c
        let total =
            use a = sparsity.mul(sc sparsityCoefficient)
            use b = pre.mul(sc cfg.PreActCoefficient)
            use s1 = recon.add a
            use s2 = s1.add b
            s2.add aux
        { Total = total; Reconstruction = recon; Sparsity = sparsity; PreAct = pre; Auxiliary = aux
          SparsityCoefficient = sparsityCoefficient }
