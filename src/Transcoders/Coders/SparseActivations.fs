/// Sparse activation functions: JumpReLU and its step function (custom autograd with a rectangle-kernel
/// straight-through estimator for the threshold), TopK and BatchTopK.
module Transcoders.Coders.SparseActivations

open System.Collections.Generic
open TorchSharp
open Transcoders.Coders.Scalars

type Tensor = torch.Tensor

/// Sums `g` over the dimensions where `shape` was broadcast, so that the result has exactly `shape`.
let sumToShape (g: Tensor) (shape: int64[]) : Tensor =
    let extra = int (g.dim()) - shape.Length
    let mutable r = if extra > 0 then g.sum([| for i in 0 .. extra - 1 -> int64 i |], keepdim = false) else g.alias()
    let dims = [| for i in 0 .. shape.Length - 1 do if shape[i] = 1L && r.shape[i] <> 1L then yield int64 i |]
    if dims.Length > 0 then
        let s = r.sum(dims, keepdim = true)
        r.Dispose()
        r <- s
    r

/// K(u) = 1 when |u| < ½, else 0 (the rectangle kernel), in `like`'s dtype.
let rectangle (u: Tensor) : Tensor =
    use lo = u.gt(sc -0.5)
    use hi = u.lt(sc 0.5)
    use both = lo.logical_and hi
    both.to_type u.dtype

let private bandwidthOf (ctx: torch.autograd.AutogradContext) = ctx.get_data "bandwidth" :?> float

/// Tensors a custom autograd `backward` hands to the engine. On CUDA the engine calls `backward` on its device thread,
/// where no dispose scope exists, so neither these gradients nor the incoming gradient wrapper would be freed before
/// the .NET finaliser runs (gigabytes per step at large widths). `backward` queues them here, and they are disposed
/// once the engine has taken its own references (it copies each returned handle as soon as `backward` returns).
///
/// The queue is per thread: only the thread that ran a `backward` disposes what that `backward` queued, at a point
/// where that call has certainly returned: its next custom `backward`, its next custom forward, or `release` after
/// `backward()` (the CPU engine runs `backward` on the calling thread). A process-wide queue let one thread's forward
/// dispose the gradients another thread's `backward` had just returned, before the engine copied them: wrong
/// gradients or a crash when two coders train on two threads (the flaky parallel test suite of issue 9).
module BackwardTensors =
    let private pending = new System.Threading.ThreadLocal<Queue<Tensor>>(fun () -> Queue<Tensor>())

    /// Disposes every tensor queued by this thread's earlier `backward` calls. Safe at any time on any thread: it
    /// never touches what another thread queued, and this thread's earlier `backward` calls have all returned.
    let release () =
        let q = pending.Value
        while q.Count > 0 do
            q.Dequeue().Dispose()

    /// Detaches `t` from any dispose scope and queues it for this thread's next `release` (null passes through).
    let keep (t: Tensor) : Tensor =
        if not (isNull t) then
            t.DetachFromDisposeScope() |> ignore
            pending.Value.Enqueue t
        t

    /// The gradients of a `backward`, queued (see `keep`) with the incoming gradient, after releasing what this
    /// thread's previous `backward` calls queued (so a long backward pass on the CUDA engine thread stays bounded).
    let result (gradOutput: Tensor) (grads: Tensor list) : List<Tensor> =
        release ()
        keep gradOutput |> ignore
        List<Tensor>(grads |> List.map keep)

/// The forward of the JumpReLU functions: (z, θ, bandwidth) saved for the backward; returns z and θ.
let private saveInputs (ctx: torch.autograd.AutogradContext) (vars: obj[]) : Tensor * Tensor =
    BackwardTensors.release ()
    let z = vars[0] :?> Tensor
    let theta = vars[1] :?> Tensor
    ctx.save_for_backward(List<Tensor>([ z; theta ]))
    ctx.save_data("bandwidth", vars[2])
    z, theta

/// JumpReLU(z; θ) = z·H(z − θ). Backward: ∂/∂z = H(z − θ) (no estimator on z);
/// ∂/∂θ = −(θ/ε)·K((z − θ)/ε), summed to θ's shape.
type JumpReLUFunction() =
    inherit torch.autograd.SingleTensorFunction<JumpReLUFunction>()
    override _.Name = "JumpReLU"
    override _.forward(ctx: torch.autograd.AutogradContext, vars: obj[]) : Tensor =
        let z, theta = saveInputs ctx vars
        use mask = z.gt theta
        z.mul mask
    override _.backward(ctx: torch.autograd.AutogradContext, gradOutput: Tensor) : List<Tensor> =
        let eps = bandwidthOf ctx
        let saved = ctx.get_saved_variables ()
        use z = saved[0]
        use theta = saved[1]
        use mask = z.gt theta
        let gz = gradOutput.mul mask
        use diff = z.sub theta
        use u = diff.div(sc eps)
        use k = rectangle u
        use scaled = theta.div(sc -eps)
        use g1 = scaled.mul k
        use g2 = g1.mul gradOutput
        let gtheta = sumToShape g2 theta.shape
        BackwardTensors.result gradOutput [ gz; gtheta; null ]

/// Step(z; θ) = H(z − θ), the count behind an L0 penalty. Backward: no gradient to z;
/// ∂/∂θ = −(1/ε)·K((z − θ)/ε), summed to θ's shape.
type StepFunction() =
    inherit torch.autograd.SingleTensorFunction<StepFunction>()
    override _.Name = "JumpReLUStep"
    override _.forward(ctx: torch.autograd.AutogradContext, vars: obj[]) : Tensor =
        let z, theta = saveInputs ctx vars
        use mask = z.gt theta
        mask.to_type z.dtype
    override _.backward(ctx: torch.autograd.AutogradContext, gradOutput: Tensor) : List<Tensor> =
        let eps = bandwidthOf ctx
        let saved = ctx.get_saved_variables ()
        use z = saved[0]
        use theta = saved[1]
        use diff = z.sub theta
        use u = diff.div(sc eps)
        use k = rectangle u
        use g1 = k.mul(sc (-1.0 / eps))
        use g2 = g1.mul gradOutput
        let gtheta = sumToShape g2 theta.shape
        BackwardTensors.result gradOutput [ null; gtheta; null ]

/// JumpReLU with a straight-through estimator for θ (θ broadcastable against z, e.g. [L, 1, d_sae]).
let jumpReLU (z: Tensor) (theta: Tensor) (bandwidth: float) : Tensor =
    torch.autograd.SingleTensorFunction<JumpReLUFunction>.apply(z, theta, box bandwidth)

/// Heaviside step H(z − θ) with a straight-through estimator for θ: sum it over features for an L0 penalty.
let step (z: Tensor) (theta: Tensor) (bandwidth: float) : Tensor =
    torch.autograd.SingleTensorFunction<StepFunction>.apply(z, theta, box bandwidth)

/// TopK over the last dimension: ReLU, then keep the k largest values of each row; others are zero.
/// Gradients flow only through the kept entries.
let topK (k: int) (pre: Tensor) : Tensor =
    use r = pre.relu ()
    let struct (values, indices) = r.topk(k, dim = -1, largest = true, sorted = false)
    use values = values
    use indices = indices
    use z = torch.zeros_like r
    z.scatter(-1L, indices, values)

/// BatchTopK over a [..., B, F] tensor: ReLU, then for each leading index keep the round(k·B) largest of its
/// B·F values (k per token on average). Returns the activations and, per leading index, the smallest positive
/// kept value (NaN where none is positive), the natural JumpReLU threshold for inference.
let batchTopK (k: float) (pre: Tensor) : Tensor * Tensor =
    let shape = pre.shape
    let nd = shape.Length
    if nd < 2 then invalidArg "pre" (sprintf "batchTopK needs [..., batch, features], got shape %A" shape)
    let b, f = shape[nd - 2], shape[nd - 1]
    let lead = shape[.. nd - 3]
    let groups = Array.fold (*) 1L lead
    let keep = max 1L (min (b * f) (int64 (System.Math.Round(k * float b))))
    use r = pre.relu ()
    use flat = r.reshape(groups, b * f)
    let struct (values, indices) = flat.topk(int keep, dim = -1, largest = true, sorted = false)
    use values = values
    use indices = indices
    use z = torch.zeros_like flat
    use scattered = z.scatter(-1L, indices, values)
    let acts = scattered.reshape shape
    let minKept =
        use _ = torch.no_grad ()
        use pos = values.gt(sc 0.0)
        use inf = torch.full_like(values, sc System.Double.PositiveInfinity)
        use masked = torch.where(pos, values, inf)
        use m = masked.amin([| -1L |])
        use isInf = m.isinf ()
        use nan = torch.full_like(m, sc System.Double.NaN)
        use chosen = torch.where(isInf, nan, m)
        chosen.reshape(if lead.Length = 0 then [||] else lead)
    acts, minKept

/// The k largest (ReLU'd) pre-activations of each row as (values, indices), both [..., k] (values ≥ 0; a row with
/// fewer than k positive entries keeps zeros at arbitrary other indices). Differentiable in the values.
let topKSparse (k: int) (pre: Tensor) : Tensor * Tensor =
    let struct (values, indices) = pre.topk(k, dim = -1, largest = true, sorted = false)
    use values = values
    values.relu (), indices

/// GroupMax as (values, indices) [..., k]: the last dimension (F, divisible by k) is split into k contiguous groups of
/// F/k; each group keeps its largest pre-activation, ReLU'd (sparsify's GroupMax). Differentiable in the values.
let groupMaxSparse (k: int) (pre: Tensor) : Tensor * Tensor =
    let shape = pre.shape
    let nd = shape.Length
    let f = shape[nd - 1]
    if f % int64 k <> 0L then invalidArg "pre" (sprintf "GroupMax: %d features do not split into %d equal groups" f k)
    let size = f / int64 k
    use grouped = pre.reshape(Array.append shape[.. nd - 2] [| int64 k; size |])
    let struct (values, local) = grouped.max(-1L, false)
    use values = values
    use local = local
    use offsets = torch.arange(0L, f, size, dtype = torch.int64, device = pre.device)
    values.relu (), local.add offsets

/// Dense activations [..., F] from (values, indices) [..., k]: zeros except the given entries.
let scatterActive (like: Tensor) (values: Tensor, indices: Tensor) : Tensor =
    use z = torch.zeros_like like
    use v = values.to_type like.dtype
    z.scatter(-1L, indices, v)

/// GroupMax over the last dimension as dense activations (see `groupMaxSparse`).
let groupMax (k: int) (pre: Tensor) : Tensor =
    let values, indices = groupMaxSparse k pre
    use values = values
    use indices = indices
    scatterActive pre (values, indices)
