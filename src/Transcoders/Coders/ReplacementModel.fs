namespace Transcoders.Coders

open System.Collections.Generic
open TorchSharp
open Transcoders.Models
open Transcoders.Coders.Scalars

/// Sums comparing a reference's logits with another model's, position by position (add them over batches;
/// `LogitComparison.fidelity` turns them into means).
type LogitComparison =
    { Positions: int64
      /// Σ over positions of KL(softmax reference ‖ softmax other), nats.
      KlSum: float
      /// Positions where both argmaxes agree.
      Top1Matches: int64
      /// Σ over positions of cos(reference logits, other logits).
      CosineSum: float
      /// Σ over every logit of reference·other, reference², other² and (reference − other)².
      Dot: float
      ReferenceSquares: float
      OtherSquares: float
      SquaredErrors: float
      /// Logits compared (positions × vocabulary).
      Elements: int64
      MaxAbsDiff: float }

    static member Zero =
        { Positions = 0L; KlSum = 0.0; Top1Matches = 0L; CosineSum = 0.0; Dot = 0.0; ReferenceSquares = 0.0
          OtherSquares = 0.0; SquaredErrors = 0.0; Elements = 0L; MaxAbsDiff = 0.0 }

    static member (+)(a: LogitComparison, b: LogitComparison) =
        { Positions = a.Positions + b.Positions; KlSum = a.KlSum + b.KlSum; Top1Matches = a.Top1Matches + b.Top1Matches
          CosineSum = a.CosineSum + b.CosineSum; Dot = a.Dot + b.Dot; ReferenceSquares = a.ReferenceSquares + b.ReferenceSquares
          OtherSquares = a.OtherSquares + b.OtherSquares; SquaredErrors = a.SquaredErrors + b.SquaredErrors
          Elements = a.Elements + b.Elements; MaxAbsDiff = max a.MaxAbsDiff b.MaxAbsDiff }

/// How closely a replacement model's logits follow the original model's.
type Fidelity =
    { /// Token positions compared.
      Positions: int64
      /// Mean over positions of KL(original ‖ replacement) of the next-token distributions, nats.
      KlToOriginal: float
      /// Fraction of positions where both models' most likely next token is the same.
      Top1Agreement: float
      /// Mean over positions of the cosine between the two logit vectors.
      LogitCosine: float
      /// Cosine between all logits flattened (openCLT's measure).
      LogitCosineFlat: float
      /// Mean squared difference of the logits.
      LogitMse: float
      MaxAbsLogitDiff: float }

/// Comparing logits.
[<RequireQualifiedAccess>]
module LogitComparison =

    let private total (t: torch.Tensor) = t.to_type(torch.float64).sum().item<float> ()

    /// The sums comparing `reference` with `other` (same shape [..., vocab]), computed in float32 and summed in
    /// float64. No gradients.
    let ofLogits (reference: torch.Tensor) (other: torch.Tensor) : LogitComparison =
        if reference.shape <> other.shape then
            invalidArg "other" (sprintf "logits of shape %A cannot be compared with logits of shape %A" other.shape reference.shape)
        if reference.dim () < 1L then invalidArg "reference" "logits need a vocabulary dimension"
        use _ = torch.no_grad ()
        use scope = torch.NewDisposeScope()
        let v = reference.shape[int (reference.dim ()) - 1]
        let r = reference.detach().to_type(torch.float32).reshape(-1L, v)
        let o = other.detach().to_type(torch.float32).reshape(-1L, v)
        let lp = r.log_softmax(-1L)
        let lq = o.log_softmax(-1L)
        let kl = lp.exp().mul(lp.sub(lq)).sum(-1L)
        let agree = r.argmax(-1L).eq(o.argmax(-1L))
        let cos = r.mul(o).sum(-1L).div(r.norm(-1, false).mul(o.norm(-1, false)).clamp_min(sc 1e-30))
        let diff = r.sub(o)
        let r64, o64 = r.to_type(torch.float64), o.to_type(torch.float64)
        { Positions = r.shape[0]
          KlSum = total kl
          Top1Matches = agree.sum().item<int64> ()
          CosineSum = total cos
          Dot = r64.mul(o64).sum().item<float> ()
          ReferenceSquares = r64.square().sum().item<float> ()
          OtherSquares = o64.square().sum().item<float> ()
          SquaredErrors = diff.to_type(torch.float64).square().sum().item<float> ()
          Elements = r.numel ()
          MaxAbsDiff = if r.numel () = 0L then 0.0 else float (diff.abs().max().item<float32> ()) }

    /// Means of the sums (NaN where nothing was compared).
    let fidelity (c: LogitComparison) : Fidelity =
        let n = float c.Positions
        { Positions = c.Positions
          KlToOriginal = c.KlSum / n
          Top1Agreement = float c.Top1Matches / n
          LogitCosine = c.CosineSum / n
          LogitCosineFlat = c.Dot / sqrt (c.ReferenceSquares * c.OtherSquares)
          LogitMse = c.SquaredErrors / float c.Elements
          MaxAbsLogitDiff = c.MaxAbsDiff }

/// A model with some of its activations replaced by sparse coders: any subset of MLPs by per-layer (skip)
/// transcoders or a cross-layer transcoder, SAEs on any per-token hooks, with or without error terms, spliced in the
/// same forward pass (see `Splicing`). Runs, caches (the coders' features are extra hook points, e.g.
/// `blocks.3.transcoder.hook_acts`, `blocks.3.clt.hook_acts`, `blocks.3.hook_mlp_out.sae.hook_acts`, which take
/// hooks too), generates and compares with the original. The model and coders are borrowed (not disposed here).
/// Functions over it are in the `ReplacementModel` module.
type ReplacementModel(model: Transformer, coders: Coder list, errors: Splicing.ErrorTerms) =
    do Splicing.validate model.Config coders
    let sites = Splicing.featureSites coders
    let featureNames = sites |> List.map (fun s -> s.Name)
    let names = HookNames.all model.Config @ featureNames

    member _.Model = model
    member _.Coders = coders
    member _.Errors = errors
    /// The coders' feature sites, in coder order then layer order.
    member _.FeatureSites = sites
    /// Hook names of the coders' features.
    member _.FeatureNames = featureNames
    /// Every hook point of a run: the model's (in forward order), then the features'.
    member _.HookNames = names
    /// The same coders with other error terms.
    member _.WithErrors(e: Splicing.ErrorTerms) = ReplacementModel(model, coders, e)

    /// Splits hook patterns (exact names or globs over `HookNames`) into the model's and the features' hooks.
    member _.SplitHooks(hooks: (string * HookFn) list) : (string * HookFn) list * (string * HookFn) list =
        let isFeature = set featureNames
        let resolved = hooks |> List.collect (fun (p, f) -> HookNames.resolveAmong names p |> List.map (fun n -> n, f))
        let features, modelHooks = resolved |> List.partition (fun (n, _) -> isFeature.Contains n)
        modelHooks, features

    /// The hooks of one splice with these feature hooks, and the user's model hooks between writers and readers.
    member this.Hooks(userHooks: (string * HookFn) list, extraFeatureHooks: (string * HookFn) list) : (string * HookFn) list =
        let modelHooks, featureHooks = this.SplitHooks userHooks
        let sh = Splicing.plan { Errors = errors; FeatureHooks = featureHooks @ extraFeatureHooks } coders
        sh.Writers @ modelHooks @ sh.Readers

    /// tokens [batch, pos] → logits [batch, pos, vocab] of the replacement model (the caller owns them).
    member this.Forward(tokens: torch.Tensor) : torch.Tensor =
        Transformer.runWithHooks model (this.Hooks([], [])) tokens

/// Functions over a `ReplacementModel` (composable with |>).
[<RequireQualifiedAccess>]
module ReplacementModel =

    /// The model with these coders spliced in, checked against its configuration (see `Splicing.validate`).
    let create (model: Transformer) (coders: Coder list) (errors: Splicing.ErrorTerms) = ReplacementModel(model, coders, errors)

    /// Logits [batch, pos, vocab] of the replacement model.
    let forward (rm: ReplacementModel) (tokens: torch.Tensor) : torch.Tensor = rm.Forward tokens

    let private runWith (rm: ReplacementModel) (kv: KvCache option) (opts: RunOptions) (tokens: torch.Tensor) : RunResult =
        let isFeature = set rm.FeatureNames
        let cacheNames = opts.Cache |> Seq.collect (HookNames.resolveAmong rm.HookNames) |> Set.ofSeq
        let featureCache = cacheNames |> Set.filter isFeature.Contains
        let store = Dictionary<string, torch.Tensor>()
        let capture (name: string) : HookFn =
            fun t ->
                // kept out of the run's dispose scope: the caller owns it through the result
                let kept = (if opts.DetachCache then t.detach() else t.alias()).DetachFromDisposeScope()
                match store.TryGetValue name with
                | true, old -> old.Dispose()
                | _ -> ()
                store[name] <- kept
                t
        let hooks = rm.Hooks(opts.Hooks, [ for n in featureCache -> n, capture n ])
        let opts' = { opts with Cache = cacheNames - featureCache; Hooks = hooks }
        try
            let r =
                match kv with
                | Some k -> Transformer.runCached rm.Model k opts' tokens
                | None -> Transformer.run rm.Model opts' tokens
            { r with Cache = store |> Seq.fold (fun m (KeyValue(n, t)) -> Map.add n t m) r.Cache }
        with _ ->
            for t in store.Values do t.Dispose()
            reraise ()

    /// A forward pass of the replacement model with caching, hooks and early stopping, as `Transformer.run`. Cache
    /// names and hook names may name the model's hook points and the features' (`rm.FeatureNames`), exactly or by
    /// glob. At a coder's output hook, user hooks see (and the cache keeps) the spliced value; at a coder's input
    /// hook, the coder reads the value after the user's hooks.
    let run (rm: ReplacementModel) (opts: RunOptions) (tokens: torch.Tensor) : RunResult = runWith rm None opts tokens

    /// Logits and the activations at `names` (model hook points and feature names, exact or globs).
    let runWithCache (rm: ReplacementModel) (names: string seq) (tokens: torch.Tensor) : RunResult =
        run rm { RunOptions.Default with Cache = Set.ofSeq names } tokens

    /// Logits of a run with these hooks (on model hook points or features).
    let runWithHooks (rm: ReplacementModel) (hooks: (string * HookFn) list) (tokens: torch.Tensor) : torch.Tensor =
        let r = run rm { RunOptions.Default with Hooks = hooks } tokens
        for t in r.Cache.Values do t.Dispose()
        r.Logits.Value

    /// As `run`, continuing the positions in a KV cache (filled by earlier runs of this replacement model): hooks
    /// and features see only the new positions. With error terms, the error at each new position comes from the
    /// original MLP output there, which the model computes in the same pass.
    let runCached (rm: ReplacementModel) (cache: KvCache) (opts: RunOptions) (tokens: torch.Tensor) : RunResult =
        runWith rm (Some cache) opts tokens

    /// Generation with the replacement model (`Generation.generate` with the splice's hooks; works with the KV cache
    /// and with `o.Hooks` on model hook points or features, e.g. to steer a feature while generating).
    let generate (rm: ReplacementModel) (o: Generation.GenerateOptions) (prompt: int[]) : Generation.Generated =
        Generation.generate rm.Model { o with Hooks = rm.Hooks(o.Hooks, []) } prompt

    /// Greedy continuation by up to `maxNewTokens` tokens.
    let greedy (rm: ReplacementModel) (maxNewTokens: int) (prompt: int[]) : int[] =
        (generate rm { Generation.GenerateOptions.Greedy with MaxNewTokens = maxNewTokens } prompt).Tokens

    /// The comparison sums of the original model's logits and the replacement's on one batch (no gradients).
    let comparison (rm: ReplacementModel) (tokens: torch.Tensor) : LogitComparison =
        use _ = torch.no_grad ()
        use scope = torch.NewDisposeScope()
        let original = Transformer.forward rm.Model tokens
        let replaced = forward rm tokens
        LogitComparison.ofLogits original replaced

    /// How closely the replacement follows the original on these tokens: KL(original ‖ replacement), top-1
    /// agreement, logit cosine (per position and flattened), logit MSE.
    let compare (rm: ReplacementModel) (tokens: torch.Tensor) : Fidelity =
        comparison rm tokens |> LogitComparison.fidelity

    /// `compare` over batches of tokens (one dispose scope per batch).
    let compareOver (rm: ReplacementModel) (batches: torch.Tensor seq) : Fidelity =
        let sums = batches |> Seq.fold (fun acc t -> acc + comparison rm t) LogitComparison.Zero
        if sums.Positions = 0L then invalidArg "batches" "no tokens to compare on"
        LogitComparison.fidelity sums
