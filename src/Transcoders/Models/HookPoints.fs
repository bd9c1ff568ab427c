namespace Transcoders.Models

open System
open System.Collections.Generic
open System.Text.RegularExpressions
open TorchSharp

/// Shapes in messages, written as [2, 16, 64].
module internal Shape =
    let show (shape: int64 seq) = "[" + String.Join(", ", shape) + "]"

/// Hook point names, as in TransformerLens. Shapes (b = batch, p = positions of this call, P = all key
/// positions including a KV cache's past, h = query heads, k = key/value heads, d = d_model, e = d_head,
/// m = d_mlp):
/// hook_embed, hook_pos_embed [b,p,d] (pos only with learned positions);
/// blocks.{l}.hook_resid_pre, hook_resid_mid (not with a parallel residual), hook_resid_post, hook_attn_out, hook_mlp_out [b,p,d];
/// blocks.{l}.ln1.hook_scale, ln2.hook_scale, ln_final.hook_scale [b,p,1] (the divisor √(var+ε) or
/// √(mean x²+ε); only with LayerNorm or RMSNorm); ln1.hook_normalized, ln2.hook_normalized,
/// ln_final.hook_normalized [b,p,d] (the norm's output after its weight and bias, i.e. the input of the
/// sublayer; the identity without normalisation); blocks.{l}.attn.hook_q [b,p,h,e], hook_k, hook_v
/// [b,p,k,e] (before rotation), hook_rot_q [b,p,h,e], hook_rot_k [b,p,k,e] (rotary only),
/// hook_attn_scores [b,h,p,P] (scaled, masked with −∞), hook_pattern [b,h,p,P], hook_z [b,p,h,e];
/// blocks.{l}.mlp.hook_pre [b,p,m] (the gate's pre-activation when gated), hook_pre_linear [b,p,m]
/// (gated only: the linear branch), hook_post [b,p,m].
[<RequireQualifiedAccess>]
module HookNames =
    let embed = "hook_embed"
    let posEmbed = "hook_pos_embed"
    let inBlock (layer: int) (name: string) = "blocks." + string layer + "." + name
    let residPre l = inBlock l "hook_resid_pre"
    let ln1Scale l = inBlock l "ln1.hook_scale"
    let ln1Normalized l = inBlock l "ln1.hook_normalized"
    let attnQ l = inBlock l "attn.hook_q"
    let attnK l = inBlock l "attn.hook_k"
    let attnV l = inBlock l "attn.hook_v"
    let attnRotQ l = inBlock l "attn.hook_rot_q"
    let attnRotK l = inBlock l "attn.hook_rot_k"
    let attnScores l = inBlock l "attn.hook_attn_scores"
    let pattern l = inBlock l "attn.hook_pattern"
    let z l = inBlock l "attn.hook_z"
    let attnOut l = inBlock l "hook_attn_out"
    let residMid l = inBlock l "hook_resid_mid"
    let ln2Scale l = inBlock l "ln2.hook_scale"
    let ln2Normalized l = inBlock l "ln2.hook_normalized"
    /// The MLP's input: `blocks.{l}.ln2.hook_normalized`.
    let mlpIn l = ln2Normalized l
    let mlpPre l = inBlock l "mlp.hook_pre"
    let mlpPreLinear l = inBlock l "mlp.hook_pre_linear"
    let mlpPost l = inBlock l "mlp.hook_post"
    let mlpOut l = inBlock l "hook_mlp_out"
    let residPost l = inBlock l "hook_resid_post"
    let lnFinalScale = "ln_final.hook_scale"
    let lnFinalNormalized = "ln_final.hook_normalized"

    /// Every hook point of a model of this configuration, in the order the forward pass reaches them.
    let all (c: TransformerConfig) : string list =
        let hasScale = c.Norm <> NoNorm
        let rotary = match c.Positions with Rotary _ -> true | Learned -> false
        let gated = match c.Mlp with Gated _ -> true | Plain _ -> false
        [ yield embed
          if not rotary then yield posEmbed
          for l in 0 .. c.NLayers - 1 do
              yield residPre l
              if hasScale then yield ln1Scale l
              yield ln1Normalized l
              yield! [ attnQ l; attnK l; attnV l ]
              if rotary then yield! [ attnRotQ l; attnRotK l ]
              yield! [ attnScores l; pattern l; z l; attnOut l ]
              if not c.ParallelResidual then yield residMid l
              if hasScale then yield ln2Scale l
              yield ln2Normalized l
              yield mlpPre l
              if gated then yield mlpPreLinear l
              yield! [ mlpPost l; mlpOut l; residPost l ]
          if hasScale && c.FinalNorm then yield lnFinalScale
          yield lnFinalNormalized ]

    let private levenshtein (a: string) (b: string) =
        let d = Array2D.init (a.Length + 1) (b.Length + 1) (fun i j -> if i = 0 then j elif j = 0 then i else 0)
        for i in 1 .. a.Length do
            for j in 1 .. b.Length do
                let cost = if a.[i - 1] = b.[j - 1] then 0 else 1
                d.[i, j] <- min (min (d.[i - 1, j] + 1) (d.[i, j - 1] + 1)) (d.[i - 1, j - 1] + cost)
        d.[a.Length, b.Length]

    /// Whether `pattern` names hook points by glob: `*` stands for any run of characters.
    let isPattern (pattern: string) = pattern.Contains '*'

    let private globRegex (pattern: string) =
        Regex("^" + Regex.Escape(pattern).Replace(@"\*", ".*") + "$", RegexOptions.CultureInvariant)

    /// The names among `names` that `pattern` (an exact name or a glob with `*`) selects; an
    /// ArgumentException naming the closest names when it selects none.
    let resolveAmong (names: string list) (pattern: string) : string list =
        let hits =
            if isPattern pattern then let r = globRegex pattern in names |> List.filter r.IsMatch
            elif List.contains pattern names then [ pattern ]
            else []
        if hits.IsEmpty then
            let closest =
                names |> List.sortBy (levenshtein pattern) |> List.truncate 5 |> List.map (sprintf "'%s'") |> String.concat ", "
            let layerHint =
                let m = Regex.Match(pattern, @"^blocks\.(\d+)\.")
                let layers = names |> List.filter (fun n -> n.StartsWith "blocks.") |> List.map (fun n -> n.Split('.').[1]) |> List.distinct |> List.length
                if m.Success && int m.Groups.[1].Value >= layers then sprintf " (the model has %d layers, 0..%d)" layers (layers - 1) else ""
            invalidArg "hook" (sprintf "unknown hook point '%s'%s; closest: %s" pattern layerHint closest)
        hits

    /// The hook points of a model of this configuration that `pattern` selects (see `resolveAmong`).
    let resolve (c: TransformerConfig) (pattern: string) = resolveAmong (all c) pattern

/// A function at a hook point: it gets the activation and returns it (to read it) or a replacement
/// of the same shape (patching, ablation, splicing). It runs inside the forward pass, so autograd flows
/// through whatever it returns. Tensors it sees and makes are disposed when the run ends (not when their layer does,
/// so a hook may keep one for a later layer's hook): keep one longer with `.detach().DetachFromDisposeScope()` (then you
/// own it), with `MoveToOuterDisposeScope()` (it then belongs to the scope the run was called in), or ask the run to
/// cache it.
type HookFn = torch.Tensor -> torch.Tensor

/// The hook points of one forward pass: which functions run where and which activations are saved.
/// Made by `HookPoints.Create` with names validated against the model's configuration.
///
/// The model frees each layer's temporaries when the layer ends (`InScope`): what hooks see and make, and the cached
/// values, move to the run's scope (`RunScope`) instead, so they live until the run ends, as the caller expects.
type HookPoints private (hooks: IReadOnlyDictionary<string, HookFn list>, cached: HashSet<string>, detach: bool) =
    let store = Dictionary<string, torch.Tensor>()
    static let none = HookPoints(Dictionary(), HashSet(), true)
    let active = hooks.Count > 0 || cached.Count > 0
    let mutable runScope : DisposeScope = null
    // the scopes the model opened inside the run, innermost last
    let modelScopes = Stack<DisposeScope>()
    // tensors hooks moved out of their scope, now in the scope the run was called in (see `TakeEscaped`)
    let escapedTensors = ResizeArray<IDisposable>()

    /// Moves `t` from the model's scope that owns it (if any) to the run's scope.
    let keepForRun (t: torch.Tensor) =
        if not (isNull runScope) then
            match modelScopes |> Seq.tryFind (fun s -> s.Contains t) with
            | Some s -> s.MoveToOther(runScope, t) |> ignore
            | None -> ()

    /// No hooks and no cache: the plain forward pass.
    static member None = none

    /// Resolves `cache` and `hooks` names (exact or `*` globs) against the configuration's hook points,
    /// failing clearly on an unknown one. Hooks at one point run in list order; the cache keeps the value
    /// after them, detached from autograd when `detach` is true.
    static member Create(config: TransformerConfig, cache: string seq, hooks: (string * HookFn) seq, detach: bool) =
        let names = HookNames.all config
        let cached = HashSet<string>(cache |> Seq.collect (HookNames.resolveAmong names))
        let table = Dictionary<string, HookFn list>()
        for pattern, f in hooks do
            for name in HookNames.resolveAmong names pattern do
                table.[name] <- (match table.TryGetValue name with | true, fs -> fs @ [ f ] | _ -> [ f ])
        HookPoints(table, cached, detach)

    /// Whether a hook or the cache wants this point (lets the model compute optional activations such
    /// as the attention pattern only when someone looks at them).
    member _.Wants(name: string) = active && (hooks.ContainsKey name || cached.Contains name)

    /// Runs the hooks at `name` on `x` and caches the result when asked; returns the (possibly replaced) value.
    /// What the hooks see and make and the cached value stay alive until the run ends (see the type's comment).
    member _.Point(name: string, x: torch.Tensor) : torch.Tensor =
        if not active then x
        else
            let fs = match hooks.TryGetValue name with | true, fs -> fs | _ -> []
            let caches = cached.Contains name
            if fs.IsEmpty && not caches then x
            else
                if not fs.IsEmpty then keepForRun x
                // a hook may move a tensor out of its scope (MoveToOuterDisposeScope) to keep it beyond the run: it then
                // lands in the model's scope that encloses the hooks, and goes on to the scope the run was called in
                let enclosing = if fs.IsEmpty || isNull runScope || modelScopes.Count = 0 then null else modelScopes.Peek()
                let before = if isNull enclosing then null else HashSet<IDisposable>(enclosing.DisposablesView, HashIdentity.Reference)
                let made = torch.NewDisposeScope()
                try
                    let y =
                        fs |> List.fold (fun (t: torch.Tensor) f ->
                            let r = f t
                            if isNull r then invalidOp (sprintf "the hook at '%s' returned null (return the tensor it got to leave it unchanged)" name)
                            if r.shape <> t.shape then
                                invalidOp (sprintf "the hook at '%s' returned shape %s, but the activation there has shape %s" name (Shape.show r.shape) (Shape.show t.shape))
                            r) x
                    if caches then
                        match store.TryGetValue name with
                        | true, old -> old.Dispose()
                        | _ -> ()
                        store.[name] <- (if detach then y.detach() else y.alias())
                    y
                finally
                    let kept = made.DisposablesView
                    if isNull runScope then made.MoveToOuter kept else made.MoveToOther(runScope, kept)
                    made.Dispose()
                    if not (isNull enclosing) then
                        let escaped = enclosing.DisposablesView |> Seq.filter (fun t -> not (before.Contains t)) |> Array.ofSeq
                        if escaped.Length > 0 then
                            enclosing.MoveToOther(runScope, escaped)
                            runScope.MoveToOuter escaped
                            escapedTensors.AddRange escaped

    /// The scope of the run in progress (null outside a run); the model sets it for the run and restores it after.
    member internal _.RunScope
        with get () = runScope
        and set (s: DisposeScope) = if active then runScope <- s

    /// The tensors hooks moved out of their scope since the last call (they are in the scope the run was called in),
    /// for a caller that wraps the run in a scope of its own to move them on to its own caller's.
    member internal _.TakeEscaped() : IDisposable[] =
        let xs = escapedTensors.ToArray()
        escapedTensors.Clear()
        xs

    /// Runs one piece of the forward pass (`f` gets its scope) in its own dispose scope and returns its result in
    /// the enclosing scope: every other tensor made there is freed when it returns, except what hooks saw or made
    /// and the cached values (which move to the run's scope).
    member _.InScope(f: DisposeScope -> torch.Tensor) : torch.Tensor =
        use s = torch.NewDisposeScope()
        if active then modelScopes.Push s
        try
            let y = f s
            if s.Contains y then s.MoveToOuter y else y
        finally
            if active then modelScopes.Pop() |> ignore

    /// The activations cached so far (owned by the run that made this object).
    member _.Cached : IReadOnlyDictionary<string, torch.Tensor> = store
