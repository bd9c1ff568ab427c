namespace Transcoders.Activations

open System
open TorchSharp

/// Statistics of one hook's rows, kept as float64 sums so that merging is exact bookkeeping
/// (`merge (ofRows a) (ofRows b)` = `ofRows (cat a b)` up to float64 rounding).
type HookStats =
    { Count: int64
      /// Σ ‖x‖₂ over rows.
      SumNorm: float
      /// Σ ‖x‖₂² over rows.
      SumSquaredNorm: float
      /// Σ x over rows, per dimension.
      Sum: float[] }

    /// Row width d.
    member s.D = s.Sum.Length

    /// E‖x‖₂.
    member s.MeanNorm = s.SumNorm / float s.Count

    /// E‖x‖₂².
    member s.MeanSquaredNorm = s.SumSquaredNorm / float s.Count

    /// E x, per dimension.
    member s.Mean = s.Sum |> Array.map (fun v -> v / float s.Count)

    /// √d / E‖x‖₂: the factor that gives rows a mean norm of √d, so one set of hyperparameters fits hooks
    /// and models of any scale (SAELens' estimated_norm_scaling_factor; Anthropic's normalisation).
    /// Fold it into the coder's weights when saving.
    member s.NormScale =
        if s.Count = 0L || s.SumNorm = 0.0 then
            invalidOp "the norm scale needs rows with a nonzero mean norm"
        sqrt (float s.D) / s.MeanNorm

/// Functions computing and combining `HookStats`.
module HookStats =
    /// No rows of width `d`.
    let empty (d: int) = { Count = 0L; SumNorm = 0.0; SumSquaredNorm = 0.0; Sum = Array.zeroCreate d }

    /// The statistics of rows `x` [n, d] (any float dtype and device), computed in float64. Pure.
    let ofRows (x: torch.Tensor) : HookStats =
        if x.dim() <> 2L then invalidArg "x" (sprintf "rows must be [n, d], got %s" (Rows.showShape x.shape))
        use _ = torch.NewDisposeScope()
        let x = x.to_type(torch.ScalarType.Float64)
        let squared = (x * x).sum(1L)
        { Count = x.shape[0]
          SumNorm = squared.sqrt().sum().item<float>()
          SumSquaredNorm = squared.sum().item<float>()
          Sum = x.sum(0L).cpu().data<float>().ToArray() }

    /// The statistics of the union of two row sets. Pure.
    let merge (a: HookStats) (b: HookStats) =
        if a.D <> b.D then invalidArg "b" (sprintf "cannot merge statistics of width %d and %d" a.D b.D)
        { Count = a.Count + b.Count
          SumNorm = a.SumNorm + b.SumNorm
          SumSquaredNorm = a.SumSquaredNorm + b.SumSquaredNorm
          Sum = Array.map2 (+) a.Sum b.Sum }

/// Statistics per hook over a stream of rows or batches.
module ActivationStats =
    /// `stats` updated with every hook of `rows` (hooks not seen before start from empty). Pure.
    let add (stats: Map<string, HookStats>) (rows: Rows) =
        rows
        |> Map.fold
            (fun (acc: Map<string, HookStats>) h (t: torch.Tensor) ->
                let s = HookStats.ofRows t
                acc.Add(h, (match acc.TryFind h with Some old -> HookStats.merge old s | None -> s)))
            stats

    /// The statistics of the first `rows` rows of `source` (fewer if it ends sooner), per hook.
    /// The source is advanced past them; use a fresh source (or a separate cache reader) for training.
    let collect (source: IRowSource) (rows: int64) : Map<string, HookStats> =
        if rows < 1L then invalidArg "rows" (sprintf "collect at least 1 row, not %d" rows)
        let mutable stats = Map.empty
        let mutable left = rows
        let mutable ended = false
        while left > 0L && not ended do
            use _ = torch.NewDisposeScope()
            match source.Read left with
            | None -> ended <- true
            | Some r ->
                left <- left - Rows.validate "row source" source.Hooks r
                stats <- add stats r
        stats
