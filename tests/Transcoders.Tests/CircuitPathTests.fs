/// The transcoder paper's circuit analysis: display names, the input-dependent decomposition (its terms sum to the
/// target's actual pre-activation or logit on random GPT-2-like, Llama-like and tinymodel-like models), children's
/// decompositions, pullbacks and de-embeddings against explicit loops over the weights, the dataset mean against
/// per-prompt attributions, a planted circuit that the greedy path search must rank first, path filters, the path
/// graph's bookkeeping, and clear errors on bad input.
module Transcoders.Tests.CircuitPathTests

open System
open Expecto
open FsCheck
open TorchSharp
open Transcoders.Models
open Transcoders.Coders
open Transcoders.Circuits
open Transcoders.Tests.Fixtures


let private f64s (t: Tensor) : float[] =
    use c = t.detach().cpu().to_type(torch.float64).contiguous()
    c.data<float>().ToArray()

let private config n = { FsCheckConfig.defaultConfig with maxTest = n }

/// |a − b| ≤ 1e-4 relative to max(1, |b|).
let private close (what: string) (actual: float) (expected: float) =
    let tol = 1e-4 * max 1.0 (abs expected)
    if not (abs (actual - expected) <= tol) then
        failtestf "%s: %.9g, expected %.9g (difference %.3g > %.3g)" what actual expected (abs (actual - expected)) tol

let private componentOf (kind: byte) (a: int) (b: int) (c: int) : Component =
    match int kind % 9 with
    | 0 -> TranscoderFeature { FeatureAt.Layer = a; Position = c; Feature = b }
    | 1 -> AttentionHead (a, b, c)
    | 2 -> Embedding a
    | 3 -> PositionEmbedding a
    | 4 -> ErrorTerm (TranscoderError, a, b)
    | 5 -> ErrorTerm (BiasError, a, b)
    | 6 -> ErrorTerm (PruneError, a, b)
    | 7 -> TokenLogit (a, b)
    | _ -> LogitDifference (a, b, c)

let nameTests =
    testList "display names" [
        testPropertyWithConfig (config 300) "every component's display name parses back to it" <| fun (kind: byte) (NonNegativeInt a) (NonNegativeInt b) (NonNegativeInt c) ->
            let comp = componentOf kind a b c
            Expect.equal (Component.parse comp.Display) comp comp.Display
            Expect.equal (string comp) comp.Display "ToString is the display name"

        test "the paper's names" {
            Expect.equal (TranscoderFeature { FeatureAt.Layer = 8; Position = 9; Feature = 89 }).Display "mlp8tc[89]@9" "feature"
            Expect.equal (AttentionHead (2, 2, 8)).Display "attn2[2]@8" "head"
            Expect.equal (Component.parse "embed0@3") (Embedding 3) "the paper's embed0"
            Expect.equal (Component.parse "tc_error4@7") (ErrorTerm (TranscoderError, 4, 7)) "error"
            Expect.equal (Component.parse "logit[464-318]@9") (LogitDifference (464, 318, 9)) "logit difference"
        }

        test "malformed names are refused with the grammar" {
            for bad in [ ""; "mlp8tc[89]"; "mlp8[89]@9"; "attn2[x]@8"; "embed@-1"; "mlp99999999999tc[1]@2"; "logit[]@1" ] do
                match Component.tryParse bad with
                | Ok c -> failtestf "'%s' parsed as %O" bad c
                | Result.Error e -> Expect.stringContains e "'" "the message quotes the input"
            Expect.throwsT<ArgumentException> (fun () -> Component.parse "nonsense" |> ignore) "parse throws"
        }
    ]

/// A random model of a kind with transcoders: on every layer (`everyLayer`), else a cross-layer transcoder over a
/// random subset of layers (the other MLPs count as errors).
let private setup (seed: int) (kind: Kind) (everyLayer: bool) =
    let c = randomConfig seed kind
    let m = randomModel seed c
    let rng = Random(seed)
    let coders =
        if everyLayer then
            [ for l in 0 .. c.NLayers - 1 -> randomCoder (seed * 17 + l) (coderConfig rng c Transcoder [| l |]) ]
        else
            let layers = [| for l in 0 .. c.NLayers - 1 do if rng.Next 3 > 0 || l = 0 then yield l |]
            [ randomCoder (seed * 19) (coderConfig rng c CrossLayerTranscoder layers) ]
    let tokens = Array.init (rng.Next(1, c.NCtx + 1)) (fun _ -> rng.Next c.VocabSize)
    c, m, coders, tokens

let private dispose (m: Transformer) (coders: Coder list) =
    for x in coders do (x :> IDisposable).Dispose()
    m.Dispose()

/// The pre-activation of coder layer index i's feature j at position t, from the model's own cache and the coder's
/// parameters: ((x·s_in − b_in)·W_enc + b_enc)_j.
let private expectedPre (m: Transformer) (coder: Coder) (i: int) (tokens: int[]) (j: int) (t: int) : float =
    use _ = torch.no_grad ()
    use scope = torch.NewDisposeScope()
    let l = coder.Config.Layers[i]
    use r = Transformer.runWithCache m [ HookNames.ln2Normalized l ] (torch.tensor(tokens |> Array.map int64).unsqueeze 0)
    let x = r[HookNames.ln2Normalized l].select(0, 0L).select(0, int64 t).to_type(torch.float64)
    let x = x.mul(Scalar.op_Implicit coder.Config.Scale.In[i])
    let x = match coder.BIn with Some b when coder.Config.InputBias -> x.sub(b.select(0, int64 i).to_type(torch.float64)) | _ -> x
    let w = coder.WEnc.select(0, int64 i).select(1, int64 j).to_type(torch.float64)
    x.dot(w).item<float> () + float (coder.BEnc.select(0, int64 i).select(0, int64 j).item<float32> ())

let private sumTest (kind: Kind) (everyLayer: bool) (seed: int) =
    let c, m, coders, tokens = setup seed kind everyLayer
    try
        use circuit = CircuitModel.create m coders
        use run = Prompt.run circuit tokens
        let rng = Random(seed + 1)
        // feature roots: the decomposition sums to the pre-activation; so do the children's
        for coder in coders do
            for i in 0 .. coder.NLayers - 1 do
                let l = coder.Config.Layers[i]
                for _ in 1 .. 2 do
                    let j, t = rng.Next coder.Config.DSae, rng.Next tokens.Length
                    let root = FeatureVector.ofFeature run { FeatureAt.Layer = l; Position = t; Feature = j }
                    let expected = expectedPre m coder i tokens j t
                    close (sprintf "root %O value" root.Component) root.Contribution expected
                    let d = Attribution.direct run root
                    close (sprintf "Σ attributions of %O" root.Component) d.Total expected
                    for comp, value in d.Terms do
                        match Attribution.child run root comp with
                        | Some child ->
                            match comp with
                            | AttentionHead _ -> close (sprintf "%O's value along the path" comp) child.Contribution value
                            | TranscoderFeature fat ->
                                let fl, fi, ft = fat.Layer, fat.Feature, fat.Position
                                if FeatureVector.activation run fat > 0.0 then
                                    close (sprintf "%O's value along the path (active)" comp) child.Contribution value
                            | _ -> ()
                            close (sprintf "Σ attributions of %O under %O" comp root.Component) (Attribution.direct run child).Total child.Contribution
                        | None -> Expect.isTrue (Component.isLeaf comp) (sprintf "%O has no child vector only if it is a leaf" comp)
        // logit roots
        use logits = Transformer.forward m (torch.tensor(tokens |> Array.map int64).unsqueeze 0)
        let t = tokens.Length - 1
        let tok, other = rng.Next c.VocabSize, rng.Next c.VocabSize
        let logit = f64s (logits.select(0, 0L).select(0, int64 t))
        let root = FeatureVector.ofLogit run tok t
        close "logit value" root.Contribution logit[tok]
        close "Σ attributions of the logit" (Attribution.direct run root).Total logit[tok]
        let diff = FeatureVector.ofLogitDiff run tok other t
        close "Σ attributions of the logit difference" (Attribution.direct run diff).Total (logit[tok] - logit[other])
    finally
        dispose m coders

let private param (m: Transformer) (name: string) : float[] =
    let p = Transformer.parameters m |> List.find (fun (n, _) -> n = name) |> snd
    f64s p

let private headTest (seed: int) =
    let c, m, coders, tokens = setup seed kinds[seed % 3] true
    try
        use circuit = CircuitModel.create m coders
        use run = Prompt.run circuit tokens
        use r = Transformer.runWithCache m [ "blocks.*.attn.hook_z"; "blocks.*.hook_attn_out" ] (torch.tensor(tokens |> Array.map int64).unsqueeze 0)
        let rng = Random seed
        let d, e = c.DModel, TransformerConfig.dHead c
        let t = rng.Next tokens.Length
        let v = Array.init d (fun _ -> rng.NextDouble() * 2.0 - 1.0)
        let node = FeatureVector.ofDirection run (TokenLogit (0, t)) (ResidPre c.NLayers) t v 0.0
        let dot (a: float[]) (b: float[]) = Array.fold2 (fun acc x y -> acc + x * y) 0.0 a b
        for l in 0 .. c.NLayers - 1 do
            let hc = Attribution.headContributions run node l
            Expect.equal (hc |> Array.map Array.length) (Array.create c.NHeads (t + 1)) "one value per head and source ≤ t"
            let z = f64s (r[HookNames.z l].select(0, 0L).select(0, int64 t)) // [h·e]
            let wo = param m (sprintf "blocks.%d.attn.o.weight" l) // [d, h·e]
            for h in 0 .. c.NHeads - 1 do
                let out = Array.init d (fun k -> Seq.sum (seq { for a in 0 .. e - 1 -> wo[k * (c.NHeads * e) + h * e + a] * z[h * e + a] }))
                close (sprintf "head %d of layer %d over its sources" h l) (Array.sum hc[h]) (dot out v)
            let bO = if c.Biases.AttnOut then dot (param m (sprintf "blocks.%d.attn.o.bias" l)) v else 0.0
            let attnOut = f64s (r[HookNames.attnOut l].select(0, 0L).select(0, int64 t))
            close (sprintf "layer %d's heads and b_O" l) (Array.sum (Array.concat hc) + bO) (dot attnOut v)
            // the feature contributions are the direct terms of that layer's features
            let fc = Attribution.featureContributions run node l
            let terms = (Attribution.direct run node).Terms |> Array.choose (function (TranscoderFeature { Layer = fl; Feature = i }, x) when fl = l -> Some (i, x) | _ -> None)
            for i, x in terms do close (sprintf "feature %d of layer %d" i l) fc[i] x
            Expect.equal (fc |> Array.filter (fun x -> x <> 0.0) |> Array.length) terms.Length "the nonzero features are the terms"
    finally
        dispose m coders

let attributionTests =
    testList "attribution sums" [
        testPropertyWithConfig (config 8) "head contributions match the model's hook_z per head and hook_attn_out per layer" <| fun (NonNegativeInt s) ->
            headTest s
        testPropertyWithConfig (config 6) "GPT-2-like, transcoders on every layer: terms sum to the pre-activation and logits" <| fun (NonNegativeInt s) ->
            sumTest GptLike true s
        testPropertyWithConfig (config 6) "Llama-like (GQA, rotary), transcoders on every layer" <| fun (NonNegativeInt s) ->
            sumTest LlamaLike true s
        testPropertyWithConfig (config 4) "tinymodel-like (no norms), transcoders on every layer" <| fun (NonNegativeInt s) ->
            sumTest TinyLike true s
        testPropertyWithConfig (config 4) "a cross-layer transcoder over some layers (the rest as errors)" <| fun (NonNegativeInt s) ->
            sumTest (kinds[s % 3]) false s
    ]

/// (model layer written, W_dec row of feature i / s_out) for coder layer index `index`, from the raw parameters.
let private decoderRows (coder: Coder) (index: int) (feature: int) =
    let cfg = coder.Config
    [ for j in index .. cfg.NLayers - 1 ->
          cfg.Layers[j], f64s (coder.WDec[index].select(0, int64 feature).select(0, int64 (j - index))) |> Array.map (fun x -> x / cfg.Scale.Out[j]) ]

let invariantTests =
    testList "input-invariant" [
        testPropertyWithConfig (config 6) "pullback and encoder direction equal explicit loops over the weights" <| fun (NonNegativeInt seed) ->
            let kind = kinds[seed % 3]
            let c, m, coders, _ = setup seed kind (seed % 2 = 0)
            try
                use circuit = CircuitModel.create m coders
                let d = c.DModel
                let layers = circuit.FeatureLayers |> Map.keys |> List.ofSeq
                let rng = Random seed
                let target = layers |> List.max
                let tgt = circuit.FeatureLayer target
                let j = rng.Next tgt.DSae
                // explicit encoder direction: s_in · w_ln2 ⊙ w_enc, minus its mean for LayerNorm
                let wEnc = Array.init d (fun k -> float (tgt.Coder.WEnc.select(0, int64 tgt.Index).select(0, int64 k).select(0, int64 j).item<float32> ()))
                let w = if c.Norm = NoNorm then Array.create d 1.0 else param m (sprintf "blocks.%d.ln2.weight" target)
                let raw = Array.init d (fun k -> tgt.Coder.Config.Scale.In[tgt.Index] * w[k] * wEnc[k])
                let mean = Array.average raw
                let expectedDir = if c.Norm = LayerNorm then raw |> Array.map (fun x -> x - mean) else raw
                let dir = Attribution.encoderDirection circuit target j
                for k in 0 .. d - 1 do close (sprintf "encoder direction[%d]" k) dir[k] expectedDir[k]
                for source in layers |> List.filter (fun l -> l < target) do
                    let src = circuit.FeatureLayer source
                    let p = Attribution.featurePullback circuit source target j
                    Expect.equal p.Length src.DSae "one value per source feature"
                    for i in 0 .. src.DSae - 1 do
                        let expected =
                            decoderRows src.Coder src.Index i
                            |> List.sumBy (fun (outLayer, row) -> if outLayer < target then Array.fold2 (fun acc a b -> acc + a * b) 0.0 row dir else 0.0)
                        close (sprintf "pullback of feature %d of layer %d" i source) p[i] expected
                    let top = Attribution.top 3 false p
                    Expect.equal (top |> List.map snd) (p |> Array.sortDescending |> Array.truncate 3 |> List.ofArray) "top values"
            finally
                dispose m coders

        testPropertyWithConfig (config 6) "the feature pages' head de-embeddings (all features at once) equal Attribution's one feature at a time" <| fun (NonNegativeInt seed) ->
            let kind = kinds[seed % 3]
            let _, m, coders, _ = setup seed kind true
            try
                let coder = coders.Head
                let layer = coder.Config.Layers[0]
                let dSae = coder.Config.DSae
                let live = Array.init dSae (fun f -> f % 3 <> 1)
                let k, heads = 5, 2
                match Transcoders.Views.FeatureDashboard.deembeddings m coder 0 k heads live with
                | None -> failtest "a transcoder has de-embeddings"
                | Some pages ->
                    use circuit = CircuitModel.create m [ coder ]
                    for f in 0 .. dSae - 1 do
                        let _, got = pages[f]
                        if not live[f] then Expect.isEmpty got (sprintf "feature %d is not live: no heads" f)
                        else
                            let dir = Attribution.encoderDirection circuit layer f
                            let norms = Attribution.ovNorms circuit dir
                            let expected =
                                [| for l in 0 .. layer do for h in 0 .. norms[l].Length - 1 -> l, h, norms[l][h] |]
                                |> Array.sortByDescending (fun (_, _, n) -> n) |> Array.truncate heads
                            Expect.equal got.Length expected.Length (sprintf "feature %d: heads shown" f)
                            for (gl, gh, gn, gt), (el, eh, en) in Array.zip got expected do
                                close (sprintf "feature %d: OV norm of attn%d[%d]" f el eh) gn en
                                // equal norms may order differently; the head must carry its own norm
                                close (sprintf "feature %d: the norm of the head shown, attn%d[%d]" f gl gh) gn (norms[gl][gh])
                                let scores = Attribution.deembeddingThroughHead circuit gl gh dir
                                let top = Attribution.top k false scores
                                Expect.equal gt.Length top.Length (sprintf "feature %d, attn%d[%d]: tokens shown" f gl gh)
                                for t, (_, s) in Array.zip gt (Array.ofList top) do
                                    close (sprintf "feature %d, attn%d[%d]: score of the %d-th token" f gl gh t.Token) t.Score s
                                    close (sprintf "feature %d, attn%d[%d]: token %d's own score" f gl gh t.Token) t.Score (scores[t.Token])
            finally
                dispose m coders

        testPropertyWithConfig (config 6) "de-embeddings equal the explicit products, directly and through a head's OV circuit" <| fun (NonNegativeInt seed) ->
            let kind = kinds[seed % 3]
            let c, m, coders, _ = setup seed kind true
            try
                use circuit = CircuitModel.create m coders
                let rng = Random seed
                let d = c.DModel
                let e = TransformerConfig.dHead c
                let u = Array.init d (fun _ -> rng.NextDouble() * 2.0 - 1.0)
                let embed = param m "embed.weight"
                let row tok = Array.sub embed (tok * d) d
                let dot (a: float[]) (b: float[]) = Array.fold2 (fun acc x y -> acc + x * y) 0.0 a b
                let direct = Attribution.deembedding circuit u
                for tok in 0 .. c.VocabSize - 1 do close (sprintf "de-embedding of token %d" tok) direct[tok] (dot (row tok) u)
                let l, h = rng.Next c.NLayers, rng.Next c.NHeads
                let through = Attribution.deembeddingThroughHead circuit l h u
                let g = h / (c.NHeads / c.NKvHeads)
                let wv = param m (sprintf "blocks.%d.attn.v.weight" l) // [kv·e, d]
                let wo = param m (sprintf "blocks.%d.attn.o.weight" l) // [d, h·e]
                let lnw = if c.Norm = NoNorm then Array.create d 1.0 else param m (sprintf "blocks.%d.ln1.weight" l)
                for tok in 0 .. c.VocabSize - 1 do
                    // forward: the embedding through ln1 (centred, weighted, no scale), the head's V, then O
                    let x = row tok
                    let mean = Array.average x
                    let x = Array.init d (fun k -> (if c.Norm = LayerNorm then x[k] - mean else x[k]) * lnw[k])
                    let value = Array.init e (fun a -> dot (Array.sub wv ((g * e + a) * d) d) x)
                    let out = Array.init d (fun k -> Seq.sum (seq { for a in 0 .. e - 1 -> wo[k * (c.NHeads * e) + h * e + a] * value[a] }))
                    close (sprintf "de-embedding of token %d through attn%d[%d]" tok l h) through[tok] (dot out u)
                // the OV norm of (l, h) is the norm of the vector whose dot products with the embeddings we just checked
                let norms = Attribution.ovNorms circuit u
                Expect.equal (norms |> Array.map Array.length) (Array.create c.NLayers c.NHeads) "[layer][head]"
                let basis k = Array.init d (fun i -> if i = k then 1.0 else 0.0)
                let column (k: int) =
                    // the linearised OV transpose applied to u, read off coordinate by coordinate: e_k through ln1, V, O
                    let x = basis k
                    let mean = Array.average x
                    let x = Array.init d (fun i -> (if c.Norm = LayerNorm then x[i] - mean else x[i]) * lnw[i])
                    let value = Array.init e (fun a -> dot (Array.sub wv ((g * e + a) * d) d) x)
                    let out = Array.init d (fun i -> Seq.sum (seq { for a in 0 .. e - 1 -> wo[i * (c.NHeads * e) + h * e + a] * value[a] }))
                    dot out u
                close (sprintf "OV norm of attn%d[%d]" l h) (norms[l][h]) (sqrt (Seq.sum (seq { for k in 0 .. d - 1 -> column k ** 2.0 })))
                // a feature's de-embedding is that of its encoder direction
                let fl = circuit.FeatureLayer 0
                let featureScores = Attribution.featureDeembedding circuit 0 (fl.DSae - 1)
                let dirScores = Attribution.deembedding circuit (Attribution.encoderDirection circuit 0 (fl.DSae - 1))
                Array.iteri2 (fun tok a b -> close (sprintf "feature de-embedding of token %d" tok) a b) featureScores dirScores
            finally
                dispose m coders

        testPropertyWithConfig (config 4) "the dataset mean equals the mean of per-prompt attributions" <| fun (NonNegativeInt seed) ->
            let kind = kinds[seed % 3]
            let c0 = randomConfig seed kind
            let c = { c0 with NLayers = max 2 c0.NLayers }
            let m = randomModel seed c
            let rng = Random seed
            let coders = [ for l in 0 .. c.NLayers - 1 -> randomCoder (seed * 13 + l) (coderConfig rng c Transcoder [| l |]) ]
            try
                use circuit = CircuitModel.create m coders
                let src, tgt = 0, c.NLayers - 1
                let j = rng.Next (circuit.FeatureLayer tgt).DSae
                let prompts = [ for _ in 1 .. 3 -> Array.init (min c.NCtx 5) (fun _ -> rng.Next c.VocabSize) ]
                use batch = torch.tensor(prompts |> List.toArray |> Array.concat |> Array.map int64).reshape(3L, int64 (min c.NCtx 5))
                for onlyActive in [ false; true ] do
                    let mean = Attribution.meanAttribution circuit src tgt j onlyActive [ batch ]
                    let dSae = (circuit.FeatureLayer src).DSae
                    let sums = Array.zeroCreate dSae
                    let mutable n = 0
                    for p in prompts do
                        use run = Prompt.run circuit p
                        for t in 0 .. p.Length - 1 do
                            if not onlyActive || FeatureVector.activation run { FeatureAt.Layer = tgt; Position = t; Feature = j } > 0.0 then
                                n <- n + 1
                                for comp, v in (Attribution.direct run (FeatureVector.ofFeature run { FeatureAt.Layer = tgt; Position = t; Feature = j })).Terms do
                                    match comp with
                                    | TranscoderFeature { Layer = l; Feature = i } when l = src -> sums[i] <- sums[i] + v
                                    | _ -> ()
                    Expect.equal mean.Positions (int64 n) "positions averaged over"
                    for i in 0 .. dSae - 1 do
                        close (sprintf "mean attribution of feature %d (only where active: %b)" i onlyActive) mean.Mean[i] (if n = 0 then 0.0 else sums[i] / float n)
            finally
                dispose m coders
    ]

/// A two-layer model without norms whose circuit is known: tokens embed as one-hot vectors e0..e5; head 0 of layer 0
/// attends uniformly and copies e2 into e6; MLP 0's neuron 0 reads e6 (4·x − 0.2) and writes e7, its neuron 1 reads
/// token 4 and writes 0.3·e7; MLP 1's neuron 0 reads e7 and 0.5·e4. The transcoders equal the MLPs exactly. On the
/// prompt [1; 2; 3; 4], feature 0 of layer 1 at position 3 gets 0.8 from mlp0tc[0]@3 (itself 1.0 from attn0[0]@1,
/// i.e. token 2 at position 1, minus a bias of 0.2), 0.5 from embed@3 and 0.3 from mlp0tc[1]@3.
let plantedModel () =
    let c =
        { TransformerConfig.tinymodel with
            DModel = 8; NLayers = 2; NHeads = 1; NKvHeads = 1; DMlp = 4; NCtx = 8; VocabSize = 6 }
    let m = Transformer.create c cpu
    m.eval ()
    let ps = Transformer.parameters m |> dict
    use _ = torch.no_grad ()
    for KeyValue (_, p) in ps do p.zero_() |> ignore
    let set (name: string) (i: int) (j: int) (v: float) = ps[name].narrow(0, int64 i, 1L).narrow(1, int64 j, 1L).fill_(Scalar.op_Implicit v) |> ignore
    let setv (name: string) (i: int) (v: float) = ps[name].narrow(0, int64 i, 1L).fill_(Scalar.op_Implicit v) |> ignore
    for k in 0 .. 5 do set "embed.weight" k k 1.0
    set "blocks.0.attn.v.weight" 6 2 1.0
    for k in 0 .. 7 do set "blocks.0.attn.o.weight" k k 1.0
    set "blocks.0.mlp.fc_in.weight" 0 6 4.0
    setv "blocks.0.mlp.fc_in.bias" 0 -0.2
    set "blocks.0.mlp.fc_out.weight" 7 0 1.0
    set "blocks.0.mlp.fc_in.weight" 1 4 1.0
    set "blocks.0.mlp.fc_out.weight" 7 1 0.3
    set "blocks.0.mlp.fc_in.weight" 2 3 1.0
    set "blocks.0.mlp.fc_out.weight" 5 2 1.0
    set "blocks.1.mlp.fc_in.weight" 0 7 1.0
    set "blocks.1.mlp.fc_in.weight" 0 4 0.5
    set "blocks.1.mlp.fc_out.weight" 0 0 1.0
    m, [ exactTranscoder m 0; exactTranscoder m 1 ]

let pathTests =
    testList "path finding" [
        test "a planted circuit is ranked first" {
            let m, coders = plantedModel ()
            try
                use circuit = CircuitModel.create m coders
                use run = Prompt.run circuit [| 1; 2; 3; 4 |]
                let root = FeatureVector.ofFeature run { FeatureAt.Layer = 1; Position = 3; Feature = 0 }
                close "root value" root.Contribution 1.6
                let search = PathSearch.find run PathSearchOptions.Default root
                let complete = search.Paths |> List.filter (fun p -> Component.isLeaf p.Last.Component)
                let best = List.head complete
                Expect.equal best.Display "mlp1tc[0]@3 <- mlp0tc[0]@3 <- attn0[0]@1 <- embed@1" "the planted path comes first"
                close "its attribution" best.Attribution 1.0
                let depth1 = search.Paths |> List.filter (fun p -> p.Nodes.Length = 2)
                Expect.equal (depth1 |> List.map (fun p -> p.Last.Component.Display)) [ "mlp0tc[0]@3"; "embed@3"; "mlp0tc[1]@3" ] "direct contributors in order"
                for p, v in List.zip depth1 [ 0.8; 0.5; 0.3 ] do close p.Display p.Attribution v
                Expect.equal (PathSearch.topNodes 1 (OfKind FeatureComponent) search.Paths |> List.map fst) [ TranscoderFeature { FeatureAt.Layer = 0; Position = 3; Feature = 0 } ] "summed top feature"
                // exact transcoders: no transcoder error anywhere
                let graph = PathGraph.ofPaths run search.Paths
                let rootNode = graph.Nodes.Head
                Expect.equal rootNode.Component root.Component "root first"
                let errors = rootNode.Errors.Value
                close "root transcoder error" errors.TranscoderError 0.0
                close "root prune error (nothing positive left out)" errors.PruneError 0.0
                let edge = graph.Edges |> List.find (fun e -> e.Source = TranscoderFeature { FeatureAt.Layer = 0; Position = 3; Feature = 0 })
                close "edge into the root" edge.Attribution 0.8
                let feature = graph.Nodes |> List.find (fun n -> n.Component = TranscoderFeature { FeatureAt.Layer = 0; Position = 3; Feature = 0 })
                close "bias error of mlp0tc[0]@3 (its −0.2 encoder bias)" feature.Errors.Value.BiasError -0.2
            finally
                dispose m coders
        }

        test "filters keep only matching paths" {
            let m, coders = plantedModel ()
            try
                use circuit = CircuitModel.create m coders
                use run = Prompt.run circuit [| 1; 2; 3; 4 |]
                let root = FeatureVector.ofFeature run { FeatureAt.Layer = 1; Position = 3; Feature = 0 }
                let search = PathSearch.find run { PathSearchOptions.Default with Ranking = Magnitude; IncludeErrors = true } root
                let all = search.Paths
                let viaHead = PathSearch.filter [ Infix [ OfKind HeadComponent ] ] all
                let notViaHead = PathSearch.filter [ NotInfix [ OfKind HeadComponent ] ] all
                Expect.isNonEmpty viaHead "some paths go through a head"
                Expect.isNonEmpty notViaHead "some do not"
                Expect.equal (viaHead.Length + notViaHead.Length) all.Length "infix and not-infix split the paths"
                for p in viaHead do Expect.isTrue (p.Nodes |> List.exists (fun n -> n.Component.Display.StartsWith "attn")) p.Display
                let endingInEmbed = PathSearch.filter [ Suffix [ OfKind HeadComponent; OfKind EmbeddingComponent ] ] all
                Expect.isNonEmpty endingInEmbed "paths ending head <- embed"
                for p in endingInEmbed do
                    let n = p.Nodes |> List.map (fun x -> x.Component) |> Array.ofList
                    Expect.equal (Component.kind n[n.Length - 1], Component.kind n[n.Length - 2]) (EmbeddingComponent, HeadComponent) p.Display
                let feat = PathSearch.filter [ Infix [ IsComponent (TranscoderFeature { FeatureAt.Layer = 0; Position = 3; Feature = 0 }); AtPosition (Eq, 1) ] ] all
                for p in feat do Expect.stringContains p.Display "mlp0tc[0]@3 <- attn0[0]@1" p.Display
                // candidates filtered during the search: no head anywhere
                let noHeads = PathSearch.find run { PathSearchOptions.Default with Candidates = Not (OfKind HeadComponent) } root
                Expect.isNonEmpty noHeads.Paths "paths without heads"
                for p in noHeads.Paths do Expect.isFalse (p.Nodes |> List.exists (fun n -> Component.kind n.Component = HeadComponent)) p.Display
                Expect.stringContains (PathSearch.format search) "mlp1tc[0]@3 <- mlp0tc[0]@3" "formatted"
                Expect.stringContains (PathGraph.format (PathGraph.ofPaths run search.Paths)) "prune_error" "graph formatted"
            finally
                dispose m coders
        }

        testPropertyWithConfig (config 4) "every graph node's value splits into its kept edges and its errors; edges into the root sum depth-1 paths" <| fun (NonNegativeInt seed) ->
            let _, m, coders, tokens = setup seed kinds[seed % 3] true
            try
                use circuit = CircuitModel.create m coders
                use run = Prompt.run circuit tokens
                let fl = circuit.FeatureLayer (circuit.Config.NLayers - 1)
                let root = FeatureVector.ofFeature run { FeatureAt.Layer = fl.Layer; Position = tokens.Length - 1; Feature = seed % fl.DSae }
                let search = PathSearch.find run { PathSearchOptions.Default with Ranking = Magnitude; Depth = 2; Beam = 6 } root
                if not search.Paths.IsEmpty then
                    let graph = PathGraph.ofPaths run search.Paths
                    let depth1 = search.Paths |> List.filter (fun p -> p.Nodes.Length = 2) |> List.sumBy (fun p -> p.Attribution)
                    let intoRoot = graph.Edges |> List.filter (fun e -> e.Target = root.Component) |> List.sumBy (fun e -> e.Attribution)
                    close "edges into the root" intoRoot depth1
                    for n in graph.Nodes do
                        match n.Errors with
                        | Some e ->
                            let incoming = graph.Edges |> List.filter (fun x -> x.Target = n.Component) |> List.sumBy (fun x -> x.Attribution)
                            close (sprintf "%O splits" n.Component) (incoming + e.TranscoderError + e.BiasError + e.PruneError) n.Contribution
                        | None -> Expect.isTrue (Component.isLeaf n.Component) "only leaves have no errors"
                    let summed = PathGraph.sumOverTokens graph
                    close "token-summed total" (summed.Nodes |> List.sumBy snd) (graph.Nodes |> List.sumBy (fun n -> n.Contribution))
            finally
                dispose m coders
    ]

let badInputTests =
    testList "bad input" [
        test "layer, feature, position, token and prompt errors say what is wrong" {
            let m, coders = plantedModel ()
            try
                use circuit = CircuitModel.create m coders
                use run = Prompt.run circuit [| 1; 2; 3 |]
                let throws (f: unit -> 'a) (words: string list) =
                    let e = Expect.throwsC (fun () -> f () |> ignore) id
                    for w in words do Expect.stringContains e.Message w (sprintf "message mentions '%s'" w)
                throws (fun () -> FeatureVector.ofFeature run { FeatureAt.Layer = 5; Position = 0; Feature = 0 }) [ "layer 5"; "2 layers" ]
                throws (fun () -> FeatureVector.ofFeature run { FeatureAt.Layer = 1; Position = 0; Feature = 4 }) [ "feature 4"; "4 features" ]
                throws (fun () -> FeatureVector.ofFeature run { FeatureAt.Layer = 1; Position = 3; Feature = 0 }) [ "position 3"; "3 tokens" ]
                throws (fun () -> FeatureVector.ofLogit run 6 0) [ "token id 6"; "vocabulary" ]
                throws (fun () -> Prompt.run circuit [||]) [ "empty" ]
                throws (fun () -> Prompt.run circuit (Array.create 9 1)) [ "9 tokens"; "n_ctx" ]
                throws (fun () -> Prompt.run circuit [| 0; 7 |]) [ "token id 7"; "position 1" ]
                throws (fun () -> Attribution.featurePullback circuit 1 1 0) [ "source layer 1" ]
                throws (fun () -> PathSearch.find run { PathSearchOptions.Default with Beam = 0 } (FeatureVector.ofFeature run { FeatureAt.Layer = 1; Position = 2; Feature = 0 })) [ "Beam" ]
                use sae = randomCoder 1 (CoderConfig.sae "test" (HookNames.attnOut 0) 0 8 4)
                throws (fun () -> CircuitModel.create m [ sae ]) [ "sae" ]
                let circuit1 = CircuitModel.create m [ coders[0] ]
                use _ = circuit1
                throws (fun () -> Attribution.featurePullback circuit1 0 1 0) [ "no transcoder reads layer 1" ]
                throws (fun () -> circuit1.FeatureLayer 1) [ "no transcoder reads layer 1"; "0" ]
            finally
                dispose m coders
        }
    ]

let tests =
    testList "Circuit paths" [ nameTests; attributionTests; invariantTests; pathTests; badInputTests ]
