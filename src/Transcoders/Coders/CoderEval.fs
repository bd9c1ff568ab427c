namespace Transcoders.Coders

open System
open TorchSharp
open Transcoders.Coders.Scalars

/// A histogram of log10 feature firing frequencies (dead features, which never fired, are counted apart).
type DensityHistogram =
    { /// Bin edges in log10(frequency), ascending (Counts.Length + 1 of them).
      Edges: float[]
      Counts: int[]
      /// Features that never fired (log10 frequency −∞).
      Dead: int }

/// Options of `CoderEval.evaluate`.
type EvalOptions =
    { /// A feature firing on more than this fraction of tokens counts as dense (SAELens: 0.1).
      DenseThreshold: float
      HistogramBins: int
      /// Lowest histogram edge in log10(frequency); frequencies below it go to the first bin.
      HistogramMinLog10: float }

    static member Default = { DenseThreshold = 0.1; HistogramBins = 50; HistogramMinLog10 = -8.0 }

/// Metrics of a coder over an activation source, in the model's units. Per-layer arrays have one entry per layer.
type EvalResult =
    { Tokens: int64
      /// Mean active features per token, averaged over layers.
      L0: float
      L0PerLayer: float[]
      /// Mean over tokens of Σ_i |a_i| (SAELens' l1), averaged over layers.
      L1: float
      /// mean_t ‖ŷ − y‖² (summed over output dimensions), averaged over layers.
      Mse: float
      MsePerLayer: float[]
      /// Anthropic's normalised MSE Σ‖y − ŷ‖² / Σ‖y‖² over all layers.
      NormalizedMse: float
      /// Fraction of variance unexplained Σ‖y − ŷ‖² / Σ‖y − ȳ‖² (ȳ the mean over the whole source), over all layers.
      Fvu: float
      FvuPerLayer: float[]
      /// 1 − FVU.
      VarianceExplained: float
      /// Mean over tokens (and layers) of cos(ŷ, y).
      CosineSimilarity: float
      /// Mean over tokens (and layers) of ‖ŷ‖ / ‖y‖ (SAELens' l2_ratio; below 1 means shrinkage).
      L2Ratio: float
      /// Fraction of features that never fired over these tokens.
      DeadFraction: float
      /// The same per layer.
      DeadFractionPerLayer: float[]
      /// Fraction of features firing on more than `DenseThreshold` of tokens.
      DenseFraction: float
      /// Firing frequency of every feature [layer][feature].
      Frequencies: float[][]
      Histogram: DensityHistogram }

[<RequireQualifiedAccess>]
module DensityHistogram =
    /// The histogram of log10 frequencies over `bins` equal bins from `minLog10` to 0.
    let ofFrequencies (frequencies: float seq) (bins: int) (minLog10: float) : DensityHistogram =
        if bins < 1 then invalidArg "bins" "at least one histogram bin is needed"
        if not (minLog10 < 0.0) then invalidArg "minLog10" "the lowest edge must be below 0 (log10 of frequency 1)"
        let edges = Array.init (bins + 1) (fun i -> minLog10 + (0.0 - minLog10) * float i / float bins)
        let counts = Array.zeroCreate bins
        let mutable dead = 0
        for f in frequencies do
            if f <= 0.0 then dead <- dead + 1
            else
                let v = log10 f
                let i = int (floor ((v - minLog10) / (0.0 - minLog10) * float bins))
                let i = max 0 (min (bins - 1) i)
                counts[i] <- counts[i] + 1
        { Edges = edges; Counts = counts; Dead = dead }

/// Running sums of `CoderEval`'s metrics: batches are added one at a time (each in its own dispose scope), so any
/// number of tokens can be evaluated in constant memory, and one activation stream can feed several coders.
type EvalAccumulator(coder: Coder) =
    let cfg = coder.Config
    let nL, dOut = cfg.NLayers, cfg.DOut
    let sqErr = Array.zeroCreate<float> nL
    let sqY = Array.zeroCreate<float> nL
    let sumY = Array.init nL (fun _ -> Array.zeroCreate<float> dOut)
    let l0 = Array.zeroCreate<float> nL
    let l1 = Array.zeroCreate<float> nL
    let cosSum = Array.zeroCreate<float> nL
    let ratioSum = Array.zeroCreate<float> nL
    let fires = Array.init nL (fun _ -> Array.zeroCreate<int64> cfg.DSae)
    let mutable tokens = 0L

    member _.Coder = coder
    member _.Tokens = tokens

    /// Adds one `(x, target)` batch in the user layout (for an SAE target = x).
    member _.Add(x: torch.Tensor, y: torch.Tensor) =
        use scope = torch.NewDisposeScope()
        use _ = torch.no_grad ()
        let xl = coder.ToLayerMajor(x, cfg.DIn, "x").``to``(torch.float32, coder.Device)
        let yl = coder.ToLayerMajor(y, cfg.DOut, "target").``to``(torch.float32, coder.Device)
        if xl.shape[1] <> yl.shape[1] then
            invalidArg "batches" (sprintf "x and target hold different token counts (%d vs %d)" xl.shape[1] yl.shape[1])
        let p = coder.PassNormalised(coder.NormaliseIn xl)
        let pred = coder.DenormaliseOut p.Prediction
        let err = (pred - yl).to_type(torch.float64)
        let y64 = yl.to_type(torch.float64)
        let p64 = pred.to_type(torch.float64)
        let host (t: torch.Tensor) = t.cpu().data<float>().ToArray()
        let e = host (err.square().sum([| 1L; 2L |]))
        let s = host (y64.square().sum([| 1L; 2L |]))
        let sy = host (y64.sum([| 1L |]))
        let dot = (p64 * y64).sum([| 2L |])
        let np = p64.square().sum([| 2L |]).sqrt()
        let ny = y64.square().sum([| 2L |]).sqrt()
        let cos = host ((dot / (np * ny).clamp_min(sc 1e-30)).sum([| 1L |]))
        let ratio = host ((np / ny.clamp_min(sc 1e-30)).sum([| 1L |]))
        let active = p.Acts.gt(sc 0.0)
        let l0b = host (active.sum([| 1L; 2L |], false, torch.float64))
        let l1b = host (p.Acts.to_type(torch.float64).abs().sum([| 1L; 2L |]))
        let fb = active.sum([| 1L |], false, torch.int64).cpu().data<int64>().ToArray()
        for l in 0 .. nL - 1 do
            sqErr[l] <- sqErr[l] + e[l]
            sqY[l] <- sqY[l] + s[l]
            for j in 0 .. dOut - 1 do sumY[l][j] <- sumY[l][j] + sy[l * dOut + j]
            l0[l] <- l0[l] + l0b[l]
            l1[l] <- l1[l] + l1b[l]
            cosSum[l] <- cosSum[l] + cos[l]
            ratioSum[l] <- ratioSum[l] + ratio[l]
            for i in 0 .. cfg.DSae - 1 do fires[l][i] <- fires[l][i] + fb[l * cfg.DSae + i]
        tokens <- tokens + xl.shape[1]

    /// The metrics of every batch added so far.
    member _.Result(options: EvalOptions) : EvalResult =
        if tokens = 0L then invalidArg "batches" "no tokens to evaluate on"
        let n = float tokens
        let variance l = sqY[l] - (sumY[l] |> Array.sumBy (fun v -> v * v)) / n
        let fvuL = Array.init nL (fun l -> sqErr[l] / max 1e-300 (variance l))
        let fvu = Array.sum sqErr / max 1e-300 (Array.init nL variance |> Array.sum)
        let freqs = fires |> Array.map (Array.map (fun c -> float c / n))
        let all = Array.concat freqs
        let total = float all.Length
        let deadL = freqs |> Array.map (fun f -> (f |> Array.filter (fun v -> v = 0.0) |> Array.length |> float) / float f.Length)
        { Tokens = tokens
          L0PerLayer = l0 |> Array.map (fun v -> v / n)
          L0 = (Array.sum l0 / n) / float nL
          L1 = (Array.sum l1 / n) / float nL
          MsePerLayer = sqErr |> Array.map (fun v -> v / n)
          Mse = Array.sum sqErr / n / float nL
          NormalizedMse = Array.sum sqErr / max 1e-300 (Array.sum sqY)
          Fvu = fvu
          FvuPerLayer = fvuL
          VarianceExplained = 1.0 - fvu
          CosineSimilarity = Array.sum cosSum / n / float nL
          L2Ratio = Array.sum ratioSum / n / float nL
          DeadFraction = (all |> Array.filter (fun f -> f = 0.0) |> Array.length |> float) / total
          DeadFractionPerLayer = deadL
          DenseFraction = (all |> Array.filter (fun f -> f > options.DenseThreshold) |> Array.length |> float) / total
          Frequencies = freqs
          Histogram = DensityHistogram.ofFrequencies all options.HistogramBins options.HistogramMinLog10 }

/// Evaluation that needs no language model: reconstruction, sparsity and feature density over activation batches.
module CoderEval =

    /// The histogram of log10 frequencies over `bins` equal bins from `minLog10` to 0.
    let densityHistogram (frequencies: float seq) (bins: int) (minLog10: float) : DensityHistogram =
        DensityHistogram.ofFrequencies frequencies bins minLog10

    /// Evaluates `coder` over `(x, target)` batches in the user layout (for an SAE target = x).
    let evaluateWith (options: EvalOptions) (coder: Coder) (batches: (torch.Tensor * torch.Tensor) seq) : EvalResult =
        let acc = EvalAccumulator(coder)
        for x, y in batches do acc.Add(x, y)
        acc.Result options

    /// `evaluateWith EvalOptions.Default`.
    let evaluate (coder: Coder) (batches: (torch.Tensor * torch.Tensor) seq) : EvalResult =
        evaluateWith EvalOptions.Default coder batches
