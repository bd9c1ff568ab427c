namespace Transcoders.Circuits

open System
open TorchSharp
open Transcoders.Coders.Scalars
open Transcoders.Models
open Transcoders.Coders

/// The coder that replaces one model layer's MLP, as the local replacement model sees it.
type MlpCoderSite =
    { /// Model layer whose MLP input the features read (`blocks.{l}.ln2.hook_normalized`).
      Layer: int
      /// Position of the coder in the list given.
      CoderIndex: int
      /// Index into the coder's layers (0 except for a cross-layer transcoder).
      LayerIndex: int
      DSae: int
      /// Model layers this layer's features write to (ascending; [Layer] for a per-layer transcoder, Layer and every
      /// later layer the coder covers for a cross-layer transcoder).
      WritesTo: int[] }

/// The active features of one prompt, sorted by (layer, position, feature), as host arrays.
type ActiveFeatures =
    { Layer: int[]
      Position: int[]
      Feature: int[]
      Activation: float[] }

    member a.Count = a.Layer.Length
    /// Where entry k fires.
    member a.At(k: int) : FeatureAt = { Layer = a.Layer[k]; Position = a.Position[k]; Feature = a.Feature[k] }
    /// Each active feature's activation by where it fires.
    member a.ByPlace() : Collections.Generic.Dictionary<FeatureAt, float> =
        let d = Collections.Generic.Dictionary<FeatureAt, float>(a.Count)
        for k in 0 .. a.Count - 1 do d[a.At k] <- a.Activation[k]
        d

/// Changes to the nodes of a local replacement model (constrained interventions and the slow checks): feature
/// activations set to new values, error and embedding vectors multiplied by a factor.
type NodeChanges =
    { /// A feature's new activation (any feature, active or not).
      Features: (FeatureAt * float) list
      /// (layer, position) → factor on that error vector (0 ablates it).
      ErrorScales: ((int * int) * float) list
      /// position → factor on the embedding (token plus position embedding) there.
      EmbeddingScales: (int * float) list }

    static member None = { Features = []; ErrorScales = []; EmbeddingScales = [] }

/// The local replacement model of one prompt (Anthropic, "Circuit Tracing"): coders in place of every MLP, an error
/// node per (layer, position) holding the MLP output the coders miss, attention patterns and normalisation scales
/// frozen at their values on this prompt. Its residual stream is linear in the feature activations, the errors and
/// the embeddings, and on the prompt itself it computes exactly the original logits.
///
/// In hooked runs (`runWith`, interventions) attention is frozen by pinning each layer's queries and keys
/// (`attn.hook_q`, `attn.hook_k`) to the clean run's detached values: the pattern is a function of them alone, so it
/// is frozen too, and fused attention kernels still run. Normalisations are frozen by pinning `hook_scale`. The clean
/// patterns themselves ([heads, p, p] per layer) are kept for the explicit transpose of the frozen network
/// (`FrozenLinear`), which attribution graphs use instead of autograd. Tensors are in the model's dtype on its device; the object owns them (dispose it).
/// The model and coders are borrowed.
type LocalReplacement internal (model: Transformer, coders: Coder list, sites: MlpCoderSite[], tokens: int[],
                                queries: torch.Tensor[], keys: torch.Tensor[], patterns: torch.Tensor[], scales: (string * torch.Tensor) list,
                                mlpIn: torch.Tensor[], mlpOut: torch.Tensor[], errors: torch.Tensor[],
                                embedding: torch.Tensor, active: ActiveFeatures, activeLayerStart: int[],
                                activeTensors: torch.Tensor * torch.Tensor * torch.Tensor * torch.Tensor,
                                lastLogits: torch.Tensor) =
    let mutable disposed = false

    member _.Model = model
    member _.Coders = coders
    /// One site per model layer, indexed by layer.
    member _.Sites = sites
    member _.Tokens = tokens
    member _.NLayers = sites.Length
    member _.NPositions = tokens.Length
    member _.DType = embedding.dtype
    member _.Device = embedding.device
    /// Clean queries [1, p, h, e] and keys [1, p, kv, e] per layer (before any rotation).
    member _.Queries = queries
    member _.Keys = keys
    /// Clean attention patterns [h, p, p] per layer (query × key; after rotation, softmax and the causal mask): what
    /// the frozen attention multiplies the values by.
    member _.Patterns = patterns
    /// Clean normalisation scales by hook name ([1, p, 1] each).
    member _.Scales = scales
    /// Clean MLP inputs [p, d] per layer.
    member _.MlpIn = mlpIn
    /// Clean MLP outputs [p, d] per layer.
    member _.MlpOut = mlpOut
    /// Error vectors [p, d] per layer: MLP output − the coders' reconstruction (with skip path and decoder bias).
    member _.Errors = errors
    /// The stream entering block 0 [p, d] (token embedding plus learned position embedding).
    member _.Embedding = embedding
    /// Every active feature, sorted by (layer, position, feature).
    member _.Active = active
    /// Index of the first active feature of each layer (length n_layers + 1).
    member _.ActiveLayerStart = activeLayerStart
    /// The active features as device tensors: layer, position, feature (int64 [n]) and activation (model dtype [n]).
    member _.ActiveTensors = activeTensors
    /// The original logits at the last position [vocab] (model dtype).
    member _.LastLogits = lastLogits

    interface IDisposable with
        member _.Dispose() =
            if not disposed then
                disposed <- true
                let all =
                    [ yield! queries; yield! keys; yield! patterns; yield! (scales |> List.map snd); yield! mlpIn; yield! mlpOut
                      yield! errors; yield embedding; yield lastLogits
                      let (a, b, c, d) = activeTensors in yield! [ a; b; c; d ] ]
                for t in all do t.Dispose()

/// Building and running local replacement models.
[<RequireQualifiedAccess>]
module LocalReplacement =

    /// The floating dtype of a model's parameters.
    let modelDType (model: Transformer) : torch.ScalarType =
        let _, p = Transformer.parameters model |> List.head
        p.dtype

    /// Checks that `coders` replace every MLP of the model exactly once (per-layer transcoders, skip transcoders or
    /// cross-layer transcoders reading `blocks.{l}.ln2.hook_normalized` and writing `blocks.{l}.hook_mlp_out`) and
    /// returns one site per layer; an ArgumentException naming the coder or layer at fault otherwise.
    let sites (config: TransformerConfig) (coders: Coder list) : MlpCoderSite[] =
        BlockOrder.requireSequential "the local replacement model (attribution graphs)" config
        if coders.IsEmpty then
            invalidArg "coders" "no coders: the local replacement model needs a transcoder (or a cross-layer transcoder) in place of every MLP"
        for ci, c in List.indexed coders do
            let cfg = c.Config
            if cfg.Kind = Sae then
                invalidArg "coders" (sprintf "coder #%d is an SAE (%s): attribution graphs need transcoders or cross-layer transcoders in place of the MLPs" ci (Splicing.describe c))
            for i in 0 .. cfg.NLayers - 1 do
                let l = cfg.Layers[i]
                if l >= config.NLayers then
                    invalidArg "coders" (sprintf "coder #%d (%s) names layer %d, but the model has %d layers (0..%d)" ci (Splicing.describe c) l config.NLayers (config.NLayers - 1))
                if cfg.HookIn[i] <> CoderConfig.mlpInHook l || cfg.HookOut[i] <> CoderConfig.mlpOutHook l then
                    invalidArg "coders" (sprintf "coder #%d (%s) does not replace layer %d's MLP: attribution graphs need coders reading '%s' and writing '%s'" ci (Splicing.describe c) l (CoderConfig.mlpInHook l) (CoderConfig.mlpOutHook l))
                if cfg.DIn <> config.DModel || cfg.DOut <> config.DModel then
                    invalidArg "coders" (sprintf "coder #%d (%s) has widths %d → %d, but the model's d_model is %d" ci (Splicing.describe c) cfg.DIn cfg.DOut config.DModel)
        let byLayer = Array.create config.NLayers None
        for ci, c in List.indexed coders do
            let cfg = c.Config
            for i in 0 .. cfg.NLayers - 1 do
                let l = cfg.Layers[i]
                match byLayer[l] with
                | Some (s: MlpCoderSite) ->
                    invalidArg "coders" (sprintf "layer %d's MLP is replaced by two coders (#%d and #%d): give exactly one coder per MLP" l s.CoderIndex ci)
                | None ->
                    byLayer[l] <- Some { Layer = l; CoderIndex = ci; LayerIndex = i; DSae = cfg.DSae; WritesTo = cfg.Layers[i..] }
        Splicing.validate config coders
        byLayer
        |> Array.mapi (fun l s ->
            match s with
            | Some s -> s
            | None ->
                invalidArg "coders" (sprintf "layer %d's MLP has no coder: the local replacement model needs one in place of every MLP (layers 0..%d); a partial replacement leaves a non-linear MLP in the graph" l (config.NLayers - 1)))

    let private coderOf (lr: LocalReplacement) (layer: int) = lr.Coders[lr.Sites[layer].CoderIndex], lr.Sites[layer].LayerIndex

    /// Encoder directions in the model's units [n, d] (model dtype): ∂ pre-activation / ∂ MLP input of features
    /// `features` (int64 [n]) of `layer`, i.e. s_in · W_enc[:, f].
    let encoderDirections (lr: LocalReplacement) (layer: int) (features: torch.Tensor) : torch.Tensor =
        let coder, i = coderOf lr layer
        use scope = torch.NewDisposeScope()
        let w = coder.WEnc.select(0, int64 i).index_select(1L, features.``to``(coder.Device)).t()
        let w = w.``to``(lr.DType, lr.Device).mul(torch.tensor(coder.Config.Scale.In[i], dtype = lr.DType, device = lr.Device))
        w.contiguous().MoveToOuterDisposeScope()

    /// Decoder vectors in the model's units [n, d] (model dtype) of features `features` (int64 [n]) of `sourceLayer`
    /// into the MLP output of `targetLayer` (W_dec^{source→target}[f] / s_out); zeros when that layer's features do not
    /// write there.
    let decoderRows (lr: LocalReplacement) (sourceLayer: int) (targetLayer: int) (features: torch.Tensor) : torch.Tensor =
        let site = lr.Sites[sourceLayer]
        let coder, i = coderOf lr sourceLayer
        let d = int64 coder.Config.DOut
        match Array.tryFindIndex ((=) targetLayer) site.WritesTo with
        | None -> torch.zeros([| features.shape[0]; d |], dtype = lr.DType, device = lr.Device)
        | Some k ->
            use scope = torch.NewDisposeScope()
            let j = i + k
            let w = coder.WDec[i].select(1, int64 k).index_select(0L, features.``to``(coder.Device))
            let w = w.``to``(lr.DType, lr.Device).div(torch.tensor(coder.Config.Scale.Out[j], dtype = lr.DType, device = lr.Device))
            w.contiguous().MoveToOuterDisposeScope()

    /// The skip path of `layer` (skip transcoders): x [..., d] ↦ s_in/s_out · W_skip x, or None.
    let private skipPath (lr: LocalReplacement) (layer: int) : (torch.Tensor -> torch.Tensor) option =
        let coder, i = coderOf lr layer
        match coder.WSkip with
        | None -> None
        | Some ws ->
            let cfg = coder.Config
            let factor = cfg.Scale.In[i] / cfg.Scale.Out[i]
            Some (fun x ->
                let w = ws.select(0, int64 i).``to``(x.dtype, x.device)
                x.matmul(w.t()).mul(torch.tensor(factor, dtype = x.dtype, device = x.device)))

    /// Σ a·W_dec over the given features (layer, position, feature, value tensors) into `targetLayer`'s MLP output:
    /// [p, d] in the model's units (no bias, no skip path).
    let private decodeInto (lr: LocalReplacement) (p: int) (targetLayer: int)
                           (layers: int[]) (positions: torch.Tensor) (features: torch.Tensor) (values: torch.Tensor) : torch.Tensor =
        let d = lr.MlpIn[0].shape[1]
        let out = torch.zeros([| int64 p; d |], dtype = lr.DType, device = lr.Device)
        let chunk = 65536L
        for ls in layers |> Array.distinct do
            if ls <= targetLayer then
                use scope = torch.NewDisposeScope()
                let mask = torch.tensor(layers |> Array.map ((=) ls), device = lr.Device)
                let idx = mask.nonzero().reshape(-1L)
                let n = idx.shape[0]
                let mutable s = 0L
                while s < n do
                    let m = min chunk (n - s)
                    let sel = idx.narrow(0, s, m)
                    let rows = decoderRows lr ls targetLayer (features.index_select(0L, sel))
                    out.index_add_(0L, positions.index_select(0L, sel), rows.mul(values.index_select(0L, sel).unsqueeze 1), sc 1.0) |> ignore
                    s <- s + m
        out

    let private checkTokens (c: TransformerConfig) (tokens: int[]) =
        if isNull (box tokens) || tokens.Length = 0 then invalidArg "tokens" "the prompt is empty: give at least one token"
        if tokens.Length > c.NCtx then
            invalidArg "tokens" (sprintf "the prompt has %d tokens, more than the model's context length n_ctx = %d" tokens.Length c.NCtx)
        match tokens |> Array.tryFindIndex (fun t -> t < 0 || t >= c.VocabSize) with
        | Some i -> invalidArg "tokens" (sprintf "token %d at position %d is outside the vocabulary (0..%d)" tokens[i] i (c.VocabSize - 1))
        | None -> ()

    /// The local replacement models of several prompts (each checked as `create` does) from ONE clean forward pass
    /// over all of them, right-padded to the longest: causal attention keeps every prompt's positions independent of
    /// the padding and of the other prompts, so each result equals `create` on that prompt alone (up to the rounding
    /// of batched matrix products). The caller disposes every result.
    let createMany (model: Transformer) (coders: Coder list) (prompts: int[][]) : LocalReplacement[] =
        let c = model.Config
        if isNull (box prompts) || prompts.Length = 0 then invalidArg "prompts" "no prompts: give at least one"
        for t in prompts do checkTokens c t
        if model.training && c.Dropout > 0.0 then
            invalidArg "model" "the model is in training mode with dropout: call model.eval() before building a local replacement model"
        let sites = sites c coders
        let dtype = modelDType model
        let device = model.Device
        let nL = c.NLayers
        let width = prompts |> Array.map Array.length |> Array.max
        let hasScale = c.Norm <> NoNorm
        use _ = torch.no_grad ()
        use scope = torch.NewDisposeScope()
        let names =
            [ yield HookNames.residPre 0
              for l in 0 .. nL - 1 do
                  yield! [ HookNames.attnQ l; HookNames.attnK l; HookNames.pattern l; HookNames.mlpIn l; HookNames.mlpOut l ]
                  if hasScale then yield! [ HookNames.ln1Scale l; HookNames.ln2Scale l ]
              if hasScale && c.FinalNorm then yield HookNames.lnFinalScale ]
        let padded = prompts |> Array.collect (fun t -> Array.init width (fun i -> if i < t.Length then int64 t[i] else 0L))
        let tokenTensor = torch.tensor(padded, device = device).reshape(int64 prompts.Length, int64 width)
        let r = Transformer.run model { RunOptions.Default with Cache = Set.ofList names } tokenTensor
        let results = ResizeArray<LocalReplacement>()
        try
            for i in 0 .. prompts.Length - 1 do
                use inner = torch.NewDisposeScope()
                let tokens = Array.copy prompts[i]
                let p = tokens.Length
                let bi, pp = int64 i, int64 p
                let keep (t: torch.Tensor) = t.contiguous().DetachFromDisposeScope()
                // [1, p, ...] slices of the batch
                let row (t: torch.Tensor) = t.narrow(0, bi, 1L).narrow(1, 0L, pp)
                let queries = Array.init nL (fun l -> keep (row r[HookNames.attnQ l]))
                let keys = Array.init nL (fun l -> keep (row r[HookNames.attnK l]))
                let patterns = Array.init nL (fun l -> keep (r[HookNames.pattern l].select(0, bi).narrow(1, 0L, pp).narrow(2, 0L, pp)))
                let scales =
                    [ if hasScale then
                          for l in 0 .. nL - 1 do
                              yield HookNames.ln1Scale l, keep (row r[HookNames.ln1Scale l])
                              yield HookNames.ln2Scale l, keep (row r[HookNames.ln2Scale l])
                          if c.FinalNorm then yield HookNames.lnFinalScale, keep (row r[HookNames.lnFinalScale]) ]
                let flat (t: torch.Tensor) = row(t).reshape(pp, -1L)
                let mlpIn = Array.init nL (fun l -> keep (flat r[HookNames.mlpIn l]))
                let mlpOut = Array.init nL (fun l -> keep (flat r[HookNames.mlpOut l]))
                let embedding = keep (flat r[HookNames.residPre 0])
                let lastLogits = keep (r.Logits.Value[bi, pp - 1L])
                // feature activations, layer by layer, in chunks of positions (the dense [chunk, d_sae] is transient)
                let layersL, posL, featL, valL = ResizeArray<int>(), ResizeArray<int>(), ResizeArray<int>(), ResizeArray<float>()
                let starts = Array.zeroCreate (nL + 1)
                for l in 0 .. nL - 1 do
                    starts[l] <- layersL.Count
                    let site = sites[l]
                    let coder = coders[site.CoderIndex]
                    let chunk = max 1 (int (16_777_216L / int64 site.DSae))
                    let mutable s = 0
                    while s < p do
                        let m = min chunk (p - s)
                        use chunkScope = torch.NewDisposeScope()
                        let x = mlpIn[l].narrow(0, int64 s, int64 m)
                        let acts = Splicing.encodeLayer coder site.LayerIndex x
                        let nz = acts.nonzero().cpu()
                        let n = int nz.shape[0]
                        if n > 0 then
                            let idx = nz.data<int64>().ToArray()
                            let flatIdx = torch.tensor(Array.init n (fun k -> idx[2 * k] * int64 site.DSae + idx[2 * k + 1]), device = acts.device)
                            let vals = acts.reshape(-1L).index_select(0L, flatIdx).to_type(torch.float64).cpu().data<float>().ToArray()
                            for k in 0 .. n - 1 do
                                layersL.Add l
                                posL.Add(s + int idx[2 * k])
                                featL.Add(int idx[2 * k + 1])
                                valL.Add vals[k]
                        s <- s + m
                starts[nL] <- layersL.Count
                let active = { Layer = layersL.ToArray(); Position = posL.ToArray(); Feature = featL.ToArray(); Activation = valL.ToArray() }
                let activeTensors =
                    keep (torch.tensor(active.Layer |> Array.map int64, device = device)),
                    keep (torch.tensor(active.Position |> Array.map int64, device = device)),
                    keep (torch.tensor(active.Feature |> Array.map int64, device = device)),
                    keep (torch.tensor(active.Activation, device = device).to_type(dtype))
                // errors: y − (Σ a·W_dec + b_dec + skip(x)), all in the model's dtype
                let lr0 = new LocalReplacement(model, coders, sites, tokens, queries, keys, patterns, scales, mlpIn, mlpOut, [||], embedding, active, starts, activeTensors, lastLogits)
                let _, posT, featT, valT = activeTensors
                let errors =
                    Array.init nL (fun l ->
                        use errScope = torch.NewDisposeScope()
                        let coder, j = coders[sites[l].CoderIndex], sites[l].LayerIndex
                        let recon = decodeInto lr0 p l active.Layer posT featT valT
                        let bias = coder.BDec.select(0, int64 j).``to``(dtype, device).div(torch.tensor(coder.Config.Scale.Out[j], dtype = dtype, device = device))
                        let recon = recon.add(bias)
                        let recon = match skipPath lr0 l with Some f -> recon.add(f mlpIn[l]) | None -> recon
                        mlpOut[l].sub(recon).DetachFromDisposeScope())
                results.Add(new LocalReplacement(model, coders, sites, tokens, queries, keys, patterns, scales, mlpIn, mlpOut, errors, embedding, active, starts, activeTensors, lastLogits))
            (r :> IDisposable).Dispose()
            results.ToArray()
        with _ ->
            for x in results do (x :> IDisposable).Dispose()
            reraise ()

    /// The local replacement model of `tokens` (checked against the context and vocabulary; not empty) with these
    /// coders in place of the MLPs. Runs the model once and encodes every layer's MLP input.
    let create (model: Transformer) (coders: Coder list) (tokens: int[]) : LocalReplacement =
        checkTokens model.Config tokens
        (createMany model coders [| tokens |])[0]

    /// Hooks that freeze attention (queries and keys) and normalisation scales at their clean values for a pass over
    /// `batch` copies of the first `prefix` positions, and keep the MLPs' own computation out of autograd (their
    /// outputs are replaced). The caller adds the hook that writes each `hook_mlp_out`.
    let frozenHooks (lr: LocalReplacement) (batch: int) (prefix: int) : (string * HookFn) list =
        let c = lr.Model.Config
        let b, pp = int64 batch, int64 prefix
        let pin (t: torch.Tensor) : HookFn =
            fun x ->
                let shape = Array.append [| b; pp |] t.shape[2..]
                t.narrow(1, 0L, pp).expand(shape)
        let gated = match c.Mlp with Gated _ -> true | Plain _ -> false
        [ for l in 0 .. c.NLayers - 1 do
              yield HookNames.attnQ l, pin lr.Queries[l]
              yield HookNames.attnK l, pin lr.Keys[l]
              yield HookNames.mlpPre l, (fun (x: torch.Tensor) -> x.detach())
              if gated then yield HookNames.mlpPreLinear l, (fun (x: torch.Tensor) -> x.detach())
          for name, s in lr.Scales do yield name, pin s ]

    /// Hooks that write every `hook_mlp_out` (layers below `upTo`) as the clean output plus the skip path's change
    /// plus `extra layer` ([b, p, d] or [p, d], may need gradients), reading the skip transcoders' inputs in the same pass.
    let mlpOutHooks (lr: LocalReplacement) (prefix: int) (upTo: int) (extra: int -> torch.Tensor option) : (string * HookFn) list =
        let pp = int64 prefix
        [ for l in 0 .. upTo - 1 do
              match skipPath lr l with
              | Some skip ->
                  let input : torch.Tensor ref = ref null
                  yield HookNames.mlpIn l, (fun (x: torch.Tensor) -> input.Value <- x; x)
                  yield HookNames.mlpOut l, (fun (y: torch.Tensor) ->
                      let clean = lr.MlpIn[l].narrow(0, 0L, pp)
                      let v = lr.MlpOut[l].narrow(0, 0L, pp).add(skip(input.Value.sub(clean))).expand(y.shape)
                      match extra l with Some e -> v.add(e) | None -> v)
              | None ->
                  yield HookNames.mlpOut l, (fun (y: torch.Tensor) ->
                      let v = lr.MlpOut[l].narrow(0, 0L, pp).expand(y.shape)
                      match extra l with Some e -> v.add(e) | None -> v) ]

    /// Logits [p, vocab] of the local replacement model with some nodes changed (NodeChanges.None: the original
    /// logits, exactly up to rounding). Only direct effects propagate: attention, normalisation and every other
    /// feature stay as on the clean prompt. Also returns each layer's MLP input [p, d] (what encoders read). The caller
    /// owns every returned tensor.
    let runWith (lr: LocalReplacement) (changes: NodeChanges) : torch.Tensor * torch.Tensor[] =
        let c = lr.Model.Config
        let nL, p = lr.NLayers, lr.NPositions
        let dtype, device = lr.DType, lr.Device
        use _ = torch.no_grad ()
        use scope = torch.NewDisposeScope()
        let scalar (v: float) = torch.tensor(v, dtype = dtype, device = device)
        for at, _ in changes.Features do
            let l, pos, f = at.Layer, at.Position, at.Feature
            if l < 0 || l >= nL then invalidArg "changes" (sprintf "feature layer %d is outside 0..%d" l (nL - 1))
            if pos < 0 || pos >= p then invalidArg "changes" (sprintf "feature position %d is outside the prompt (0..%d)" pos (p - 1))
            if f < 0 || f >= lr.Sites[l].DSae then invalidArg "changes" (sprintf "feature %d is outside 0..%d of layer %d" f (lr.Sites[l].DSae - 1) l)
        let extraByLayer = Array.init nL (fun _ -> torch.zeros([| int64 p; lr.Embedding.shape[1] |], dtype = dtype, device = device))
        // feature changes: (a' − a)·W_dec into every layer the feature writes to
        let activeValue = lr.Active.ByPlace()
        for at, v in changes.Features do
            let l, pos, f = at.Layer, at.Position, at.Feature
            let a = match activeValue.TryGetValue at with | true, a -> a | _ -> 0.0
            let delta = v - a
            if delta <> 0.0 then
                let fi = torch.tensor([| int64 f |], device = device)
                for t in lr.Sites[l].WritesTo do
                    let row = decoderRows lr l t fi
                    (extraByLayer[t].select(0, int64 pos)).add_(row.select(0, 0L).mul(scalar delta)) |> ignore
        for (l, pos), s in changes.ErrorScales do
            if l < 0 || l >= nL || pos < 0 || pos >= p then invalidArg "changes" (sprintf "error node (%d, %d) is outside the graph" l pos)
            (extraByLayer[l].select(0, int64 pos)).add_(lr.Errors[l].select(0, int64 pos).mul(scalar (s - 1.0))) |> ignore
        let embedding = lr.Embedding.clone()
        for pos, s in changes.EmbeddingScales do
            if pos < 0 || pos >= p then invalidArg "changes" (sprintf "embedding position %d is outside the prompt" pos)
            (embedding.select(0, int64 pos)).mul_(scalar s) |> ignore
        let mlpInCapture = Array.zeroCreate<torch.Tensor> nL
        let hooks =
            frozenHooks lr 1 p
            @ [ HookNames.residPre 0, (fun (x: torch.Tensor) -> embedding.unsqueeze(0).expand(x.shape)) ]
            @ mlpOutHooks lr p nL (fun l -> Some (extraByLayer[l].unsqueeze 0))
            @ [ for l in 0 .. nL - 1 -> HookNames.mlpIn l, (fun (x: torch.Tensor) -> mlpInCapture[l] <- x.reshape(int64 p, -1L).clone().DetachFromDisposeScope(); x) ]
        let tokens = torch.tensor(lr.Tokens |> Array.map int64, device = device).unsqueeze 0
        let logits = Transformer.runWithHooks lr.Model hooks tokens
        let logits = logits[0L].MoveToOuterDisposeScope()
        logits, mlpInCapture

    /// Logits [p, vocab] of the local replacement model on its prompt (equal to the original model's).
    let forward (lr: LocalReplacement) : torch.Tensor =
        let logits, ins = runWith lr NodeChanges.None
        for t in ins do t.Dispose()
        logits

/// The transpose of the local replacement model's linear map, prepared once per prompt: with attention patterns and
/// normalisation scales frozen and every MLP replaced by a constant (plus a skip transcoder's linear path), a block
/// maps its input stream x to x + O·(P ⊗ V)·N₁(x) + S·N₂(x + …), so the gradient of any linear read-out flows back
/// through explicit matrix products: no forward pass, no autograd graph, nothing of Q, K, softmax or the MLPs.
///
/// Gradients are laid out [rows, positions, d] (rows: the targets of one batch). Positions beyond a prefix never
/// matter (attention is causal), so every method takes the first `P` positions of the prompt. Everything is in
/// `DType` (the model's dtype, or bfloat16 for a cheaper, less exact pass); the object owns its tensors.
type FrozenLinear internal (nLayers: int, norm: Normalization, nHeads: int, nKvHeads: int, dHead: int,
                            wO: torch.Tensor[], wV: torch.Tensor[], patterns: torch.Tensor[], patternsOwned: bool,
                            ln1: torch.Tensor[], ln2: torch.Tensor[], skip: torch.Tensor option[], dtype: torch.ScalarType) =
    let mutable disposed = false

    member _.NLayers = nLayers
    member _.DType = dtype

    /// Nᵀg for a frozen normalisation with per-position factor a = w / s ([1, p, d]): LayerNorm centres g ⊙ a over
    /// the last axis, RMSNorm multiplies, no normalisation passes g on.
    member private _.NormT(factors: torch.Tensor[], layer: int, g: torch.Tensor) : torch.Tensor =
        match norm with
        | NoNorm -> g.alias()
        | RMSNorm -> g.mul(factors[layer].narrow(1, 0L, g.shape[1]))
        | LayerNorm ->
            let y = g.mul(factors[layer].narrow(1, 0L, g.shape[1]))
            y.sub_(y.mean([| -1L |], true))

    /// ∂/∂(block input) of a read-out of ln1's output: N₁ᵀ g, g [n, P, d].
    member this.Ln1T(layer: int, g: torch.Tensor) = this.NormT(ln1, layer, g)

    /// ∂/∂(resid_mid) of a read-out of the MLP input (ln2's output): N₂ᵀ g, g [n, P, d].
    member this.Ln2T(layer: int, g: torch.Tensor) = this.NormT(ln2, layer, g)

    /// N₂ᵀ applied to single vectors v [k, d] read at positions [k] (int64): the injection of an encoder direction.
    member _.Ln2TAt(layer: int, positions: torch.Tensor, v: torch.Tensor) : torch.Tensor =
        match norm with
        | NoNorm -> v.alias()
        | RMSNorm -> v.mul(ln2[layer].select(0, 0L).index_select(0L, positions))
        | LayerNorm ->
            let y = v.mul(ln2[layer].select(0, 0L).index_select(0L, positions))
            y.sub_(y.mean([| -1L |], true))

    /// The skip path's transpose (skip transcoders): g ↦ g·(s_in/s_out·W_skip), or None.
    member _.SkipT(layer: int, g: torch.Tensor) : torch.Tensor option =
        skip[layer] |> Option.map (fun w -> g.matmul(w))

    /// The attention sublayer's transpose with the pattern frozen: g [n, P, d] at its output ↦ the gradient at ln1's
    /// output: W_Vᵀ-side of Pᵀ·(g W_O) per head (grouped-query heads summed onto their key/value head).
    member _.AttentionT(layer: int, g: torch.Tensor) : torch.Tensor =
        use scope = torch.NewDisposeScope()
        let n, p, d = g.shape[0], g.shape[1], g.shape[2]
        let h, kv, e = int64 nHeads, int64 nKvHeads, int64 dHead
        let gz = g.reshape(n * p, d).matmul(wO[layer])                              // [n·P, h·e]
        let gz = gz.view(n, p, h, e).permute(2L, 1L, 0L, 3L).contiguous().view(h, p, n * e)
        let pt = patterns[layer].narrow(1, 0L, p).narrow(2, 0L, p).transpose(1L, 2L)  // [h, P(keys), P(queries)]
        let gv = pt.bmm(gz)                                                         // [h, P, n·e]
        let gv = if kv = h then gv else gv.view(kv, h / kv, p, n * e).sum(1L)
        let gv = gv.view(kv, p, n, e).permute(2L, 1L, 0L, 3L).contiguous().view(n * p, kv * e)
        gv.matmul(wV[layer]).view(n, p, d).MoveToOuterDisposeScope()

    interface IDisposable with
        member _.Dispose() =
            if not disposed then
                disposed <- true
                for t in Array.concat [ wO; wV; ln1; ln2 ] do t.Dispose()
                if patternsOwned then for t in patterns do t.Dispose()
                for s in skip do s |> Option.iter (fun t -> t.Dispose())

[<RequireQualifiedAccess>]
module FrozenLinear =

    /// The transpose of `lr`'s frozen network in `dtype` (None: the model's dtype). The patterns are shared with `lr`
    /// when the dtype is the model's (dispose the result before `lr`).
    let create (lr: LocalReplacement) (dtype: torch.ScalarType option) : FrozenLinear =
        let c = lr.Model.Config
        let dtype = defaultArg dtype lr.DType
        let device = lr.Device
        let nL = c.NLayers
        use _ = torch.no_grad ()
        use scope = torch.NewDisposeScope()
        let ps = Transformer.parameters lr.Model |> dict
        let weight (name: string) = (ps[name] :> torch.Tensor).detach().``to``(dtype, device).contiguous().DetachFromDisposeScope()
        let wO = Array.init nL (fun l -> weight (sprintf "blocks.%d.attn.o.weight" l))
        let wV = Array.init nL (fun l -> weight (sprintf "blocks.%d.attn.v.weight" l))
        let shared = dtype = lr.DType
        let patterns = if shared then lr.Patterns else lr.Patterns |> Array.map (fun t -> t.``to``(dtype).DetachFromDisposeScope())
        let factors (which: string) (scaleName: int -> string) =
            Array.init nL (fun l ->
                match c.Norm with
                | NoNorm -> torch.empty(0L, dtype = dtype, device = device).DetachFromDisposeScope()
                | _ ->
                    let w = (ps[sprintf "blocks.%d.%s.weight" l which] :> torch.Tensor).detach().``to``(lr.DType)
                    let s = lr.Scales |> List.find (fun (n, _) -> n = scaleName l) |> snd         // [1, p, 1]
                    w.view(1L, 1L, -1L).div(s).``to``(dtype).contiguous().DetachFromDisposeScope())
        let ln1 = factors "ln1" HookNames.ln1Scale
        let ln2 = factors "ln2" HookNames.ln2Scale
        let skip =
            Array.init nL (fun l ->
                let site = lr.Sites[l]
                let coder = lr.Coders[site.CoderIndex]
                coder.WSkip |> Option.map (fun ws ->
                    let i = site.LayerIndex
                    let factor = coder.Config.Scale.In[i] / coder.Config.Scale.Out[i]
                    ws.select(0, int64 i).detach().``to``(lr.DType, device).mul(torch.tensor(factor, dtype = lr.DType, device = device))
                        .``to``(dtype).contiguous().DetachFromDisposeScope()))
        new FrozenLinear(nL, c.Norm, c.NHeads, c.NKvHeads, TransformerConfig.dHead c, wO, wV, patterns, not shared, ln1, ln2, skip, dtype)
