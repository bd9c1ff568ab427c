/// Splicing sparse coders into a model's forward pass: hooks that read each coder's input where the model
/// computes it and replace the coder's output hook by the coder's prediction, in the same pass (as the
/// transcoder paper's `TranscoderReplacementContext`, SAELens' spliced SAEs and circuit-tracer's replacement
/// model). Optional error terms make the output exact while gradients flow through the coder's features.
module Transcoders.Coders.Splicing

open System
open System.Collections.Generic
open System.Text.RegularExpressions
open TorchSharp
open Transcoders.Models
open Transcoders.Coders.Scalars

type Tensor = torch.Tensor

/// Whether a spliced output carries the coder's error.
type ErrorTerms =
    /// output = ŷ + stop_grad(y − ŷ): the value is the original activation y (the model computes exactly what it
    /// did), but gradients flow only through the coder's prediction ŷ, i.e. through its features (the error is a
    /// constant, as the error nodes of attribution graphs).
    | WithErrorTerms
    /// output = ŷ: the model runs on the coder's reconstruction (spliced CE, replacement models).
    | WithoutErrorTerms

/// One layer's feature activations of one spliced coder, seen as a hook point.
type FeatureSite =
    { /// Position of the coder in the spliced list.
      CoderIndex: int
      /// Index into the coder's layers (0 except for a cross-layer transcoder).
      LayerIndex: int
      /// The model layer whose input the features read.
      Layer: int
      /// Hook name of the features (see `featureHookName`), e.g. `blocks.3.transcoder.hook_acts`.
      Name: string
      /// Features at this site.
      DSae: int }

/// How coders are spliced.
type SpliceOptions =
    { Errors: ErrorTerms
      /// Functions at feature hook points (exact names or `*` globs over the sites' names): each gets one layer's
      /// feature activations [batch, pos, d_sae] after the activation function and returns them or a same-shaped
      /// replacement, which is what gets decoded (reading, ablating or steering features). Run in list order.
      FeatureHooks: (string * HookFn) list }

    /// Without error terms and feature hooks.
    static member Default = { Errors = WithoutErrorTerms; FeatureHooks = [] }

/// The hooks of one splice, by role. At a hook point that is both written and read (an SAE's reconstruction feeding
/// another coder's input, or a user's hook), writers run first: every reader sees the replacement model's value.
type SpliceHooks =
    { /// Hooks that replace an activation: coder outputs (and SAEs, which read and replace one point).
      Writers: (string * HookFn) list
      /// Hooks that read a coder's input and return it unchanged.
      Readers: (string * HookFn) list
      /// Every feature site, in coder order then layer order.
      Sites: FeatureSite list }

    /// Writers, then readers.
    member h.All = h.Writers @ h.Readers

/// The hook name of a coder's features at layer index `layerIndex`: `blocks.{l}.transcoder.hook_acts`,
/// `blocks.{l}.skip_transcoder.hook_acts`, `blocks.{l}.clt.hook_acts`, or `{hook}.sae.hook_acts` for an SAE.
let featureHookName (coder: Coder) (layerIndex: int) : string =
    let cfg = coder.Config
    if layerIndex < 0 || layerIndex >= cfg.NLayers then
        invalidArg "layerIndex" (sprintf "layer index %d is outside 0..%d of this %s" layerIndex (cfg.NLayers - 1) (CoderConfig.kindName cfg.Kind))
    match cfg.Kind with
    | Sae -> cfg.HookIn[layerIndex] + ".sae.hook_acts"
    | Transcoder -> sprintf "blocks.%d.transcoder.hook_acts" cfg.Layers[layerIndex]
    | SkipTranscoder -> sprintf "blocks.%d.skip_transcoder.hook_acts" cfg.Layers[layerIndex]
    | CrossLayerTranscoder -> sprintf "blocks.%d.clt.hook_acts" cfg.Layers[layerIndex]

/// A short description of a coder for messages: "transcoder of layer 3 (blocks.3.ln2.hook_normalized → ...)".
let describe (coder: Coder) : string =
    let cfg = coder.Config
    let hooks =
        Array.zip cfg.HookIn cfg.HookOut
        |> Array.map (fun (i, o) -> if i = o then i else i + " → " + o)
        |> String.concat ", "
    sprintf "%s of layer%s %s (%s)" (CoderConfig.kindName cfg.Kind) (if cfg.NLayers > 1 then "s" else "")
        (cfg.Layers |> Array.map string |> String.concat ",") hooks

/// Every feature site of these coders (names checked to be distinct).
let featureSites (coders: Coder list) : FeatureSite list =
    let sites =
        [ for ci, c in List.indexed coders do
              for i in 0 .. c.NLayers - 1 ->
                  { CoderIndex = ci; LayerIndex = i; Layer = c.Config.Layers[i]; Name = featureHookName c i; DSae = c.Config.DSae } ]
    match sites |> List.countBy (fun s -> s.Name) |> List.tryFind (fun (_, n) -> n > 1) with
    | Some (name, _) ->
        let who = sites |> List.filter (fun s -> s.Name = name) |> List.map (fun s -> sprintf "#%d %s" s.CoderIndex (describe coders[s.CoderIndex]))
        invalidArg "coders" (sprintf "two coders would both have the features '%s' (%s): splice one coder of a kind per layer" name (String.concat " and " who))
    | None -> sites

// ---- one layer of a coder, in the model's units ----

let private checkLayerIndex (coder: Coder) (i: int) =
    if i < 0 || i >= coder.NLayers then
        invalidArg "layerIndex" (sprintf "layer index %d is outside 0..%d of this %s" i (coder.NLayers - 1) (CoderConfig.kindName coder.Config.Kind))

/// [..., d] → [N, d] float32 on the coder's device, with a clear error when the width or device is wrong.
let private rows (coder: Coder) (what: string) (d: int) (x: Tensor) : Tensor =
    if x.dim () < 1L || x.shape[int (x.dim ()) - 1] <> int64 d then
        invalidArg what (sprintf "%s: %s expects a last dimension of %d, got shape %s" what (describe coder) d (Shape.show x.shape))
    let dev = coder.Device
    if x.device_type <> dev.``type`` || (x.device_index >= 0 && dev.index >= 0 && x.device_index <> dev.index) then
        invalidArg what (sprintf "%s is on %O but %s is on %O: load the coder on the model's device" what x.device (describe coder) dev)
    let x2 = x.reshape(-1L, int64 d)
    if x2.dtype = torch.float32 then x2 else x2.to_type torch.float32

/// Pre-activations of layer index i for normalised-unit rows [N, d_in], restricted to `columns` when given.
let private preActivations (coder: Coder) (i: int) (columns: Tensor option) (x: Tensor) : Tensor =
    let cfg = coder.Config
    let s = cfg.Scale.In[i]
    let xn = if s = 1.0 then x else x.mul(sc s)
    let inputBias = coder.InputBias |> Option.map (fun b -> b.select(0, int64 i))
    let w = coder.WEnc.select(0, int64 i)
    let b = coder.BEnc.select(0, int64 i)
    match columns with
    | None -> Encoder.preActivations torch.float32 inputBias w b xn
    | Some idx -> Encoder.preActivations torch.float32 inputBias (w.index_select(1L, idx)) (b.index_select(0L, idx)) xn

/// The threshold of a BatchTopK coder's layer, which splicing uses as a JumpReLU (batch-independent inference).
let private batchTopKThreshold (coder: Coder) (i: int) : float =
    let t = float (coder.BatchTopKThreshold.Value.select(0, int64 i).item<float32> ())
    if Double.IsNaN t || not (t > 0.0) then
        invalidOp (sprintf "%s uses BatchTopK, whose output depends on the batch; splicing runs it as JumpReLU with its calibrated threshold, but layer index %d has none (%g). Train it longer, or calibrate (CoderTraining.calibrateBatchTopKThreshold) and convert it (Coder.toJumpReLU)" (describe coder) i t)
    t

/// Activation function of layer index i on pre-activations [N, k] of `columns` (all features when None).
let private activate (coder: Coder) (i: int) (columns: Tensor option) (pre: Tensor) : Tensor =
    match coder.Config.Activation with
    | ReLU -> pre.relu ()
    | JumpReLU j ->
        let theta = coder.LogThreshold.Value.select(0, int64 i).exp()
        let theta = match columns with Some idx -> theta.index_select(0L, idx) | None -> theta
        SparseActivations.jumpReLU pre theta j.Bandwidth
    | TopK k ->
        if columns.IsSome then invalidOp "TopK needs every feature's pre-activation (use encodeLayer, then select)"
        SparseActivations.topK k pre
    | GroupMax k ->
        if columns.IsSome then invalidOp "GroupMax needs every feature of a group (use encodeLayer, then select)"
        SparseActivations.groupMax k pre
    | BatchTopK _ ->
        let t = batchTopKThreshold coder i
        pre.relu().mul(pre.gt(sc t))

/// Feature activations [..., d_sae] of layer index `layerIndex` of `coder` (0 except for a cross-layer transcoder)
/// from that layer's input x [..., d_in] in the model's units: a = σ((x·s_in − b_in)·W_enc + b_enc). BatchTopK
/// coders run as JumpReLU with their calibrated threshold, so that a token's features do not depend on its batch.
/// Differentiable; the caller owns the result.
let encodeLayer (coder: Coder) (layerIndex: int) (x: Tensor) : Tensor =
    checkLayerIndex coder layerIndex
    use scope = torch.NewDisposeScope()
    let cfg = coder.Config
    let lead = x.shape[.. int (x.dim ()) - 2]
    let xr = rows coder "x" cfg.DIn x
    let a = activate coder layerIndex None (preActivations coder layerIndex None xr)
    a.reshape(Array.append lead [| int64 cfg.DSae |]).MoveToOuterDisposeScope()

/// Activations [..., k] of the features `features` only (each in 0..d_sae−1), computing only their encoder
/// columns (except for TopK, which needs every pre-activation to know which survive).
let encodeFeatures (coder: Coder) (layerIndex: int) (features: int[]) (x: Tensor) : Tensor =
    checkLayerIndex coder layerIndex
    let cfg = coder.Config
    match features |> Array.tryFind (fun f -> f < 0 || f >= cfg.DSae) with
    | Some f -> invalidArg "features" (sprintf "feature %d is outside 0..%d of %s" f (cfg.DSae - 1) (describe coder))
    | None -> ()
    use scope = torch.NewDisposeScope()
    let lead = x.shape[.. int (x.dim ()) - 2]
    let idx = torch.tensor(features |> Array.map int64, device = coder.Device)
    let xr = rows coder "x" cfg.DIn x
    let a =
        match cfg.Activation with
        | TopK _ | GroupMax _ -> (activate coder layerIndex None (preActivations coder layerIndex None xr)).index_select(1L, idx)
        | _ -> activate coder layerIndex (Some idx) (preActivations coder layerIndex (Some idx) xr)
    a.reshape(Array.append lead [| int64 features.Length |]).MoveToOuterDisposeScope()

/// a_i·W_dec^{i→j} for every j ≥ i: [N, L−i, d_out] in normalised units (no bias, no skip path).
let private contributions (coder: Coder) (i: int) (acts: Tensor) : Tensor =
    let cfg = coder.Config
    let span = int64 (cfg.NLayers - i)
    let w = coder.WDec[i].reshape(int64 cfg.DSae, span * int64 cfg.DOut)
    acts.matmul(w).reshape(-1L, span, int64 cfg.DOut)

/// Layer index j's prediction [N, d_out] in the model's units from the contributions of layers 0..j and, for a
/// skip transcoder, that layer's input rows.
let private output (coder: Coder) (j: int) (contribs: Tensor[]) (input: Tensor option) : Tensor =
    let cfg = coder.Config
    let mutable y = contribs[0].select(1, int64 j)
    for i in 1 .. j do y <- y.add(contribs[i].select(1, int64 (j - i)))
    y <- y.add(coder.BDec.select(0, int64 j))
    match coder.WSkip with
    | Some ws ->
        let x = match input with Some x -> x | None -> invalidOp "a skip transcoder needs its input to decode"
        let s = cfg.Scale.In[j]
        let xn = if s = 1.0 then x else x.mul(sc s)
        y <- y.add(xn.matmul(ws.select(0, int64 j).t()))
    | None -> ()
    let s = cfg.Scale.Out[j]
    if s = 1.0 then y else y.div(sc s)

/// Layer index j's prediction [..., d_out] in the model's units: Σ_{i≤j} a_i·W_dec^{i→j} (+ W_skip·x_j) + b_dec_j,
/// from the feature activations `acts` of layers 0..j (each [..., d_sae]) and, for a skip transcoder, layer j's
/// input x [..., d_in]. Differentiable; the caller owns the result.
let decodeLayer (coder: Coder) (layerIndex: int) (acts: Tensor list) (x: Tensor option) : Tensor =
    checkLayerIndex coder layerIndex
    let cfg = coder.Config
    if acts.Length <> layerIndex + 1 then
        invalidArg "acts" (sprintf "decoding layer index %d of %s needs the activations of layers 0..%d (%d), got %d" layerIndex (describe coder) layerIndex (layerIndex + 1) acts.Length)
    use scope = torch.NewDisposeScope()
    let lead = acts.Head.shape[.. int (acts.Head.dim ()) - 2]
    let contribs = acts |> List.mapi (fun i a -> contributions coder i (rows coder "acts" cfg.DSae a)) |> Array.ofList
    let input = x |> Option.map (rows coder "x" cfg.DIn)
    (output coder layerIndex contribs input).reshape(Array.append lead [| int64 cfg.DOut |]).MoveToOuterDisposeScope()

// ---- validation against a model ----

let private blockHook = Regex(@"^blocks\.(\d+)\.(.+)$", RegexOptions.CultureInvariant)

/// The per-token width of a hook point whose activations are [batch, pos, ...] (the product of the trailing
/// dimensions), or None for the points that are not per token (attention scores and patterns).
let hookWidth (config: TransformerConfig) (name: string) : int option =
    let d, e = config.DModel, TransformerConfig.dHead config
    if name = HookNames.embed || name = HookNames.posEmbed || name = HookNames.lnFinalNormalized then Some d
    elif name = HookNames.lnFinalScale then Some 1
    else
        let m = blockHook.Match name
        if not m.Success then None
        else
            match m.Groups[2].Value with
            | "hook_resid_mid" when config.ParallelResidual -> None // no such stream: the MLP reads ln2(resid_pre)
            | "hook_resid_pre" | "hook_resid_mid" | "hook_resid_post" | "hook_attn_out" | "hook_mlp_out"
            | "ln1.hook_normalized" | "ln2.hook_normalized" -> Some d
            | "ln1.hook_scale" | "ln2.hook_scale" -> Some 1
            | "attn.hook_q" | "attn.hook_rot_q" | "attn.hook_z" -> Some (config.NHeads * e)
            | "attn.hook_k" | "attn.hook_v" | "attn.hook_rot_k" -> Some (config.NKvHeads * e)
            | "mlp.hook_pre" | "mlp.hook_pre_linear" | "mlp.hook_post" -> Some config.DMlp
            | _ -> None

/// Checks that these coders can be spliced into a model of this configuration, failing with a message naming the
/// coder and hook at fault: every hook exists and is per token with the coder's width, each input comes before the
/// output it feeds (a cross-layer transcoder's layer-ℓ input before every output ℓ' ≥ ℓ), no hook is written by
/// two coders, and feature names are distinct.
let validate (config: TransformerConfig) (coders: Coder list) =
    let order = HookNames.all config |> List.mapi (fun i n -> n, i) |> dict
    let position (coder: Coder) (name: string) =
        match order.TryGetValue name with
        | true, i -> i
        | _ ->
            let why =
                try
                    HookNames.resolveAmong (HookNames.all config) name |> ignore
                    "it is not a single hook point"
                with :? ArgumentException as e -> e.Message
            invalidArg "coders" (sprintf "%s names the hook '%s', which this model does not have: %s" (describe coder) name why)
    let checkWidth (coder: Coder) (name: string) (d: int) (side: string) =
        match hookWidth config name with
        | Some w when w = d -> ()
        | Some w -> invalidArg "coders" (sprintf "%s: its %s width is %d but the hook '%s' has %d per token in this model" (describe coder) side d name w)
        | None -> invalidArg "coders" (sprintf "%s: the hook '%s' does not hold one vector per token, so no coder can read or replace it" (describe coder) name)
    for coder in coders do
        let cfg = coder.Config
        for i in 0 .. cfg.NLayers - 1 do
            let pin = position coder cfg.HookIn[i]
            checkWidth coder cfg.HookIn[i] cfg.DIn "input"
            let pout = position coder cfg.HookOut[i]
            checkWidth coder cfg.HookOut[i] cfg.DOut "output"
            if cfg.HookIn[i] = cfg.HookOut[i] && cfg.NLayers > 1 then
                invalidArg "coders" (sprintf "%s reads and writes the same hook '%s' at layer index %d" (describe coder) cfg.HookIn[i] i)
            if pin > pout then
                invalidArg "coders" (sprintf "%s reads '%s', which the forward pass reaches after the hook it writes, '%s'" (describe coder) cfg.HookIn[i] cfg.HookOut[i])
            // a CLT's layer i writes to every later output: its input must come first
            for j in i + 1 .. cfg.NLayers - 1 do
                if pin > position coder cfg.HookOut[j] then
                    invalidArg "coders" (sprintf "%s: layer index %d's input '%s' comes after the output '%s' it writes to" (describe coder) i cfg.HookIn[i] cfg.HookOut[j])
    let writers = [ for c in coders do for h in Array.distinct c.Config.HookOut -> h, c ]
    match writers |> List.countBy fst |> List.tryFind (fun (_, n) -> n > 1) with
    | Some (h, _) ->
        let who = writers |> List.filter (fun (n, _) -> n = h) |> List.map (snd >> describe)
        invalidArg "coders" (sprintf "the hook '%s' would be replaced by more than one coder (%s): splice one coder per output" h (String.concat " and " who))
    | None -> ()
    featureSites coders |> ignore

// ---- the splice ----

/// Runs the feature hooks of one site on acts [N, d_sae] seen as [lead..., d_sae]; also says whether they changed
/// anything (a hook that returns the tensor it got, such as a cache, changes nothing).
let private runFeatureHooks (site: FeatureSite) (fs: HookFn list) (lead: int64[]) (acts: Tensor) : Tensor * bool =
    if fs.IsEmpty then acts, false
    else
        let shaped = acts.reshape(Array.append lead [| int64 site.DSae |])
        let out =
            fs |> List.fold (fun (t: Tensor) f ->
                let r = f t
                if isNull r then invalidOp (sprintf "the feature hook at '%s' returned null (return the tensor it got to leave it unchanged)" site.Name)
                if r.shape <> t.shape then
                    invalidOp (sprintf "the feature hook at '%s' returned shape %s, but the features there have shape %s" site.Name (Shape.show r.shape) (Shape.show t.shape))
                r) shaped
        if Object.ReferenceEquals(out, shaped) then acts, false else out.reshape(-1L, int64 site.DSae), true

/// What one coder computed so far in the current pass: per layer index, the decoder contributions of the features
/// as the feature hooks left them and, where the hooks changed them, of the features as the coder computed them.
type private PassState(nL: int) =
    member val Contribs : Tensor[] = Array.zeroCreate nL
    member val Unhooked : Tensor[] = Array.zeroCreate nL
    member val Inputs : Tensor[] = Array.zeroCreate nL
    member val Rows = -1L with get, set
    member s.Clear() =
        Array.fill s.Contribs 0 nL null
        Array.fill s.Unhooked 0 nL null
        Array.fill s.Inputs 0 nL null
        s.Rows <- -1L

/// The value written at an output hook whose original activation is y. `prediction` comes from the features as the
/// hooks left them, `unhooked` (when the hooks changed some) from the features as the coder computed them. With error
/// terms the error y − ŷ is taken against the unhooked prediction and held constant: the value is
/// y + (prediction − unhooked) (exactly y when nothing was changed), the gradient that of `prediction`.
let private splice (errors: ErrorTerms) (y: Tensor) (prediction: Tensor) (unhooked: Tensor option) : Tensor =
    let shaped (p: Tensor) =
        let p = p.reshape(y.shape)
        if p.dtype = y.dtype then p else p.to_type y.dtype
    let p = shaped prediction
    match errors with
    | WithoutErrorTerms -> p
    | WithErrorTerms ->
        let reference = match unhooked with Some u -> (shaped u).detach() | None -> p.detach()
        y.detach().add(p.sub(reference))

/// The splice's hooks by role (see `SpliceHooks`). The hooks keep per-pass state (each coder's features between
/// its input and output hooks), so a set of hooks serves one forward pass at a time (any number of passes in
/// sequence: generation steps, batches), never two concurrent ones. Tensors they make belong to the run's
/// dispose scope. The coders are borrowed, not copied: changes to their weights show in the next pass.
/// With error terms and feature hooks that change features (ablation, steering), each output moves by the decoded
/// change while the error is that of the coder on the activations this pass actually sees (free propagation, as
/// circuit-tracer's iterative interventions; for errors frozen from another run, pin the output hooks instead).
let plan (options: SpliceOptions) (coders: Coder list) : SpliceHooks =
    let sites = featureSites coders
    let siteNames = sites |> List.map (fun s -> s.Name)
    let featureFns = Dictionary<string, HookFn list>()
    for pattern, f in options.FeatureHooks do
        for name in HookNames.resolveAmong siteNames pattern do
            featureFns[name] <- (match featureFns.TryGetValue name with | true, fs -> fs @ [ f ] | _ -> [ f ])
    let fnsOf (site: FeatureSite) = match featureFns.TryGetValue site.Name with | true, fs -> fs | _ -> []
    let writers = ResizeArray<string * HookFn>()
    let readers = ResizeArray<string * HookFn>()
    for ci, coder in List.indexed coders do
        let cfg = coder.Config
        let nL = cfg.NLayers
        let siteOf i = sites |> List.find (fun s -> s.CoderIndex = ci && s.LayerIndex = i)
        let lead (x: Tensor) = x.shape[.. 1]
        let checkPerToken (hook: string) (d: int) (x: Tensor) =
            let width = if x.dim () >= 2L then Array.fold (*) 1L x.shape[2..] else -1L
            if x.dim () < 2L || width <> int64 d then
                invalidOp (sprintf "%s: the activation at '%s' has shape %s, which is not [batch, pos, ...] with %d values per token" (describe coder) hook (Shape.show x.shape) d)
        if nL = 1 && cfg.HookIn[0] = cfg.HookOut[0] then
            // an SAE (or a coder mapping a hook to itself): read, encode, decode and replace at one point
            let site = siteOf 0
            let fs = fnsOf site
            let hook : HookFn = fun x ->
                checkPerToken cfg.HookIn[0] cfg.DIn x
                let xr = rows coder cfg.HookIn[0] cfg.DIn (x.reshape(-1L, int64 cfg.DIn))
                let acts = activate coder 0 None (preActivations coder 0 None xr)
                let hooked, changed = runFeatureHooks site fs (lead x) acts
                let y = output coder 0 [| contributions coder 0 hooked |] (Some xr)
                let unhooked = if changed then Some (output coder 0 [| contributions coder 0 acts |] (Some xr)) else None
                splice options.Errors x y unhooked
            writers.Add((cfg.HookIn[0], hook))
        else
            let state = PassState(nL)
            for i in 0 .. nL - 1 do
                let site = siteOf i
                let fs = fnsOf site
                let read : HookFn = fun x ->
                    checkPerToken cfg.HookIn[i] cfg.DIn x
                    // the first layer's input starts a pass: forget anything a previous (perhaps stopped) pass left
                    if i = 0 then state.Clear()
                    let xr = rows coder cfg.HookIn[i] cfg.DIn (x.reshape(-1L, int64 cfg.DIn))
                    if i > 0 && state.Rows <> xr.shape[0] then
                        invalidOp (sprintf "%s: the input '%s' of layer index %d was reached without the earlier layers' inputs in the same pass (or with another number of tokens)" (describe coder) cfg.HookIn[i] i)
                    state.Rows <- xr.shape[0]
                    let acts = activate coder i None (preActivations coder i None xr)
                    let hooked, changed = runFeatureHooks site fs (lead x) acts
                    state.Contribs[i] <- contributions coder i hooked
                    if changed && options.Errors = WithErrorTerms then state.Unhooked[i] <- contributions coder i acts
                    if coder.WSkip.IsSome then state.Inputs[i] <- xr
                    x
                readers.Add((cfg.HookIn[i], read))
            for j in 0 .. nL - 1 do
                let write : HookFn = fun y ->
                    checkPerToken cfg.HookOut[j] cfg.DOut y
                    let n = y.numel () / int64 cfg.DOut
                    for i in 0 .. j do
                        if isNull state.Contribs[i] || state.Rows <> n then
                            invalidOp (sprintf "%s: the output '%s' was reached before the input '%s' in the same pass; splice coders whose inputs come before their outputs" (describe coder) cfg.HookOut[j] cfg.HookIn[i])
                    let input = Option.ofObj state.Inputs[j]
                    let pred = output coder j state.Contribs input
                    let unhooked =
                        if Array.exists (isNull >> not) state.Unhooked[.. j] then
                            Some (output coder j (Array.init nL (fun i -> if isNull state.Unhooked[i] then state.Contribs[i] else state.Unhooked[i])) input)
                        else None
                    let r = splice options.Errors y pred unhooked
                    if j = nL - 1 then state.Clear()
                    r
                writers.Add((cfg.HookOut[j], write))
    { Writers = List.ofSeq writers; Readers = List.ofSeq readers; Sites = sites }

/// Hooks (for `Transformer.run`, `runWithHooks`, `Generation`) that replace each coder's output hook (e.g.
/// `blocks.{l}.hook_mlp_out`) by the coder's prediction from its input hook (`blocks.{l}.ln2.hook_normalized`, the
/// MLP's actual input, after the norm's weight and bias) in the same pass. With error terms the output keeps the
/// original value while gradients flow through the coder's features. A cross-layer transcoder encodes each layer's
/// input as the pass reaches it and writes Σ_{ℓ≤ℓ'} W_dec^{ℓ→ℓ'}·a_ℓ + b_dec at each output ℓ'. An SAE replaces its
/// hook by its reconstruction. See `plan` for the per-pass state; `validate` checks the coders against a model.
let hooksWith (options: SpliceOptions) (coders: Coder list) : (string * HookFn) list = (plan options coders).All

/// `hooksWith` with these error terms and no feature hooks.
let hooks (coders: Coder list) (errors: ErrorTerms) : (string * HookFn) list =
    hooksWith { SpliceOptions.Default with Errors = errors } coders

/// Hooks that set each of these hook points to zero (the zero-ablation baseline of spliced evaluation).
let zeroAblationHooks (outputHooks: string list) : (string * HookFn) list =
    outputHooks |> List.distinct |> List.map (fun h -> h, (fun (x: Tensor) -> torch.zeros_like x))

/// Every hook point the coders write (their outputs), each once, in coder order.
let outputHooks (coders: Coder list) : string list =
    coders |> List.collect (fun c -> List.ofArray c.Config.HookOut) |> List.distinct
