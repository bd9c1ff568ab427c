/// Data-driven preparation of a coder before training: activation scales (E‖x·s‖ = √d, Anthropic/SAELens) and
/// bias initialisation (mean or geometric median, the transcoder paper).
module Transcoders.Coders.Normalisation

open TorchSharp

/// How `b_dec` (and `b_in`) start.
type BiasInit =
    | ZeroBias
    | MeanBias
    /// The geometric median (Weiszfeld iterations), robust to outliers: the transcoder paper's default.
    | GeometricMedianBias

/// Mean L2 norm per layer of layer-major activations [L, B, d] → [L] (float64 on the host).
let meanNorms (x: torch.Tensor) : float[] =
    use _ = torch.no_grad ()
    use x64 = x.to_type torch.float64
    use sq = x64.square ()
    use s = sq.sum([| 2L |])
    use n = s.sqrt ()
    use m = n.mean([| 1L |])
    use c = m.cpu ()
    c.data<float>().ToArray()

/// The scale s per layer with E‖x·s‖ = √d, from layer-major batches [L, B, d] (the mean norm over all of them).
let estimateScale (batches: torch.Tensor seq) : float[] =
    let mutable sums : float[] = null
    let mutable count = 0
    let mutable d = 0L
    for b in batches do
        let m = meanNorms b
        if isNull sums then
            sums <- Array.zeroCreate m.Length
            d <- b.shape[2]
        elif m.Length <> sums.Length then invalidArg "batches" "batches have different layer counts"
        for i in 0 .. m.Length - 1 do sums[i] <- sums[i] + m[i]
        count <- count + 1
    if count = 0 then invalidArg "batches" "no batches to estimate the activation scale from"
    sums |> Array.mapi (fun i s ->
        let mean = s / float count
        if not (mean > 0.0 && System.Double.IsFinite mean) then
            failwithf "cannot estimate the activation scale of layer %d: mean norm is %g (all-zero or non-finite activations?)" i mean
        sqrt (float d) / mean)

/// Geometric median of points [N, d] by Weiszfeld's algorithm (start at the mean; weights 1/max(‖p − m‖, 1e-6);
/// stop after `maxIter` iterations or when the relative change is ≤ `tol`), computed in float64.
let geometricMedian (points: torch.Tensor) (maxIter: int) (tol: float) : torch.Tensor =
    use scope = torch.NewDisposeScope()
    use _ = torch.no_grad ()
    let p = points.to_type torch.float64
    let mutable m = p.mean([| 0L |])
    let mutable iter = 0
    let mutable fin = false
    while not fin && iter < maxIter do
        let dist = (p - m.unsqueeze 0).square().sum([| 1L |]).sqrt().clamp_min 1e-6
        let w = dist.reciprocal ()
        let next = (p * w.unsqueeze 1).sum([| 0L |]) / w.sum()
        let change = ((next - m).norm().item<float> ()) / max 1e-30 (m.norm().item<float> ())
        m <- next
        iter <- iter + 1
        if change <= tol then fin <- true
    m.to_type(points.dtype).MoveToOuterDisposeScope()

/// A per-layer centre [L, d] of layer-major activations [L, B, d]: zeros, the mean, or the geometric median.
let centre (init: BiasInit) (x: torch.Tensor) : torch.Tensor =
    use _ = torch.no_grad ()
    match init with
    | ZeroBias -> torch.zeros([| x.shape[0]; x.shape[2] |], dtype = x.dtype, device = x.device)
    | MeanBias -> x.mean([| 1L |])
    | GeometricMedianBias ->
        let per = [| for l in 0L .. x.shape[0] - 1L -> (use xl = x[l] in geometricMedian xl 100 1e-20) |]
        let s = torch.stack(per, 0)
        for t in per do t.Dispose()
        s

/// Sets `b_dec` to the centre of the (normalised) targets and `b_in` (if present) to the centre of the inputs,
/// as the transcoder paper does after its first buffer. Layer-major [L, B, d] tensors.
let initBiases (init: BiasInit) (coder: Coder) (xn: torch.Tensor) (yn: torch.Tensor) =
    use _ = torch.no_grad ()
    use cy = centre init yn
    coder.BDec.copy_ cy |> ignore
    match coder.BIn with
    | Some bIn ->
        use cx = centre init xn
        bIn.copy_ cx |> ignore
    | None -> ()

/// ‖mean‖ / ‖std‖ per layer of layer-major activations [L, B, d] (float64 on the host): the norm of the mean vector
/// over the root-mean-square norm of the centred vectors, √(E‖x − μ‖²). Scale-free. A large ratio means every token
/// sits in a narrow cone around one direction; without centring, encoder directions that point away from it never
/// win the top-k and die (the ratio predicts the dead fraction of TopK coders, Spearman 0.89).
let meanStdRatio (x: torch.Tensor) : float[] =
    use scope = torch.NewDisposeScope()
    use _ = torch.no_grad ()
    let x64 = x.to_type torch.float64
    let mu = x64.mean([| 1L |], keepdim = true)
    let muNorm = mu.square().sum([| 1L; 2L |]).sqrt()
    let spread = (x64 - mu).square().sum([| 2L |]).mean([| 1L |]).sqrt()
    (muNorm / spread.clamp_min 1e-300).cpu().data<float>().ToArray()

/// Above this ‖mean‖/‖std‖ the mean, not the variation, dominates the activations: more than half of E‖x‖² is the
/// mean's (‖μ‖² > E‖x − μ‖²), so a coder that is not centred spends its encoder directions on a constant.
[<Literal>]
let MeanStdWarning = 1.0

/// A one-line report of the inputs' and targets' ‖mean‖/‖std‖ per layer (user-layout batch of one coder), with a
/// warning when any exceeds `MeanStdWarning` and the coder does not centre them (no input bias / zero bias init).
let meanStdReport (coder: Coder) (centred: bool) (x: torch.Tensor) (y: torch.Tensor) : string =
    use scope = torch.NewDisposeScope()
    let cfg = coder.Config
    let rx = meanStdRatio (coder.ToLayerMajor(x, cfg.DIn, "x").to_type torch.float32)
    let ry = meanStdRatio (coder.ToLayerMajor(y, cfg.DOut, "target").to_type torch.float32)
    let show (r: float[]) = System.String.Join(" ", r |> Array.map (fun v -> v.ToString("F2", System.Globalization.CultureInfo.InvariantCulture)))
    let high = Array.append rx ry |> Array.exists (fun v -> v > MeanStdWarning)
    let note =
        if not high then ""
        elif centred then sprintf " (above %.1f: centred by the mean-initialised biases)" MeanStdWarning
        else sprintf " — WARNING: above %.1f and the coder does not centre its inputs; expect dead features (use an input bias initialised to the mean)" MeanStdWarning
    sprintf "‖mean‖/‖std‖ of the inputs %s, of the targets %s%s" (show rx) (show ry) note
