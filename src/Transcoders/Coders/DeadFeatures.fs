namespace Transcoders.Coders

open System
open TorchSharp
open Transcoders.Coders.Scalars

/// Per-feature firing statistics over training: tokens since each feature last fired (drives the dead mask) and
/// firing counts over the current window (feature density).
type FiringStats(nLayers: int, dSae: int, device: torch.Device) =
    let sinceFired = torch.zeros([| int64 nLayers; int64 dSae |], dtype = torch.int64, device = device).DetachFromDisposeScope()
    let counts = torch.zeros([| int64 nLayers; int64 dSae |], dtype = torch.int64, device = device).DetachFromDisposeScope()
    let mutable windowTokens = 0L
    let mutable totalTokens = 0L

    /// Tokens since each feature last fired [L, d_sae] (int64).
    member _.TokensSinceFired = sinceFired
    /// Firings per feature since the window was last reset [L, d_sae] (int64).
    member _.Counts = counts
    member _.WindowTokens = windowTokens
    member _.TotalTokens = totalTokens

    /// Records one batch of layer-major activations [L, B, d_sae] (a feature fires when its activation is > 0;
    /// activations are non-negative for every activation function, so this counts the non-zero entries).
    member _.Update(acts: torch.Tensor) =
        use _ = torch.no_grad ()
        let b = acts.shape[1]
        // a float sum over the batch dimension is vectorised; a bool/int64 one over a strided dimension is ~5× slower
        use s = acts.sign()
        use cf = s.sum([| 1L |], false, torch.float32)
        use c = cf.to_type torch.int64
        counts.add_ c |> ignore
        use anyFired = c.gt(scl 0L)
        sinceFired.add_(scl b) |> ignore
        sinceFired.masked_fill_(anyFired, scl 0L) |> ignore
        windowTokens <- windowTokens + b
        totalTokens <- totalTokens + b

    /// Records one batch given by its active features (indices, values [L, B, k], distinct indices per token):
    /// the same as `Update` on the dense activations, without reading an [L, B, d_sae] tensor.
    member _.UpdateActive(indices: torch.Tensor, values: torch.Tensor) =
        use _ = torch.no_grad ()
        let b = values.shape[1]
        use fired = values.gt(sc 0.0)
        use firedL = fired.to_type(torch.int64).reshape(int64 nLayers, -1L)
        use idx = indices.reshape(int64 nLayers, -1L)
        use c = torch.zeros([| int64 nLayers; int64 dSae |], dtype = torch.int64, device = device)
        c.scatter_add_(1L, idx, firedL) |> ignore
        counts.add_ c |> ignore
        use anyFired = c.gt(scl 0L)
        sinceFired.add_(scl b) |> ignore
        sinceFired.masked_fill_(anyFired, scl 0L) |> ignore
        windowTokens <- windowTokens + b
        totalTokens <- totalTokens + b

    /// Features that have not fired for at least `afterTokens` tokens [L, d_sae] (bool).
    member _.Dead(afterTokens: int64) : torch.Tensor = sinceFired.ge(scl afterTokens)

    /// Firing frequency over the window [L, d_sae] (float64; zeros before any token).
    member _.Frequencies() : torch.Tensor =
        use c = counts.to_type torch.float64
        c.div(sc (float (max 1L windowTokens)))

    /// Starts a new density window (counts back to zero).
    member _.ResetWindow() =
        counts.zero_() |> ignore
        windowTokens <- 0L

    /// Marks features as just fired (after resampling them).
    member _.MarkRevived(mask: torch.Tensor) =
        sinceFired.masked_fill_(mask, scl 0L) |> ignore

    /// Copies of the state, for checkpoints: (tokens since fired, counts, window tokens, total tokens).
    member _.StateDict() = sinceFired.clone(), counts.clone(), windowTokens, totalTokens

    /// Restores a state made by `StateDict`.
    member _.LoadStateDict(since: torch.Tensor, cnt: torch.Tensor, window: int64, total: int64) =
        if since.shape <> sinceFired.shape || cnt.shape <> counts.shape then
            invalidArg "since" (sprintf "firing statistics: shape %A expected, got %A / %A" sinceFired.shape since.shape cnt.shape)
        sinceFired.copy_ since |> ignore
        counts.copy_ cnt |> ignore
        windowTokens <- window
        totalTokens <- total

    interface IDisposable with
        member _.Dispose() =
            sinceFired.Dispose()
            counts.Dispose()

/// Anthropic-style resampling of dead features (Towards Monosemanticity, 2023; April 2023 update).
type ResampleConfig =
    { /// Resample every this many steps (Anthropic: 25k steps; at least the dead window).
      EverySteps: int
      /// No resampling after this step (let the revived features settle).
      StopAfterStep: int
      /// Source batches concatenated to pick resampling tokens from.
      Batches: int
      /// New encoder norm as a fraction of the mean alive encoder norm (Anthropic: 0.2).
      EncoderScale: float }

    static member Default = { EverySteps = 25000; StopAfterStep = Int32.MaxValue; Batches = 8; EncoderScale = 0.2 }

module DeadFeatures =

    /// Resamples the features marked in `dead` [L, d_sae] (bool) from normalised layer-major batches
    /// xn [L, B, d_in], yn [L, B, d_out]:
    /// tokens are drawn with probability ∝ (squared error of the coder there)²; a layer-ℓ feature's decoder becomes
    /// the normalised residual target − prediction of the drawn token at layers ℓ..L−1 (scaled to the mean alive decoder
    /// norm when decoders are free), its encoder the drawn input (minus the input bias) normalised to
    /// `encoderScale` × the mean alive encoder norm, its b_enc 0; the optimiser's moments of those entries are zeroed
    /// through `resetMoments parameterName mask` (mask: bool, broadcastable to the parameter; `CoderAdam.ResetMasked`
    /// does it for ours) and the features are marked as just fired. Returns how many features were resampled.
    let resample (coder: Coder) (resetMoments: string -> torch.Tensor -> unit) (stats: FiringStats) (dead: torch.Tensor) (xn: torch.Tensor) (yn: torch.Tensor) (encoderScale: float) : int =
        use scope = torch.NewDisposeScope()
        use _ = torch.no_grad ()
        let cfg = coder.Config
        let nL = cfg.NLayers
        let total = dead.sum().item<int64> () |> int
        if total = 0 then 0
        else
            let pass = coder.PassNormalised xn
            let res = yn - pass.Prediction // [L, B, d_out]
            let perTokenLayer = res.square().sum([| 2L |]) // [L, B]
            let decNorms = coder.DecoderNorms()
            let encNorms = coder.WEnc.square().sum([| 1L |]).sqrt() // [L, d_sae]
            let inputBias =
                if cfg.InputBias then (if cfg.Kind = Sae then Some(coder.BDec :> torch.Tensor) else coder.BIn |> Option.map (fun p -> p :> torch.Tensor))
                else None
            for l in 0 .. nL - 1 do
                let deadL = dead[l]
                let idx = deadL.nonzero().squeeze(1)
                let n = idx.shape[0]
                if n > 0L then
                    // loss of layer l's features' span: errors at layers l..L-1
                    let loss = perTokenLayer.narrow(0, int64 l, int64 (nL - l)).sum([| 0L |]) // [B]
                    let probs = loss.square()
                    let probs = if probs.sum().item<float32> () > 0.0f then probs else torch.ones_like loss
                    let tok = torch.multinomial(probs, n, replacement = true, generator = Transcoders.Tensors.Rng.generator probs.device) // [n]
                    let alive = deadL.logical_not ()
                    let nAlive = alive.sum().item<int64> ()
                    let meanAlive (norms: torch.Tensor) =
                        if nAlive > 0L then norms.masked_select(alive).mean().item<float32> () |> float else 1.0
                    // decoder: residual at layers l.. of the drawn tokens, [n, L-l, d_out]
                    let r = res.narrow(0, int64 l, int64 (nL - l)).index_select(1L, tok).transpose(0, 1)
                    let rn = r.square().sum([| 1L; 2L |], keepdim = true).sqrt().clamp_min 1e-8
                    let decScale = match cfg.Decoder with UnitNorm -> 1.0 | Free -> meanAlive decNorms[l]
                    let newDec = r / rn * sc decScale
                    coder.WDec[l].index_copy_(0L, idx, newDec) |> ignore
                    // encoder: drawn inputs, centred by the input bias, [n, d_in]
                    let xs = xn[l].index_select(0L, tok)
                    let xs = match inputBias with Some b -> xs - b[l].unsqueeze 0 | None -> xs
                    let xsn = xs / xs.square().sum([| 1L |], keepdim = true).sqrt().clamp_min 1e-8
                    let newEnc = xsn * sc (encoderScale * meanAlive encNorms[l])
                    coder.WEnc[l].index_copy_(1L, idx, newEnc.t()) |> ignore
                    coder.BEnc[l].index_fill_(0L, idx, sc 0.0) |> ignore
                    let m3 = deadL.reshape(-1L, 1L, 1L)
                    resetMoments (sprintf "W_dec_%d" l) m3
            resetMoments "W_enc" (dead.unsqueeze 1)
            resetMoments "b_enc" dead
            match coder.LogThreshold with
            | Some _ -> resetMoments "log_threshold" dead
            | None -> ()
            stats.MarkRevived dead
            total
