/// AdamW with decoupled weight decay on matrices only, gradient clipping by global norm, and the
/// optimizer state as named tensors (for checkpoints). The one optimizer of the language-model and coder trainers.
module Transcoders.Training.Optim

open System
open System.Text.Json.Nodes
open TorchSharp
open TorchSharp.Modules

/// AdamW's hyperparameters (the learning rate comes from the schedule at every step).
/// Defaults are PyTorch's, spelled out: TorchSharp's own default weight decay is 0, PyTorch's 0.01.
type AdamWConfig =
    { Beta1: float
      Beta2: float
      Eps: float
      /// Decoupled weight decay λ (the update multiplies a decayed weight by 1 − lr·λ).
      WeightDecay: float }
    static member Default = { Beta1 = 0.9; Beta2 = 0.999; Eps = 1e-8; WeightDecay = 0.01 }

/// Problems with the values, as readable messages (empty when valid).
let problems (c: AdamWConfig) : string list =
    [ if not (c.Beta1 >= 0.0 && c.Beta1 < 1.0) then sprintf "Beta1 must be in [0, 1), got %g" c.Beta1
      if not (c.Beta2 >= 0.0 && c.Beta2 < 1.0) then sprintf "Beta2 must be in [0, 1), got %g" c.Beta2
      if not (c.Eps >= 0.0 && Double.IsFinite c.Eps) then sprintf "Eps must be finite and >= 0, got %g" c.Eps
      if not (c.WeightDecay >= 0.0 && Double.IsFinite c.WeightDecay) then
          sprintf "WeightDecay must be finite and >= 0, got %g" c.WeightDecay ]

/// The configuration as JSON (beta1, beta2, eps, weight_decay).
let toJson (c: AdamWConfig) =
    let o = JsonObject()
    o["beta1"] <- JsonValue.Create c.Beta1
    o["beta2"] <- JsonValue.Create c.Beta2
    o["eps"] <- JsonValue.Create c.Eps
    o["weight_decay"] <- JsonValue.Create c.WeightDecay
    o

/// Reads `toJson`'s output, naming a missing field.
let ofJson (node: JsonNode) : AdamWConfig =
    let get (k: string) =
        match node[k] with
        | null -> failwithf "optimizer: missing field '%s' in %s" k (node.ToJsonString())
        | v -> v.GetValue<float>()
    { Beta1 = get "beta1"; Beta2 = get "beta2"; Eps = get "eps"; WeightDecay = get "weight_decay" }

/// The usual rule for which parameters get weight decay: matrices and embeddings (≥ 2-D) do;
/// biases and normalisation gains (1-D) and scalars do not.
let decays (_name: string) (p: Parameter) = p.dim() >= 2L

/// The global L2 norm of the gradients of `parameters` (those without a gradient count as zero).
let gradNorm (parameters: Parameter seq) : float =
    use _ = torch.no_grad ()
    use scope = torch.NewDisposeScope()
    let norms =
        [| for p in parameters do
               let g = p.grad
               if not (isNull g) then torch.linalg.vector_norm(g.detach(), 2.0, null, false).to_type(torch.float64) |]
    if norms.Length = 0 then 0.0
    else torch.linalg.vector_norm(torch.stack(norms), 2.0, null, false).cpu().item<float>()

/// Scales gradients in place so that their global L2 norm is at most `maxNorm`
/// (torch.nn.utils.clip_grad_norm_) and returns the norm BEFORE clipping.
let clipGradNorm (parameters: Parameter seq) (maxNorm: float) : float =
    if not (maxNorm > 0.0) then invalidArg "maxNorm" (sprintf "maxNorm must be > 0, got %g" maxNorm)
    torch.nn.utils.clip_grad_norm_(parameters, maxNorm, 2.0)

/// AdamW over named parameters: Adam (Kingma & Ba, bias-corrected) with decoupled weight decay (Loshchilov & Hutter)
/// for the parameters `decay` selects and none for the rest. The learning rate is set per step (`SetLearningRate`).
/// One optimizer serves the language-model trainer and the sparse-coder trainer (which decays nothing, and resets the
/// moments of resampled features through `ResetMasked`).
///
/// The update of a parameter p with gradient g at its t-th step, at rate lr and decay λ:
///     p ← p·(1 − lr·λ)                                   (only when λ > 0)
///     m ← m + (1 − β1)·(g − m)                           (one lerp: β1·m + (1 − β1)·g)
///     v ← β2·v + (1 − β2)·g²
///     p ← p − lr·(√bc2/bc1)·m/(√v + ε·√bc2)              (= lr·m̂/(√v̂ + ε) with bc_i = 1 − β_i^t; one pass fewer)
/// Parameters without a gradient are skipped (their step count does not advance), as in PyTorch.
type AdamW(parameters: (string * Parameter) seq, config: AdamWConfig, ?decay: string -> Parameter -> bool) =
    do
        match problems config with
        | [] -> ()
        | ps -> invalidArg "config" (sprintf "invalid AdamW configuration: %s" (String.concat "; " ps))
    let named = Array.ofSeq parameters
    do
        if named.Length = 0 then invalidArg "parameters" "AdamW needs at least one parameter"
        match named |> Array.countBy fst |> Array.filter (fun (_, n) -> n > 1) with
        | [||] -> ()
        | dups -> invalidArg "parameters" (sprintf "duplicate parameter names: %s" (dups |> Array.map fst |> String.concat ", "))
        for (n, p) in named do
            if not p.requires_grad then invalidArg "parameters" (sprintf "parameter '%s' does not require a gradient" n)
    let decay = defaultArg decay decays
    let decayed, plain = named |> Array.partition (fun (n, p) -> decay n p)
    let decayedNames = decayed |> Array.map fst |> Set.ofArray
    /// Per parameter: the parameter, its first and second moments, its weight decay, its step count.
    let states =
        named
        |> Array.map (fun (n, p) ->
            use _ = torch.no_grad ()
            // the moments outlive any dispose scope open while the optimizer is created
            let m = torch.zeros_like(p).DetachFromDisposeScope()
            let v = torch.zeros_like(p).DetachFromDisposeScope()
            n, (p, m, v, (if decayedNames.Contains n then config.WeightDecay else 0.0), ref 0L))
    let byName = dict states
    let sc (x: float) : Scalar = Scalar.op_Implicit x
    let mutable lr = 0.0

    /// The parameters, in the order given.
    member _.Parameters = named
    /// Names of the parameters that get weight decay.
    member _.Decayed = decayed |> Array.map fst
    /// Names of the parameters that get none.
    member _.NotDecayed = plain |> Array.map fst
    member _.Config = config

    /// The learning rate the next `Step` uses.
    member _.LearningRate = lr
    member _.SetLearningRate(value: float) =
        if not (Double.IsFinite value) || value < 0.0 then invalidArg "value" (sprintf "learning rate must be finite and >= 0, got %g" value)
        lr <- value

    /// Zeroes every gradient (in place, keeping the buffers; parameters without one are skipped).
    member _.ZeroGrad() =
        for _, p in named do
            let g = p.grad
            if not (isNull g) then
                use g = g
                g.zero_() |> ignore

    /// One AdamW update of every parameter that has a gradient, at `LearningRate`.
    member _.Step() =
        use _ = torch.no_grad ()
        use scope = torch.NewDisposeScope()
        let b1, b2, eps = config.Beta1, config.Beta2, config.Eps
        // lerp_ takes its weight as a tensor of the parameter's dtype and device: one per kind
        let weights = Collections.Generic.Dictionary<struct (torch.ScalarType * string), torch.Tensor>()
        let weight (p: torch.Tensor) =
            let key = struct (p.dtype, p.device.ToString())
            match weights.TryGetValue key with
            | true, w -> w
            | _ ->
                let w = torch.tensor(1.0 - b1, dtype = p.dtype, device = p.device)
                weights[key] <- w
                w
        for _, (p, m, v, wd, count) in states do
            let g = p.grad
            if not (isNull g) then
                use g = g
                count.Value <- count.Value + 1L
                let t = float count.Value
                let bc1 = 1.0 - Math.Pow(b1, t)
                let bc2 = 1.0 - Math.Pow(b2, t)
                if wd > 0.0 then p.mul_(sc (1.0 - lr * wd)) |> ignore
                m.lerp_(g, weight p) |> ignore
                v.mul_(sc b2).addcmul_(g, g, value = sc (1.0 - b2)) |> ignore
                use denom = v.sqrt()
                denom.add_(sc (eps * Math.Sqrt bc2)) |> ignore
                p.addcdiv_(m, denom, value = sc (-lr * Math.Sqrt bc2 / bc1)) |> ignore

    /// The number of updates applied to a parameter so far.
    member _.StepCount(name: string) =
        match byName.TryGetValue name with
        | true, (_, _, _, _, count) -> count.Value
        | _ -> invalidArg "name" (sprintf "no parameter named '%s' in the optimizer" name)

    /// The first and second moments of a parameter (the live tensors, not copies).
    member _.Moments(name: string) : torch.Tensor * torch.Tensor =
        match byName.TryGetValue name with
        | true, (_, m, v, _, _) -> m, v
        | _ -> invalidArg "name" (sprintf "no parameter named '%s' in the optimizer" name)

    /// Zeroes both moments of parameter `name` where `mask` (bool, broadcastable to the parameter) is true: the
    /// entries of a sparse coder's resampled features start afresh.
    member this.ResetMasked(name: string, mask: torch.Tensor) =
        use _ = torch.no_grad ()
        let m, v = this.Moments name
        m.masked_fill_(mask, sc 0.0) |> ignore
        v.masked_fill_(mask, sc 0.0) |> ignore

    /// The optimizer state as named tensors (views of the live state, not copies): for each parameter
    /// `{name}.exp_avg`, `{name}.exp_avg_sq` (same shape as the parameter) and `{name}.step` (0-d int64).
    /// The `step` tensors are new; dispose them (or create them inside a dispose scope).
    member _.StateTensors() : (string * torch.Tensor) list =
        [ for (n, (_, m, v, _, count)) in states do
              yield n + ".exp_avg", m
              yield n + ".exp_avg_sq", v
              yield n + ".step", torch.tensor(count.Value, dtype = torch.int64) ]

    /// Replaces the state with tensors looked up by the names `StateTensors` uses. Every tensor is
    /// checked (present, shape, dtype) before anything changes; a problem raises InvalidDataException
    /// naming the tensor.
    member _.LoadState(find: string -> torch.Tensor option) =
        let bad msg = raise (IO.InvalidDataException msg)
        let shapeText (s: int64[]) = "[" + (s |> Array.map string |> String.concat ", ") + "]"
        let need (key: string) (expectShape: int64[]) (expectType: torch.ScalarType) =
            match find key with
            | None -> bad (sprintf "optimizer state '%s' is missing" key)
            | Some (t: torch.Tensor) ->
                if t.shape <> expectShape then
                    bad (sprintf "optimizer state '%s' has shape %s, expected %s" key (shapeText t.shape) (shapeText expectShape))
                if t.dtype <> expectType then
                    bad (sprintf "optimizer state '%s' has dtype %A, expected %A" key t.dtype expectType)
                t
        let loaded =
            [ for (n, (_, m0, v0, _, count)) in states do
                  let m = need (n + ".exp_avg") m0.shape m0.dtype
                  let v = need (n + ".exp_avg_sq") v0.shape v0.dtype
                  let k = need (n + ".step") [||] torch.int64
                  let steps = k.item<int64>()
                  if steps < 0L then bad (sprintf "optimizer state '%s.step' is negative (%d)" n steps)
                  yield m0, v0, count, m, v, steps ]
        use _ = torch.no_grad ()
        for (m0, v0, count, m, v, steps) in loaded do
            m0.copy_(m) |> ignore
            v0.copy_(v) |> ignore
            count.Value <- steps

    interface IDisposable with
        member _.Dispose() =
            for _, (_, m, v, _, _) in states do
                m.Dispose()
                v.Dispose()
