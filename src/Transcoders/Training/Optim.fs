/// AdamW with decoupled weight decay on matrices only, gradient clipping by global norm, and the
/// optimizer state as named tensors (for checkpoints).
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

/// AdamW over named parameters, in two parameter groups: weight decay for those `decay` selects,
/// none for the rest. The learning rate is set per step (`SetLearningRate`).
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
    let group (ps: (string * Parameter)[]) (wd: float) =
        let o = AdamW.Options()
        o.LearningRate <- Nullable 0.0
        o.InitialLearningRate <- 0.0
        o.beta1 <- Nullable config.Beta1
        o.beta2 <- Nullable config.Beta2
        o.eps <- Nullable config.Eps
        o.weight_decay <- Nullable wd
        o.amsgrad <- Nullable false
        o.maximize <- Nullable false
        AdamW.ParamGroup(ps |> Array.map snd, o)
    // Parameter order inside the optimizer: the decayed group, then the other; states follow it.
    let ordered = Array.append decayed plain
    let groups =
        [| if decayed.Length > 0 then group decayed config.WeightDecay
           if plain.Length > 0 then group plain 0.0 |]
    let inner = new Modules.AdamW(groups, 0.0, config.Beta1, config.Beta2, config.Eps, config.WeightDecay, false, false)
    let states =
        let st = inner.state_dict().State
        if st.Count <> ordered.Length then
            failwithf "AdamW: expected %d parameter states, TorchSharp holds %d" ordered.Length st.Count
        // TorchSharp creates the state with zeros_like inside whatever dispose scope is open; it must outlive it.
        for s in st do
            let s = s :?> Modules.AdamW.State
            s.exp_avg.DetachFromDisposeScope() |> ignore
            s.exp_avg_sq.DetachFromDisposeScope() |> ignore
        Array.init ordered.Length (fun i -> fst ordered[i], st[i] :?> Modules.AdamW.State) |> Map.ofArray
    let mutable lr = 0.0

    /// The parameters, in the order given.
    member _.Parameters = named
    /// Names of the parameters that get weight decay.
    member _.Decayed = decayed |> Array.map fst
    /// Names of the parameters that get none.
    member _.NotDecayed = plain |> Array.map fst
    member _.Config = config
    /// TorchSharp's optimizer underneath.
    member _.Inner = inner

    /// The learning rate the next `Step` uses.
    member _.LearningRate = lr
    member _.SetLearningRate(value: float) =
        if not (Double.IsFinite value) || value < 0.0 then invalidArg "value" (sprintf "learning rate must be finite and >= 0, got %g" value)
        lr <- value
        for g in inner.ParamGroups do g.LearningRate <- value

    /// Zeroes every gradient (in place, keeping the buffers).
    member _.ZeroGrad() = inner.zero_grad ()

    /// One AdamW update of every parameter that has a gradient.
    member _.Step() = inner.step () |> ignore

    /// The number of updates applied to a parameter so far.
    member _.StepCount(name: string) =
        match states.TryFind name with
        | Some s -> s.step
        | None -> invalidArg "name" (sprintf "no parameter named '%s' in the optimizer" name)

    /// The optimizer state as named tensors (views of the live state, not copies): for each parameter
    /// `{name}.exp_avg`, `{name}.exp_avg_sq` (same shape as the parameter) and `{name}.step` (0-d int64).
    /// The `step` tensors are new; dispose them (or create them inside a dispose scope).
    member _.StateTensors() : (string * torch.Tensor) list =
        [ for (n, _) in named do
              let s = states[n]
              yield n + ".exp_avg", s.exp_avg
              yield n + ".exp_avg_sq", s.exp_avg_sq
              yield n + ".step", torch.tensor(s.step, dtype = torch.int64) ]

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
            [ for (n, _) in named do
                  let s = states[n]
                  let m = need (n + ".exp_avg") s.exp_avg.shape s.exp_avg.dtype
                  let v = need (n + ".exp_avg_sq") s.exp_avg_sq.shape s.exp_avg_sq.dtype
                  let k = need (n + ".step") [||] torch.int64
                  let count = k.item<int64>()
                  if count < 0L then bad (sprintf "optimizer state '%s.step' is negative (%d)" n count)
                  yield s, m, v, count ]
        use _ = torch.no_grad ()
        for (s, m, v, count) in loaded do
            s.exp_avg.copy_(m) |> ignore
            s.exp_avg_sq.copy_(v) |> ignore
            s.step <- count

    interface IDisposable with
        member _.Dispose() = inner.Dispose()
