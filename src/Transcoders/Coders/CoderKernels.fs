/// Hand-written autograd functions of the coder step that do less work than the composed operations:
/// sparse decoding y[b] = Σ_j v[b, j]·W[i[b, j]] for k active features per row without the dense [B, F] product
/// (forward: a sparse–dense product; backward: the feature-sorted sparse product Sᵀ·G for W and a gather for the
/// values); the encoder of a k-sparse activation with a sparse backward; and the encoder's affine map with the input
/// gradient replaced by the cheap product the input bias needs. Each gives the composed result up to rounding.
module Transcoders.Coders.CoderKernels

open System.Collections.Generic
open TorchSharp

type private Tensor = torch.Tensor

/// The [rows, cols] COO matrix with `values` at (rowIdx, colIdx) (all flat [n]).
let private coo (rowIdx: Tensor) (colIdx: Tensor) (values: Tensor) (rows: int64) (cols: int64) : Tensor =
    use ix = torch.stack([| rowIdx; colIdx |], 0L)
    torch.sparse_coo_tensor(ix, values, [| rows; cols |], dtype = values.dtype, device = values.device)

/// Row index b of every entry of a [B, k] index matrix, flattened: [B·k].
let private rowIds (b: int64) (k: int64) (device: torch.Device) : Tensor =
    use r = torch.arange(b, dtype = torch.int64, device = device)
    use r2 = r.unsqueeze 1
    use e = r2.expand(b, k)
    e.reshape(-1L)

/// The autograd function: inputs (values [B, k], indices [B, k] int64, W [F, D]) → [B, D].
type SparseDecodeFunction() =
    inherit torch.autograd.SingleTensorFunction<SparseDecodeFunction>()
    override _.Name = "SparseDecode"
    override _.forward(ctx: torch.autograd.AutogradContext, vars: obj[]) : Tensor =
        SparseActivations.BackwardTensors.release ()
        let values = vars[0] :?> Tensor
        let indices = vars[1] :?> Tensor
        let w = vars[2] :?> Tensor
        ctx.save_for_backward(List<Tensor>([ values; indices; w ]))
        use scope = torch.NewDisposeScope()
        let b, k = indices.shape[0], indices.shape[1]
        let rows = rowIds b k indices.device
        let cols = indices.reshape(-1L)
        let v = values.reshape(-1L).to_type w.dtype
        let s = coo rows cols v b w.shape[0]
        torch.mm(s, w).MoveToOuterDisposeScope()
    override _.backward(ctx: torch.autograd.AutogradContext, gradOutput: Tensor) : List<Tensor> =
        let saved = ctx.get_saved_variables ()
        use values = saved[0]
        use indices = saved[1]
        use w = saved[2]
        use scope = torch.NewDisposeScope()
        let b, k = indices.shape[0], indices.shape[1]
        let d = w.shape[1]
        let g = gradOutput.to_type w.dtype
        let cols = indices.reshape(-1L)
        // ∂W = Sᵀ·G: the transposed COO matrix [F, B] (coalescing sorts it by feature) times G [B, D]
        let rows = rowIds b k indices.device
        let v = values.reshape(-1L).to_type w.dtype
        let st = coo cols rows v w.shape[0] b
        let gw = torch.mm(st, g)
        // ∂v[b, j] = G[b]·W[i[b, j]]
        let wRows = w.index_select(0L, cols).reshape(b, k, d)
        let gv = torch.bmm(wRows, g.unsqueeze 2).squeeze(2L).to_type values.dtype
        SparseActivations.BackwardTensors.result gradOutput [ gv; null; gw ]

/// y [B, D] = Σ_j values[b, j]·W[indices[b, j]], differentiable in `values` and `w` (W [F, D]).
let decode (values: Tensor) (indices: Tensor) (w: Tensor) : Tensor =
    if values.dim () <> 2L || indices.shape <> values.shape then
        invalidArg "values" (sprintf "sparse decode expects values and indices of the same shape [B, k] (got %A and %A)" values.shape indices.shape)
    torch.autograd.SingleTensorFunction<SparseDecodeFunction>.apply(values, indices, w)

/// The encoder side of a k-sparse activation (TopK, GroupMax) with a sparse backward: the selected pre-activations
/// v[b, j] = pre[b, i[b, j]] where pre = xc·W_enc + b_enc (xc = x − b_in), given `pre` computed without gradient.
/// Inputs: (pre [B, F], indices [B, k], xc [B, D] (no gradient), W_enc [D, F], b_enc [F], b_in [D], hasInputBias).
/// Backward, with g = ∂v scattered into S [B, F]: ∂W_enc = xcᵀ·S (as (Sᵀ·xc)ᵀ, a sparse product), ∂b_enc = Σ_b S[b],
/// ∂b_in = −W_enc·∂b_enc. The dense [B, F] gradient and the two dense backward products are never formed.
type SparseEncodeFunction() =
    inherit torch.autograd.SingleTensorFunction<SparseEncodeFunction>()
    override _.Name = "SparseEncode"
    override _.forward(ctx: torch.autograd.AutogradContext, vars: obj[]) : Tensor =
        SparseActivations.BackwardTensors.release ()
        let pre = vars[0] :?> Tensor
        let indices = vars[1] :?> Tensor
        let xc = vars[2] :?> Tensor
        let wEnc = vars[3] :?> Tensor
        ctx.save_for_backward(List<Tensor>([ indices; xc; wEnc ]))
        ctx.save_data("hasInputBias", vars[6])
        pre.gather(-1L, indices)
    override _.backward(ctx: torch.autograd.AutogradContext, gradOutput: Tensor) : List<Tensor> =
        let hasInputBias = ctx.get_data "hasInputBias" :?> bool
        let saved = ctx.get_saved_variables ()
        use indices = saved[0]
        use xc = saved[1]
        use wEnc = saved[2]
        use scope = torch.NewDisposeScope()
        let b, k = indices.shape[0], indices.shape[1]
        let f = wEnc.shape[1]
        let cols = indices.reshape(-1L)
        let g = gradOutput.reshape(-1L).to_type wEnc.dtype
        let st = coo cols (rowIds b k indices.device) g f b
        let gwT = torch.mm(st, xc.to_type wEnc.dtype)
        let gw = gwT.t()
        let gb = torch.zeros([| f |], dtype = wEnc.dtype, device = wEnc.device).index_add_(0L, cols, g, Scalars.sc 1.0)
        let gbIn = if hasInputBias then torch.mv(wEnc, gb).neg() else null
        SparseActivations.BackwardTensors.result gradOutput [ null; null; null; gw; gb; gbIn; null ]

/// v[b, j] = (xc·W_enc + b_enc)[b, i[b, j]] from a `pre` computed without gradient, differentiable in W_enc, b_enc and
/// (when `bIn` is given, xc = x − b_in) b_in through the sparse backward of `SparseEncodeFunction`. `xc` must not
/// require a gradient.
let encodeSelected (pre: Tensor) (indices: Tensor) (xc: Tensor) (wEnc: Tensor) (bEnc: Tensor) (bIn: Tensor option) : Tensor =
    if xc.requires_grad then invalidArg "xc" "encodeSelected: the input must not require a gradient (its gradient is not computed)"
    let bInT, has =
        match bIn with
        | Some t -> t, true
        | None -> bEnc, false
    torch.autograd.SingleTensorFunction<SparseEncodeFunction>.apply(pre, indices, xc, wEnc, bEnc, bInT, box has)

/// The encoder's affine map pre = xc·W_enc + b_enc over layer-major [L, B, D]·[L, D, F] in the compute dtype `dtype`
/// (float32 master weights cast for the product), where xc = x − b_in and x needs no gradient.
/// Inputs: (xc [L, B, D] (no gradient), W_enc [L, D, F], b_enc [L, F], b_in [L, D], hasInputBias, dtype).
/// Backward: ∂W_enc = xcᵀ·G, ∂b_enc = Σ_b G, and ∂b_in = −W_enc·∂b_enc, a matrix–vector product, instead of the
/// [B, F]·[F, D] product autograd would spend on ∂xc only to sum it over the batch.
type AffineEncodeFunction() =
    inherit torch.autograd.SingleTensorFunction<AffineEncodeFunction>()
    override _.Name = "AffineEncode"
    override _.forward(ctx: torch.autograd.AutogradContext, vars: obj[]) : Tensor =
        SparseActivations.BackwardTensors.release ()
        let xc = vars[0] :?> Tensor
        let wEnc = vars[1] :?> Tensor
        let bEnc = vars[2] :?> Tensor
        let dtype = vars[5] :?> torch.ScalarType
        ctx.save_for_backward(List<Tensor>([ xc; wEnc ]))
        ctx.save_data("hasInputBias", vars[4])
        use scope = torch.NewDisposeScope()
        let cast (t: Tensor) = if t.dtype = dtype then t else t.to_type dtype
        let be = (cast bEnc).unsqueeze 1
        let xw = torch.bmm(cast xc, cast wEnc)
        xw.add_(be).MoveToOuterDisposeScope()
    override _.backward(ctx: torch.autograd.AutogradContext, gradOutput: Tensor) : List<Tensor> =
        let hasInputBias = ctx.get_data "hasInputBias" :?> bool
        let saved = ctx.get_saved_variables ()
        use xc = saved[0]
        use wEnc = saved[1]
        use scope = torch.NewDisposeScope()
        let g = gradOutput
        let xd = if xc.dtype = g.dtype then xc else xc.to_type g.dtype
        let gw = torch.bmm(xd.transpose(1, 2), g)
        let gw = if gw.dtype = wEnc.dtype then gw else gw.to_type wEnc.dtype
        let gb = g.sum([| 1L |], false, wEnc.dtype)
        let gbIn = if hasInputBias then torch.bmm(wEnc, gb.unsqueeze 2).squeeze(2L).neg() else null
        SparseActivations.BackwardTensors.result gradOutput [ null; gw; gb; gbIn; null; null ]

/// pre [L, B, F] = (x − b_in)·W_enc + b_enc in `dtype`, for an input `xc` = x − b_in computed without gradient; the
/// gradients of W_enc, b_enc and (when given) b_in are those of the composed expression (`AffineEncodeFunction`).
let encodeAffine (xc: Tensor) (wEnc: Tensor) (bEnc: Tensor) (bIn: Tensor option) (dtype: torch.ScalarType) : Tensor =
    if xc.requires_grad then invalidArg "xc" "encodeAffine: the input must not require a gradient (its gradient is not computed)"
    let bInT, has =
        match bIn with
        | Some t -> t, true
        | None -> bEnc, false
    torch.autograd.SingleTensorFunction<AffineEncodeFunction>.apply(xc, wEnc, bEnc, bInT, box has, box dtype)
