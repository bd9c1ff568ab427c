/// The method of Dunefsky, Chlenski & Nanda 2024, "Transcoders find interpretable LLM feature circuits" (NeurIPS 2024,
/// arXiv 2406.11944; code `transcoder_circuits`), §3–4: attribution with transcoders. (Attribution graphs after
/// Ameisen et al. 2025, "Circuit Tracing", are `AttributionGraph`.) Input-invariant connections
/// (the pullback W_dec·w_enc of a later feature's encoder vector through an earlier transcoder's decoder, de-embeddings
/// directly and through a head's OV circuit), their dataset means, and the input-dependent decomposition of a node's
/// value on one prompt into transcoder features (activation × decoder·direction), attention heads per source position
/// (OV weighted by the attention pattern), the embeddings, the transcoders' errors and the biases, with each norm
/// linearised by its per-token scale. The terms sum exactly to the node's value. Everything is computed in float64.
namespace Transcoders.Circuits

open System
open TorchSharp
open Transcoders.Models
open Transcoders.Coders
open Transcoders.Coders.Scalars

type internal Tensor = torch.Tensor

module internal T =
    let f64 (t: Tensor) = t.detach().to_type(torch.float64)
    /// A tensor's values as float64, row-major.
    let values (t: Tensor) : float[] =
        use c = t.detach().cpu().to_type(torch.float64).contiguous()
        c.data<float>().ToArray()
    let scalar (t: Tensor) = t.to_type(torch.float64).item<float> ()
    let ofArray (device: torch.Device) (xs: float[]) : Tensor = torch.tensor(xs, device = device)
    let keep (t: Tensor) = t.DetachFromDisposeScope()

/// The features of one layer: a coder's layer index reading model layer `Layer`'s MLP input, with (float64) the
/// encoder, its biases, and decoders to every MLP output it writes (already divided by the output scale).
type FeatureLayer internal (coder: Coder, index: int, wEnc: Tensor, bEnc: Tensor, bIn: Tensor option, scaleIn: float,
                            writes: (int * Tensor) list) =
    /// The coder these features belong to.
    member _.Coder = coder
    /// Index of this layer in the coder (0 except for a cross-layer transcoder).
    member _.Index = index
    /// The model layer whose MLP input the features read.
    member _.Layer = coder.Config.Layers[index]
    /// Number of features.
    member _.DSae = coder.Config.DSae
    /// [d_model, d_sae]
    member internal _.WEnc = wEnc
    member internal _.BEnc = bEnc
    member internal _.BIn = bIn
    member internal _.ScaleIn = scaleIn
    /// (model layer written, decoder [d_sae, d_model] / s_out) for each MLP output the features write.
    member internal _.Writes = writes
    member internal _.Dispose() =
        for t in [ wEnc; bEnc ] @ Option.toList bIn @ List.map snd writes do t.Dispose()

/// A model with transcoders (per-layer transcoders reading `blocks.{l}.ln2.hook_normalized` and writing
/// `blocks.{l}.hook_mlp_out`, or cross-layer transcoders), prepared for attribution: the weights the analysis needs,
/// in float64 on the model's device. The model and coders are borrowed; dispose this to free the copies.
type CircuitModel internal (model: Transformer, coders: Coder list) =
    let c = model.Config
    let dev = model.Device
    let ps = Transformer.parameters model |> dict
    let param (name: string) : Tensor = T.keep (T.f64 ps[name])
    let paramOpt (name: string) : Tensor option = if ps.ContainsKey name then Some (param name) else None
    let owned = Collections.Generic.List<Tensor>()
    let own (t: Tensor) = owned.Add t; t
    let ownOpt (t: Tensor option) = t |> Option.map own
    let embed = own (param "embed.weight")
    let posEmbed = ownOpt (paramOpt "pos_embed.weight")
    let layerParam l (name: string) = ownOpt (paramOpt (sprintf "blocks.%d.%s" l name))
    let ln1W = Array.init c.NLayers (fun l -> layerParam l "ln1.weight")
    let ln1B = Array.init c.NLayers (fun l -> layerParam l "ln1.bias")
    let ln2W = Array.init c.NLayers (fun l -> layerParam l "ln2.weight")
    let ln2B = Array.init c.NLayers (fun l -> layerParam l "ln2.bias")
    let wV = Array.init c.NLayers (fun l -> (layerParam l "attn.v.weight").Value)
    let bV = Array.init c.NLayers (fun l -> layerParam l "attn.v.bias")
    let wO = Array.init c.NLayers (fun l -> (layerParam l "attn.o.weight").Value)
    let bO = Array.init c.NLayers (fun l -> layerParam l "attn.o.bias")
    let lnfW = ownOpt (paramOpt "ln_final.weight")
    let lnfB = ownOpt (paramOpt "ln_final.bias")
    let unembed = if c.TiedUnembed then embed else own (param "unembed.weight")
    let unembedBias = ownOpt (paramOpt "unembed.bias")
    let featureLayers, outBias =
        use scope = torch.NewDisposeScope()
        use _ = torch.no_grad ()
        let layers =
            [ for coder in coders do
                  let cfg = coder.Config
                  for i in 0 .. cfg.NLayers - 1 do
                      let writes =
                          [ for j in i .. cfg.NLayers - 1 ->
                                cfg.Layers[j], T.keep (T.f64(coder.WDec[i].select(1, int64 (j - i))).div(sc cfg.Scale.Out[j])) ]
                      let bIn = coder.InputBias |> Option.map (fun b -> T.keep (T.f64 (b.select(0, int64 i))))
                      yield FeatureLayer(coder, i, T.keep (T.f64 (coder.WEnc.select(0, int64 i))), T.keep (T.f64 (coder.BEnc.select(0, int64 i))),
                                         bIn, cfg.Scale.In[i], writes) ]
        let biases =
            [ for coder in coders do
                  let cfg = coder.Config
                  for j in 0 .. cfg.NLayers - 1 -> cfg.Layers[j], T.keep (T.f64(coder.BDec.select(0, int64 j)).div(sc cfg.Scale.Out[j])) ]
        Map.ofList [ for fl in layers -> fl.Layer, fl ], Map.ofList biases

    /// The model (borrowed).
    member _.Model = model
    /// The coders (borrowed).
    member _.Coders = coders
    /// The model's configuration.
    member _.Config = c
    /// The model's device, where every tensor of the analysis lives.
    member _.Device = dev
    /// The feature layers by the model layer they read.
    member _.FeatureLayers : Map<int, FeatureLayer> = featureLayers
    /// The feature layer reading model layer `layer`, with a clear error when there is none.
    member _.FeatureLayer(layer: int) : FeatureLayer =
        if layer < 0 || layer >= c.NLayers then
            invalidArg "layer" (sprintf "layer %d is outside 0..%d: the model has %d layers" layer (c.NLayers - 1) c.NLayers)
        match featureLayers.TryFind layer with
        | Some fl -> fl
        | None ->
            invalidArg "layer" (sprintf "no transcoder reads layer %d's MLP input (layers with transcoders: %s)" layer
                                    (if featureLayers.IsEmpty then "none" else featureLayers |> Map.keys |> Seq.map string |> String.concat ", "))
    member internal _.OutBias = outBias
    member internal _.Embed = embed
    member internal _.PosEmbed = posEmbed
    member internal _.Ln1 l = ln1W[l], ln1B[l]
    member internal _.Ln2 l = ln2W[l], ln2B[l]
    member internal _.LnFinal = (if c.FinalNorm then lnfW else None), (if c.FinalNorm then lnfB else None)
    member internal _.WV l = wV[l]
    member internal _.BV l = bV[l]
    member internal _.WO l = wO[l]
    member internal _.BO l = bO[l]
    member internal _.Unembed = unembed
    member internal _.UnembedBias = unembedBias

    interface IDisposable with
        member _.Dispose() =
            for t in owned do t.Dispose()
            for fl in featureLayers.Values do fl.Dispose()
            for t in outBias.Values do t.Dispose()

/// One prompt run through a `CircuitModel`, with the activations the attribution needs (float64, batch of one):
/// embeddings, residual streams, norm scales, attention patterns and values, MLP outputs, transcoder inputs,
/// activations and errors. Dispose it to free them.
type PromptRun internal (circuit: CircuitModel, tokens: int[], cache: Map<string, Tensor>, acts: Map<int, Tensor>,
                         tcError: Tensor[], logits: Tensor) =
    /// The model and transcoders it ran through.
    member _.Circuit = circuit
    /// The prompt's token ids.
    member _.Tokens = tokens
    /// Number of tokens.
    member _.Length = tokens.Length
    member internal _.Item(name: string) : Tensor = cache[name]
    member internal _.TryGet(name: string) : Tensor option = cache.TryFind name
    /// A cached activation at one position.
    member internal _.At(name: string, position: int) : Tensor = cache[name].select(0, int64 position)
    /// Feature activations [pos, d_sae] of the feature layer reading model layer l.
    member internal _.Acts(l: int) = acts[l]
    /// mlp_out − transcoder prediction [pos, d] (the whole MLP output where no transcoder writes).
    member internal _.TcError(l: int) = tcError[l]
    member internal _.Logits = logits

    /// The model's logits [vocab] at a position of the prompt.
    member r.LogitsAt(position: int) : float[] =
        r.CheckPosition position
        use row = logits.select(0, int64 position)
        T.values row

    /// The activations [d_sae] at a position of the features reading model layer `layer`.
    member r.ActivationsAt(layer: int, position: int) : float[] =
        circuit.FeatureLayer layer |> ignore
        r.CheckPosition position
        use row = acts[layer].select(0, int64 position)
        T.values row

    /// A clear error unless 0 ≤ position < prompt length.
    member _.CheckPosition(position: int) =
        if position < 0 || position >= tokens.Length then
            invalidArg "position" (sprintf "position %d is outside the prompt of %d tokens (0..%d)" position tokens.Length (tokens.Length - 1))

    interface IDisposable with
        member _.Dispose() =
            for t in cache.Values do t.Dispose()
            for t in acts.Values do t.Dispose()
            for t in tcError do t.Dispose()
            logits.Dispose()

/// The direct attribution of one node: every component that writes to the stream it reads, with its share of the
/// node's value (terms with value exactly 0, such as inactive features, are left out). The terms sum to `Total`,
/// which is the node's value along its path (`Node.Contribution`) up to rounding.
type DirectAttribution =
    { Node: FeatureVector
      /// (component, attribution): transcoder features, attention heads per source position, the embeddings, each
      /// layer's transcoder error (`tc_error{l}@{pos}`) and all constants together (`bias_error{layer}@{pos}`).
      Terms: (Component * float)[]
      /// Σ Terms.
      Total: float }

/// Preparing a model and its transcoders for attribution.
[<RequireQualifiedAccess>]
module CircuitModel =

    /// Checks that every coder is a transcoder or cross-layer transcoder from a layer's MLP input
    /// (`blocks.{l}.ln2.hook_normalized`) to its MLP output (`blocks.{l}.hook_mlp_out`) of this model, at most one per
    /// layer, and copies the weights the analysis needs (float64). Skip transcoders and SAEs are refused.
    let create (model: Transformer) (coders: Coder list) : CircuitModel =
        BlockOrder.requireSequential "path analysis (feature vectors, computational paths)" model.Config
        Splicing.validate model.Config coders
        for coder in coders do
            let cfg = coder.Config
            let dm, dc = model.Device, coder.Device
            if dm.``type`` <> dc.``type`` || (dm.index >= 0 && dc.index >= 0 && dm.index <> dc.index) then
                invalidArg "coders" (sprintf "%s is on %O but the model is on %O: load both on one device" (Splicing.describe coder) dc dm)
            match cfg.Kind with
            | Transcoder | CrossLayerTranscoder -> ()
            | k ->
                invalidArg "coders" (sprintf "%s: path analysis handles transcoders and cross-layer transcoders, not a %s" (Splicing.describe coder) (CoderConfig.kindName k))
            for i in 0 .. cfg.NLayers - 1 do
                let l = cfg.Layers[i]
                if cfg.HookIn[i] <> HookNames.ln2Normalized l || cfg.HookOut[i] <> HookNames.mlpOut l then
                    invalidArg "coders" (sprintf "%s: layer index %d must read '%s' and write '%s' (it reads '%s' and writes '%s')" (Splicing.describe coder) i (HookNames.ln2Normalized l) (HookNames.mlpOut l) cfg.HookIn[i] cfg.HookOut[i])
        let readers = [ for coder in coders do yield! coder.Config.Layers ]
        match readers |> List.countBy id |> List.tryFind (fun (_, n) -> n > 1) with
        | Some (l, _) -> invalidArg "coders" (sprintf "two coders read layer %d's MLP input: give one transcoder per layer" l)
        | None -> ()
        new CircuitModel(model, coders)

/// Running prompts for attribution.
[<RequireQualifiedAccess>]
module Prompt =

    /// Runs `tokens` (one prompt) through the model, caching what attribution needs in float64.
    let run (circuit: CircuitModel) (tokens: int[]) : PromptRun =
        if isNull tokens || tokens.Length = 0 then invalidArg "tokens" "the prompt is empty (0 tokens)"
        let c = circuit.Config
        if tokens.Length > c.NCtx then
            invalidArg "tokens" (sprintf "a prompt of %d tokens exceeds the context length n_ctx = %d" tokens.Length c.NCtx)
        match tokens |> Array.tryFindIndex (fun t -> t < 0 || t >= c.VocabSize) with
        | Some i -> invalidArg "tokens" (sprintf "token id %d at position %d is outside the vocabulary of %d ids (0..%d)" tokens[i] i c.VocabSize (c.VocabSize - 1))
        | None -> ()
        let dev = circuit.Device
        let hasScale = c.Norm <> NoNorm
        let names =
            [ yield HookNames.embed
              if c.Positions = Learned then yield HookNames.posEmbed
              for l in 0 .. c.NLayers - 1 do
                  yield! [ HookNames.residPre l; HookNames.residMid l; HookNames.residPost l; HookNames.pattern l
                           HookNames.attnV l; HookNames.mlpOut l; HookNames.ln2Normalized l ]
                  if hasScale then yield! [ HookNames.ln1Scale l; HookNames.ln2Scale l ]
              if hasScale && c.FinalNorm then yield HookNames.lnFinalScale ]
        use _ = torch.no_grad ()
        use scope = torch.NewDisposeScope()
        use input = torch.tensor(tokens |> Array.map int64, device = dev).unsqueeze 0
        use r = Transformer.runWithCache circuit.Model names input
        let cache = names |> List.map (fun n -> n, T.f64 (r[n].select(0, 0L))) |> Map.ofList
        let cache =
            // the scales as [pos] vectors
            cache |> Map.map (fun n t -> if n.EndsWith "hook_scale" then t.squeeze(-1L) else t)
        let acts =
            circuit.FeatureLayers
            |> Map.map (fun l fl -> T.f64 ((Splicing.encodeLayer fl.Coder fl.Index (r[HookNames.ln2Normalized l])).select(0, 0L)))
        let tcError =
            Array.init c.NLayers (fun l ->
                let mlpOut = cache[HookNames.mlpOut l]
                let mutable pred : Tensor = null
                for fl in circuit.FeatureLayers.Values do
                    for (outLayer, dec) in fl.Writes do
                        if outLayer = l then
                            let part = acts[fl.Layer].matmul dec
                            pred <- if isNull pred then part else pred.add part
                match circuit.OutBias.TryFind l with
                | Some b -> pred <- (if isNull pred then b.unsqueeze(0).expand_as(mlpOut) else pred.add b)
                | None -> ()
                if isNull pred then mlpOut.clone() else mlpOut.sub pred)
        let logits = T.f64 (r.Logits.Value.select(0, 0L))
        for t in cache.Values do t.MoveToOuterDisposeScope() |> ignore
        for t in acts.Values do t.MoveToOuterDisposeScope() |> ignore
        for t in tcError do t.MoveToOuterDisposeScope() |> ignore
        new PromptRun(circuit, Array.copy tokens, cache, acts, tcError, logits.MoveToOuterDisposeScope())

module internal Linear =
    /// The residual-space direction r such that w_in · norm(x) = r · x (up to the norm's bias term), with the norm
    /// linearised: (x − mean)/σ ⊙ w + b for LayerNorm, x/σ ⊙ w for RMSNorm, x without a norm. `scale` None leaves σ
    /// out (the input-invariant direction).
    let throughNorm (kind: Normalization) (weight: Tensor option) (scale: float option) (u: Tensor) : Tensor =
        let w = match weight with Some w -> u.mul w | None -> u
        let w = if kind = LayerNorm then w.sub(w.mean()) else w
        match scale with
        | Some s when kind <> NoNorm -> w.div(sc s)
        | _ -> w

    /// The constant b · u the norm's bias adds to u · norm(x).
    let normBiasTerm (bias: Tensor option) (u: Tensor) : float =
        match bias with
        | Some b -> T.scalar (b.dot u)
        | None -> 0.0

    /// The scale σ of a norm at a position, or None without normalisation.
    let scaleAt (run: PromptRun) (name: string) (position: int) : float option =
        run.TryGet name |> Option.map (fun s -> T.scalar (s[int64 position]))

    /// The stream a node reads, from the cache, as [d].
    let stream (run: PromptRun) (s: Stream) (position: int) : Tensor =
        let c = run.Circuit.Config
        match s with
        | ResidMid l -> run.At(HookNames.residMid l, position)
        | ResidPre l when l = c.NLayers -> run.At(HookNames.residPost (l - 1), position)
        | ResidPre l -> run.At(HookNames.residPre l, position)

    /// The decoder rows of feature layer `fl` summed over the MLP outputs it writes before `beforeLayer`, dotted with
    /// v: [d_sae] (None when it writes nothing there).
    let decoderDot (fl: FeatureLayer) (beforeLayer: int) (v: Tensor) : Tensor option =
        let parts = [ for (outLayer, dec) in fl.Writes do if outLayer < beforeLayer then yield dec.matmul v ]
        match parts with
        | [] -> None
        | p :: rest -> Some (rest |> List.fold (fun (a: Tensor) b -> a.add b) p)

/// Roots and children of the path analysis: feature vectors of transcoder features and logits on one prompt.
[<RequireQualifiedAccess>]
[<CompilationRepresentation(CompilationRepresentationFlags.ModuleSuffix)>]
module FeatureVector =

    let internal checkFeature (circuit: CircuitModel) (layer: int) (feature: int) =
        let fl = circuit.FeatureLayer layer
        if feature < 0 || feature >= fl.DSae then
            invalidArg "feature" (sprintf "feature %d is outside 0..%d: the transcoder of layer %d has %d features" feature (fl.DSae - 1) layer fl.DSae)
        fl

    /// The encoder's read direction of a feature on the residual stream entering its MLP (resid_mid), without the
    /// per-token scale: s_in · (w_ln2 ⊙ w_enc), centred for LayerNorm. [d_model] tensor (float64).
    let internal encoderDirection (circuit: CircuitModel) (layer: int) (feature: int) : Tensor =
        let fl = checkFeature circuit layer feature
        let w, _ = circuit.Ln2 layer
        Linear.throughNorm circuit.Config.Norm w None (fl.WEnc.select(1, int64 feature).mul(sc fl.ScaleIn))

    /// The constant of a feature's pre-activation given its linearised input: s_in·(b_ln2·w_enc) − b_in·w_enc + b_enc.
    let internal featureBias (circuit: CircuitModel) (fl: FeatureLayer) (feature: int) : float =
        let wEnc = fl.WEnc.select(1, int64 feature)
        let _, b = circuit.Ln2 fl.Layer
        let normBias = Linear.normBiasTerm b wEnc * fl.ScaleIn
        let inputBias = match fl.BIn with Some bIn -> T.scalar (bIn.dot wEnc) | None -> 0.0
        normBias - inputBias + T.scalar (fl.BEnc[int64 feature])

    /// The pre-activation of a feature at a position on this prompt (from its actual input, as the coder computes it).
    let preActivation (run: PromptRun) (at: FeatureAt) : float =
        let layer, feature, position = at.Layer, at.Feature, at.Position
        let circuit = run.Circuit
        let fl = checkFeature circuit layer feature
        run.CheckPosition position
        use _ = torch.no_grad ()
        use scope = torch.NewDisposeScope()
        let x = run[HookNames.ln2Normalized layer][int64 position]
        T.scalar (Encoder.preActivations torch.float64 fl.BIn (fl.WEnc.select(1, int64 feature)) (fl.BEnc[int64 feature]) (x.mul(sc fl.ScaleIn)))

    /// The activation of a feature at a position on this prompt.
    let activation (run: PromptRun) (at: FeatureAt) : float =
        let layer, feature, position = at.Layer, at.Feature, at.Position
        checkFeature run.Circuit layer feature |> ignore
        run.CheckPosition position
        T.scalar ((run.Acts layer)[int64 position, int64 feature])

    /// A feature vector for a transcoder feature at a position scaled by `connection` (1 for a root), with the
    /// contribution `connection · pre-activation`.
    let internal scaledFeature (run: PromptRun) (at: FeatureAt) (connection: float) : FeatureVector =
        let layer, feature, position = at.Layer, at.Feature, at.Position
        let circuit = run.Circuit
        let fl = checkFeature circuit layer feature
        run.CheckPosition position
        use _ = torch.no_grad ()
        use scope = torch.NewDisposeScope()
        let w, _ = circuit.Ln2 layer
        let sigma = Linear.scaleAt run (HookNames.ln2Scale layer) position
        let v = Linear.throughNorm circuit.Config.Norm w sigma (fl.WEnc.select(1, int64 feature).mul(sc fl.ScaleIn))
        { Component = TranscoderFeature at
          Stream = ResidMid layer
          Position = position
          Vector = T.values (v.mul(sc connection))
          Bias = connection * featureBias circuit fl feature
          Contribution = connection * preActivation run at }

    /// The root for a transcoder feature at a position: the encoder vector on the stream entering the MLP, through
    /// ln2 linearised by its scale at that token; its value is the feature's pre-activation.
    let ofFeature (run: PromptRun) (at: FeatureAt) : FeatureVector =
        scaledFeature run at 1.0

    let private logitVector (run: PromptRun) (token: int) (position: int) : Tensor * float =
        let circuit = run.Circuit
        let c = circuit.Config
        if token < 0 || token >= c.VocabSize then
            invalidArg "token" (sprintf "token id %d is outside the vocabulary of %d ids (0..%d)" token c.VocabSize (c.VocabSize - 1))
        let u = circuit.Unembed[int64 token]
        let w, b = circuit.LnFinal
        let sigma = Linear.scaleAt run HookNames.lnFinalScale position
        let kind = if c.FinalNorm then c.Norm else NoNorm
        let v = Linear.throughNorm kind w sigma u
        let bias = Linear.normBiasTerm b u + (match circuit.UnembedBias with Some bu -> T.scalar bu[int64 token] | None -> 0.0)
        v, bias

    /// The root for the logit of `token` at `position`: W_U[token] through the final norm linearised by its scale; its
    /// value is the logit.
    let ofLogit (run: PromptRun) (token: int) (position: int) : FeatureVector =
        run.CheckPosition position
        use _ = torch.no_grad ()
        use scope = torch.NewDisposeScope()
        let v, bias = logitVector run token position
        { Component = TokenLogit (token, position); Stream = ResidPre run.Circuit.Config.NLayers; Position = position
          Vector = T.values v; Bias = bias; Contribution = T.scalar (run.Logits[int64 position, int64 token]) }

    /// The root for the logit difference logit[token] − logit[other] at `position`.
    let ofLogitDiff (run: PromptRun) (token: int) (other: int) (position: int) : FeatureVector =
        run.CheckPosition position
        use _ = torch.no_grad ()
        use scope = torch.NewDisposeScope()
        let v1, b1 = logitVector run token position
        let v2, b2 = logitVector run other position
        let value = T.scalar (run.Logits[int64 position, int64 token]) - T.scalar (run.Logits[int64 position, int64 other])
        { Component = LogitDifference (token, other, position); Stream = ResidPre run.Circuit.Config.NLayers; Position = position
          Vector = T.values (v1.sub v2); Bias = b1 - b2; Contribution = value }

    /// A root for any direction read at (stream, position), named by `node`: its value is direction · stream + bias.
    let ofDirection (run: PromptRun) (node: Component) (stream: Stream) (position: int) (direction: float[]) (bias: float) : FeatureVector =
        run.CheckPosition position
        let c = run.Circuit.Config
        if direction.Length <> c.DModel then
            invalidArg "direction" (sprintf "the direction has %d values; the model's residual stream has d_model = %d" direction.Length c.DModel)
        match stream with
        | ResidPre l when l < 0 || l > c.NLayers -> invalidArg "stream" (sprintf "ResidPre %d is outside 0..%d" l c.NLayers)
        | ResidMid l when l < 0 || l >= c.NLayers -> invalidArg "stream" (sprintf "ResidMid %d is outside 0..%d" l (c.NLayers - 1))
        | _ -> ()
        use _ = torch.no_grad ()
        use scope = torch.NewDisposeScope()
        let v = T.ofArray run.Circuit.Device direction
        { Component = node; Stream = stream; Position = position; Vector = Array.copy direction; Bias = bias
          Contribution = T.scalar ((Linear.stream run stream position).dot v) + bias }

/// Attribution: input-invariant connections and the input-dependent decomposition of nodes on a prompt.
[<RequireQualifiedAccess>]
module Attribution =

    let private streamLayer (s: Stream) = match s with ResidPre l | ResidMid l -> l

    /// The model layers whose attention writes to a stream before it is read, and those whose MLP does.
    let private writers (s: Stream) =
        match s with
        | ResidPre l -> [ 0 .. l - 1 ], [ 0 .. l - 1 ]
        | ResidMid l -> [ 0 .. l ], [ 0 .. l - 1 ]

    // ---- input-dependent ----

    let private checkNode (run: PromptRun) (node: FeatureVector) =
        run.CheckPosition node.Position
        let d = run.Circuit.Config.DModel
        if node.Vector.Length <> d then
            invalidArg "node" (sprintf "the vector of %O has %d values; d_model is %d" node.Component node.Vector.Length d)

    /// [head, source] contributions of layer l's heads to v at destination t (tensor, in the caller's scope).
    let private headTensor (run: PromptRun) (l: int) (t: int) (v: Tensor) : Tensor =
        let circuit = run.Circuit
        let c = circuit.Config
        let h, kv, e = int64 c.NHeads, int64 c.NKvHeads, int64 (TransformerConfig.dHead c)
        // ov[h, e] = W_O^hᵀ v; values [s, kv, e] → [s, h, e] (query head i reads key/value head ⌊i/(h/kv)⌋)
        let ov = circuit.WO(l).t().matmul(v).reshape(h, e)
        let values = run[HookNames.attnV l].narrow(0, 0L, int64 (t + 1))
        let values = if h = kv then values else values.repeat_interleave(h / kv, dim = 1L)
        let dots = values.mul(ov.unsqueeze 0).sum(-1L) // [s, h]
        let pattern = run[HookNames.pattern l].select(1, int64 t).narrow(1, 0L, int64 (t + 1)) // [h, s]
        pattern.mul(dots.t())

    /// The paper's `get_attn_head_contribs`: the contribution of each head of layer `layer` reading each source position
    /// s ≤ t to the node at destination t, A_h[t,s]·((W_V x_s + b_V)·W_O^hᵀ v), as [head][source]. Σ over heads and
    /// sources plus b_O·v is the layer's attention output at t along v.
    let headContributions (run: PromptRun) (node: FeatureVector) (layer: int) : float[][] =
        checkNode run node
        let c = run.Circuit.Config
        if layer < 0 || layer >= c.NLayers then invalidArg "layer" (sprintf "layer %d is outside 0..%d" layer (c.NLayers - 1))
        use _ = torch.no_grad ()
        use scope = torch.NewDisposeScope()
        let t = node.Position
        let flat = T.values (headTensor run layer t (T.ofArray run.Circuit.Device node.Vector))
        Array.init c.NHeads (fun h -> Array.sub flat (h * (t + 1)) (t + 1))

    /// The paper's `get_transcoder_ixg`: the input-dependent attribution a_i(x_t)·(d_i·v) of every feature of the
    /// transcoder reading layer `layer` to the node at position t [d_sae] (zero when it writes nothing the node reads).
    let featureContributions (run: PromptRun) (node: FeatureVector) (layer: int) : float[] =
        checkNode run node
        let fl = run.Circuit.FeatureLayer layer
        use _ = torch.no_grad ()
        use scope = torch.NewDisposeScope()
        match Linear.decoderDot fl (streamLayer node.Stream) (T.ofArray run.Circuit.Device node.Vector) with
        | Some dots -> T.values ((run.Acts layer).select(0, int64 node.Position).mul(dots))
        | None -> Array.zeroCreate fl.DSae

    /// Every direct contribution to a node on this prompt: for the stream s it reads at position t with vector v,
    /// the token and position embeddings (E[tok_t]·v, P[t]·v); each head h of each earlier attention layer per source
    /// s ≤ t (`headContributions`); each transcoder feature, a_i(x_t)·(d_i·v) (`featureContributions`, a cross-layer
    /// transcoder's decoders to every MLP output before the stream summed); each layer's transcoder error
    /// (mlp_out − TC(x))·v; and one bias term gathering the node's own constant with the output biases b_O·v and
    /// b_dec·v. They sum to the node's value (its pre-activation, logit, or contribution along its path).
    let direct (run: PromptRun) (node: FeatureVector) : DirectAttribution =
        checkNode run node
        let circuit = run.Circuit
        let c = circuit.Config
        let t = node.Position
        use _ = torch.no_grad ()
        use scope = torch.NewDisposeScope()
        let v = T.ofArray circuit.Device node.Vector
        let attnLayers, mlpLayers = writers node.Stream
        let terms = ResizeArray<Component * float>()
        let mutable bias = node.Bias
        terms.Add((Embedding t, T.scalar (run.At(HookNames.embed, t).dot(v))))
        if c.Positions = Learned then terms.Add((PositionEmbedding t, T.scalar (run.At(HookNames.posEmbed, t).dot(v))))
        for l in attnLayers do
            let contrib = T.values (headTensor run l t v) // [h, s] row-major
            for hi in 0 .. c.NHeads - 1 do
                for s in 0 .. t do
                    terms.Add((AttentionHead (l, hi, s), contrib[hi * (t + 1) + s]))
            match circuit.BO l with
            | Some b -> bias <- bias + T.scalar (b.dot v)
            | None -> ()
        let before = streamLayer node.Stream
        for fl in circuit.FeatureLayers.Values do
            match Linear.decoderDot fl before v with
            | Some dots ->
                let contrib = T.values ((run.Acts fl.Layer).select(0, int64 t).mul(dots))
                for i in 0 .. contrib.Length - 1 do
                    if contrib[i] <> 0.0 then terms.Add((TranscoderFeature { FeatureAt.Layer = fl.Layer; Position = t; Feature = i }, contrib[i]))
            | None -> ()
        for l in mlpLayers do
            terms.Add((ErrorTerm (TranscoderError, l, t), T.scalar ((run.TcError l).select(0, int64 t).dot(v))))
            match circuit.OutBias.TryFind l with
            | Some b -> bias <- bias + T.scalar (b.dot v)
            | None -> ()
        terms.Add((ErrorTerm (BiasError, before, t), bias))
        let terms = terms.ToArray()
        { Node = node; Terms = terms; Total = terms |> Array.sumBy snd }

    /// The feature vector of a term of `parent`'s direct attribution, to expand it further (None for leaves: the
    /// embeddings and error terms). A transcoder feature's vector is its linearised encoder vector × (d_i·v); a head's
    /// is A_h[t,s] · (W_V^ᵀ W_O^hᵀ v) through ln1 linearised at the source; each carries its contribution along the path.
    let child (run: PromptRun) (parent: FeatureVector) (term: Component) : FeatureVector option =
        let circuit = run.Circuit
        let c = circuit.Config
        let t = parent.Position
        use _ = torch.no_grad ()
        use scope = torch.NewDisposeScope()
        let before = streamLayer parent.Stream
        match term with
        | TranscoderFeature at ->
            let l, i, s = at.Layer, at.Feature, at.Position
            if s <> t then invalidArg "term" (sprintf "%O is not at the parent's position %d" term t)
            let fl = FeatureVector.checkFeature circuit l i
            let v = T.ofArray circuit.Device parent.Vector
            match Linear.decoderDot fl before v with
            | None -> invalidArg "term" (sprintf "%O does not write to the stream %O read by %O" term parent.Stream parent.Component)
            | Some dots -> Some (FeatureVector.scaledFeature run at (T.scalar dots[int64 i]))
        | AttentionHead (l, hi, s) ->
            let attnLayers, _ = writers parent.Stream
            if not (List.contains l attnLayers) then invalidArg "term" (sprintf "%O does not write to the stream %O read by %O" term parent.Stream parent.Component)
            if hi < 0 || hi >= c.NHeads then invalidArg "term" (sprintf "%O: head %d is outside 0..%d" term hi (c.NHeads - 1))
            if s < 0 || s > t then invalidArg "term" (sprintf "%O: the source must be in 0..%d (the destination)" term t)
            let v = T.ofArray circuit.Device parent.Vector
            let e = int64 (TransformerConfig.dHead c)
            let g = int64 (hi / (c.NHeads / c.NKvHeads))
            let woh = circuit.WO(l).narrow(1, int64 hi * e, e) // [d, e]
            let ov = woh.t().matmul v // [e]
            let wv = circuit.WV(l).narrow(0, g * e, e) // [e, d]
            let r = wv.t().matmul ov // [d]
            let a = T.scalar (run[HookNames.pattern l][int64 hi, int64 t, int64 s])
            let w, b = circuit.Ln1 l
            let sigma = Linear.scaleAt run (HookNames.ln1Scale l) s
            let u = Linear.throughNorm c.Norm w sigma r
            let valueBias = match circuit.BV l with Some bv -> T.scalar (bv.narrow(0, g * e, e).dot ov) | None -> 0.0
            let valueAtSource = run.At(HookNames.attnV l, s).select(0, g)
            let contribution = a * T.scalar (valueAtSource.dot ov)
            Some { Component = term; Stream = ResidPre l; Position = s; Vector = T.values (u.mul(sc a))
                   Bias = a * (Linear.normBiasTerm b r + valueBias); Contribution = contribution }
        | _ -> None

    // ---- input-invariant ----

    /// The read direction [d_model] of a transcoder feature on the residual stream entering its MLP, without the
    /// per-token norm scale: s_in · (w_ln2 ⊙ w_enc), centred for LayerNorm (w_enc itself without a norm).
    let encoderDirection (circuit: CircuitModel) (layer: int) (feature: int) : float[] =
        use _ = torch.no_grad ()
        use scope = torch.NewDisposeScope()
        T.values (FeatureVector.encoderDirection circuit layer feature)

    /// The pullback of a residual-stream direction through the decoders of the transcoder reading `sourceLayer`:
    /// W_dec·direction [d_sae] (a cross-layer transcoder's decoders to the outputs before `beforeLayer` summed). With
    /// a feature's encoder direction this is the input-invariant connection of every earlier feature to it.
    let pullback (circuit: CircuitModel) (sourceLayer: int) (beforeLayer: int) (direction: float[]) : float[] =
        let fl = circuit.FeatureLayer sourceLayer
        if direction.Length <> circuit.Config.DModel then
            invalidArg "direction" (sprintf "the direction has %d values; d_model is %d" direction.Length circuit.Config.DModel)
        use _ = torch.no_grad ()
        use scope = torch.NewDisposeScope()
        match Linear.decoderDot fl beforeLayer (T.ofArray circuit.Device direction) with
        | Some p -> T.values p
        | None -> invalidArg "beforeLayer" (sprintf "the transcoder of layer %d writes nothing before layer %d" sourceLayer beforeLayer)

    /// The input-invariant connections W_dec^{source}·w_enc^{target} of every feature of the transcoder of
    /// `sourceLayer` to feature `targetFeature` of `targetLayer` (through ln2's weight, see `encoderDirection`).
    let featurePullback (circuit: CircuitModel) (sourceLayer: int) (targetLayer: int) (targetFeature: int) : float[] =
        if sourceLayer >= targetLayer then
            invalidArg "sourceLayer" (sprintf "the source layer %d must come before the target layer %d" sourceLayer targetLayer)
        pullback circuit sourceLayer targetLayer (encoderDirection circuit targetLayer targetFeature)

    /// The k largest scores with their indices, largest first (by value, or by magnitude with `byMagnitude`).
    let top (k: int) (byMagnitude: bool) (scores: float[]) : (int * float) list =
        if k < 0 then invalidArg "k" (sprintf "k must be non-negative, got %d" k)
        scores |> Array.indexed |> Array.sortByDescending (fun (_, s) -> if byMagnitude then abs s else s)
        |> Array.truncate k |> List.ofArray

    /// The de-embedding of a direction on the residual stream: W_E·direction [vocab], how much each token's embedding
    /// writes along it.
    let deembedding (circuit: CircuitModel) (direction: float[]) : float[] =
        if direction.Length <> circuit.Config.DModel then
            invalidArg "direction" (sprintf "the direction has %d values; d_model is %d" direction.Length circuit.Config.DModel)
        use _ = torch.no_grad ()
        use scope = torch.NewDisposeScope()
        T.values (circuit.Embed.matmul(T.ofArray circuit.Device direction))

    /// The de-embedding through head `head` of layer `layer`'s OV circuit: W_E·ln1(W_Vᵀ W_O^hᵀ direction), with ln1's
    /// weight (and centring for LayerNorm) but not its per-token scale, which needs an input.
    let deembeddingThroughHead (circuit: CircuitModel) (layer: int) (head: int) (direction: float[]) : float[] =
        let c = circuit.Config
        if layer < 0 || layer >= c.NLayers then invalidArg "layer" (sprintf "layer %d is outside 0..%d" layer (c.NLayers - 1))
        if head < 0 || head >= c.NHeads then invalidArg "head" (sprintf "head %d is outside 0..%d" head (c.NHeads - 1))
        if direction.Length <> c.DModel then
            invalidArg "direction" (sprintf "the direction has %d values; d_model is %d" direction.Length c.DModel)
        use _ = torch.no_grad ()
        use scope = torch.NewDisposeScope()
        let e = int64 (TransformerConfig.dHead c)
        let g = int64 (head / (c.NHeads / c.NKvHeads))
        let ov = circuit.WO(layer).narrow(1, int64 head * e, e).t().matmul(T.ofArray circuit.Device direction)
        let r = circuit.WV(layer).narrow(0, g * e, e).t().matmul ov
        let w, _ = circuit.Ln1 layer
        T.values (circuit.Embed.matmul(Linear.throughNorm c.Norm w None r))

    /// How strongly each head's OV circuit can write along a direction: ‖ln1(W_Vᵀ W_O^hᵀ direction)‖ per [layer][head]
    /// (with ln1's weight and centring, without its per-token scale), the paper's OV-norm map of a feature (use its
    /// `encoderDirection`) for finding the heads worth de-embedding through.
    let ovNorms (circuit: CircuitModel) (direction: float[]) : float[][] =
        let c = circuit.Config
        if direction.Length <> c.DModel then
            invalidArg "direction" (sprintf "the direction has %d values; d_model is %d" direction.Length c.DModel)
        use _ = torch.no_grad ()
        use scope = torch.NewDisposeScope()
        let u = T.ofArray circuit.Device direction
        let e = int64 (TransformerConfig.dHead c)
        [| for l in 0 .. c.NLayers - 1 ->
               let w, _ = circuit.Ln1 l
               [| for h in 0 .. c.NHeads - 1 ->
                      let g = int64 (h / (c.NHeads / c.NKvHeads))
                      let ov = circuit.WO(l).narrow(1, int64 h * e, e).t().matmul u
                      let r = circuit.WV(l).narrow(0, g * e, e).t().matmul ov
                      T.scalar ((Linear.throughNorm c.Norm w None r).norm()) |] |]

    /// Which tokens directly drive a feature: the de-embedding of its encoder direction.
    let featureDeembedding (circuit: CircuitModel) (layer: int) (feature: int) : float[] =
        deembedding circuit (encoderDirection circuit layer feature)

    // ---- dataset means ----

    /// A dataset-mean attribution.
    type MeanAttribution =
        { /// Mean attribution per source feature [d_sae].
          Mean: float[]
          /// Token positions averaged over.
          Positions: int64
          /// Fraction of all positions seen where the target feature was active.
          TargetActiveFraction: float }

    /// The dataset mean of the input-dependent attribution of every feature of the transcoder of `sourceLayer` to
    /// feature `targetFeature` of `targetLayer` through the residual stream, a_i(x)·(d_i·w_enc)/σ(x) (ln2 linearised at
    /// each token), over every position of the token batches ([batch, pos] each), or only where the target is active
    /// (`onlyWhereActive`, the transcoder paper's choice for comparing with the pullback).
    let meanAttribution (circuit: CircuitModel) (sourceLayer: int) (targetLayer: int) (targetFeature: int)
                        (onlyWhereActive: bool) (batches: torch.Tensor seq) : MeanAttribution =
        if sourceLayer >= targetLayer then
            invalidArg "sourceLayer" (sprintf "the source layer %d must come before the target layer %d" sourceLayer targetLayer)
        let src = circuit.FeatureLayer sourceLayer
        let tgt = FeatureVector.checkFeature circuit targetLayer targetFeature
        let c = circuit.Config
        let dev = circuit.Device
        use sum = torch.zeros([| int64 src.DSae |], dtype = torch.float64, device = dev)
        let mutable count = 0L
        let mutable seen = 0L
        let mutable active = 0L
        use _ = torch.no_grad ()
        let u = FeatureVector.encoderDirection circuit targetLayer targetFeature |> T.keep
        use u = u
        use dots = (match Linear.decoderDot src targetLayer u with Some d -> d | None -> invalidArg "sourceLayer" "the source writes nothing before the target") |> T.keep
        for batch in batches do
            use scope = torch.NewDisposeScope()
            let names =
                [ HookNames.ln2Normalized sourceLayer; HookNames.ln2Normalized targetLayer
                  if c.Norm <> NoNorm then HookNames.ln2Scale targetLayer ]
            let tokens = if batch.device_type = dev.``type`` then batch else batch.``to`` dev
            use r = Transformer.run circuit.Model { RunOptions.Default with Cache = set names; StopAtLayer = Some (min c.NLayers (targetLayer + 1)) } tokens
            let xs = r[HookNames.ln2Normalized sourceLayer]
            let acts = T.f64(Splicing.encodeLayer src.Coder src.Index xs).reshape(-1L, int64 src.DSae)
            let targetActs = T.f64(Splicing.encodeFeatures tgt.Coder tgt.Index [| targetFeature |] (r[HookNames.ln2Normalized targetLayer])).reshape(-1L)
            let contrib = acts.mul(dots.unsqueeze 0)
            let contrib =
                if c.Norm <> NoNorm then contrib.div(T.f64(r[HookNames.ln2Scale targetLayer]).reshape(-1L, 1L)) else contrib
            let mask = targetActs.gt(sc 0.0)
            let n = contrib.shape[0]
            seen <- seen + n
            let a = mask.sum().item<int64> ()
            active <- active + a
            if onlyWhereActive then
                sum.add_(contrib.mul(mask.to_type(torch.float64).unsqueeze 1).sum(0L)) |> ignore
                count <- count + a
            else
                sum.add_(contrib.sum(0L)) |> ignore
                count <- count + n
        if seen = 0L then invalidArg "batches" "no tokens to average over"
        let mean = if count = 0L then Array.zeroCreate src.DSae else T.values (sum.div(sc (float count)))
        { Mean = mean; Positions = count; TargetActiveFraction = float active / float seen }
