/// Coders spliced into the model: the splice against a slow fixed-point reference built from `Coder.Forward`, error
/// terms (exact values, gradients through the features only), the replacement model (cache, feature hooks,
/// generation with and without the KV cache, fidelity), spliced evaluation against a per-position loop, and feature
/// access by tag.
module Transcoders.Tests.SpliceTests

open System
open System.IO
open System.Text.Json
open Expecto
open TorchSharp
open Transcoders.Files
open Transcoders.Models
open Transcoders.Coders
open Transcoders.Coders.Splicing
open Transcoders.Tests.Fixtures

/// Coders for a model: per-layer transcoders, a mix of transcoders and skip transcoders, one cross-layer transcoder
/// over a subset of layers, or transcoders plus an SAE on an attention output (`setup` picks).
let coderSetup (seed: int) (c: TransformerConfig) (setup: int) : Coder list =
    let rng = Random(seed * 7 + setup)
    let subset =
        let s = [| for l in 0 .. c.NLayers - 1 do if rng.Next 3 > 0 then yield l |]
        if s.Length = 0 then [| rng.Next c.NLayers |] else s
    let make i kind layers = randomCoder (seed * 31 + i) (coderConfig rng c kind layers)
    match setup % 4 with
    | 0 -> subset |> Array.mapi (fun i l -> make i Transcoder [| l |]) |> List.ofArray
    | 1 -> subset |> Array.mapi (fun i l -> make i (if rng.Next 2 = 0 then SkipTranscoder else Transcoder) [| l |]) |> List.ofArray
    | 2 -> [ make 0 CrossLayerTranscoder subset ]
    | _ -> make 99 Sae [| rng.Next c.NLayers |] :: (subset |> Array.mapi (fun i l -> make i Transcoder [| l |]) |> List.ofArray)

let private disposeAll (coders: Coder list) = for c in coders do (c :> IDisposable).Dispose()

/// The spliced model's logits computed the slow way, from `Coder.Forward` alone: run the model with every output
/// hook pinned to a fixed tensor, capture the coders' inputs, recompute the pinned outputs from them, and repeat.
/// Each round makes one more coder in the chain right, so after (outputs + 1) rounds it is the spliced model.
let referenceLogits (m: Transformer) (coders: Coder list) (tokens: Tensor) : Tensor =
    let outputs = coders |> List.sumBy (fun c -> c.NLayers)
    let inputs = coders |> List.collect (fun c -> List.ofArray c.Config.HookIn) |> List.distinct
    let mutable pinned : Map<string, Tensor> = Map.empty
    let pinHooks () = pinned |> Map.toList |> List.map (fun (h, t) -> h, (fun (_: Tensor) -> t))
    for _ in 0 .. outputs do
        let captured = Collections.Generic.Dictionary<string, Tensor>()
        // capture hooks come first at each point: an SAE's input is the value before its own replacement
        let capture = inputs |> List.map (fun h -> h, (fun (x: Tensor) -> captured[h] <- x.detach().clone().MoveToOuterDisposeScope(); x))
        (Transformer.runWithHooks m (capture @ pinHooks ()) tokens).Dispose()
        pinned <-
            Map.ofList
                [ for coder in coders do
                      let cfg = coder.Config
                      if cfg.Kind = CrossLayerTranscoder then
                          let x = torch.stack([ for h in cfg.HookIn -> captured[h] ], 2L)
                          let y = coder.Forward x
                          for i in 0 .. cfg.NLayers - 1 -> cfg.HookOut[i], y.select(2, int64 i)
                      else
                          yield cfg.HookOut[0], coder.Forward captured[cfg.HookIn[0]] ]
    Transformer.runWithHooks m (pinHooks ()) tokens

/// A transcoder whose every parameter is zero: it predicts 0 (the zero ablation).
let zeroTranscoder (c: TransformerConfig) (layer: int) : Coder =
    let cfg = { CoderConfig.transcoder "zero" layer c.DModel 5 with InputBias = false }
    use scope = torch.NewDisposeScope()
    Coder.ofTensors cfg cpu [ for n, shape in Coder.ParameterShapes cfg -> n, torch.zeros(shape) ]

let private kindOf (i: uint8) = kinds[int i % 3]

/// A small random configuration (ModelTests.randomConfig) with 1 to 4 layers, so that cross-layer decoders reach
/// across up to four layers.
let spliceConfig (seed: int) (kind: Kind) = { randomConfig seed kind with NLayers = 1 + (seed &&& 0x7fffffff) % 4 }

let private throwsWith (f: unit -> 'a) (parts: string list) (what: string) =
    let e = Expect.throwsC (fun () -> f () |> ignore) id
    for part in parts do
        Expect.stringContains e.Message part (sprintf "%s: the message names '%s'" what part)

let spliceTests =
    testList "splicing" [
        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 40 } "spliced logits = the slow fixed point of Coder.Forward (transcoders, skip, CLT, SAE)"
        <| fun (seed: int) (kindIndex: uint8) (setup: uint8) ->
            use scope = torch.NewDisposeScope()
            let c = spliceConfig seed (kindOf kindIndex)
            use m = randomModel seed c
            let coders = coderSetup seed c (int setup)
            try
                let tokens = randomTokens seed c.VocabSize 2 (min c.NCtx 6)
                let spliced = Transformer.runWithHooks m (Splicing.hooks coders WithoutErrorTerms) tokens
                let reference = referenceLogits m coders tokens
                Expect.isLessThan (relDiff spliced reference) 1e-4 "spliced = reference"
                // the outputs are the coders' (random coders are far from the MLPs), not the model's
                let outputs = Splicing.outputHooks coders
                use original = Transformer.runWithCache m outputs tokens
                use replaced = Transformer.run m { RunOptions.Default with Hooks = Splicing.hooks coders WithoutErrorTerms; Cache = set outputs } tokens
                for h in outputs do
                    Expect.isGreaterThan (maxDiff replaced[h] original[h]) 1e-3 (h + " is replaced")
            finally disposeAll coders

        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 40 } "with error terms the spliced model reproduces the original logits"
        <| fun (seed: int) (kindIndex: uint8) (setup: uint8) ->
            use scope = torch.NewDisposeScope()
            let c = spliceConfig seed (kindOf kindIndex)
            use m = randomModel seed c
            let coders = coderSetup seed c (int setup)
            try
                let tokens = randomTokens seed c.VocabSize 3 (min c.NCtx 7)
                let plain = Transformer.forward m tokens
                let spliced = Transformer.runWithHooks m (Splicing.hooks coders WithErrorTerms) tokens
                Expect.isLessThanOrEqual (relDiff spliced plain) 1e-5 "with error terms = original"
            finally disposeAll coders

        testCase "with error terms, gradients flow through the coder's features and not through the replaced MLP" <| fun () ->
            use scope = torch.NewDisposeScope()
            let c = { randomConfig 21 GptLike with NLayers = 2; Dropout = 0.0 }
            use m = randomModel 21 c
            let cfg = { coderConfig (Random 3) c Transcoder [| 0 |] with Activation = ReLU; Scale = ActivationScale.Ones 1 }
            use coder = randomCoder 21 cfg
            let tokens = randomTokens 21 c.VocabSize 2 5
            use g = new torch.Generator(99UL, cpu)
            let w = torch.randn([| 2L; 5L; int64 c.VocabSize |], generator = g)
            let logits = Transformer.runWithHooks m (Splicing.hooks [ coder ] WithErrorTerms) tokens
            (logits * w).sum().backward()
            let ps = Transformer.parameters m |> dict
            let gradNorm (t: Tensor) = if isNull t.grad then 0.0 else values t.grad |> Array.sumBy abs
            let bDecGrad = values coder.BDec.grad
            Expect.isGreaterThan (gradNorm coder.WEnc) 0.0 "W_enc gets a gradient"
            Expect.isGreaterThan (gradNorm coder.WDec[0]) 0.0 "W_dec gets a gradient"
            Expect.equal (gradNorm ps["blocks.0.mlp.fc_in.weight"]) 0.0 "the replaced MLP's W_in gets none"
            Expect.equal (gradNorm ps["blocks.0.mlp.fc_out.weight"]) 0.0 "the replaced MLP's W_out gets none"
            Expect.isGreaterThan (gradNorm ps["blocks.1.mlp.fc_in.weight"]) 0.0 "the other MLP does"
            Expect.isGreaterThan (gradNorm ps["blocks.0.ln2.weight"]) 0.0 "the coder's input (ln2) does, through the encoder"
            // ∂loss/∂b_dec = Σ over tokens of ∂loss/∂mlp_out in the original model (values are the original's)
            let delta = torch.zeros([| 2L; 5L; int64 c.DModel |], requires_grad = true)
            let original = Transformer.runWithHooks m [ HookNames.mlpOut 0, (fun x -> x + delta) ] tokens
            (original * w).sum().backward()
            let expected = values (delta.grad.sum([| 0L; 1L |]))
            Array.iteri2 (fun i a e -> Expect.floatClose { absolute = 1e-4; relative = 1e-4 } a e (sprintf "∂loss/∂b_dec[%d]" i)) bDecGrad expected

        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 20 } "a transcoder equal to a ReLU MLP reproduces the model without error terms"
        <| fun (seed: int) (tiny: bool) ->
            use scope = torch.NewDisposeScope()
            let c = if tiny then randomConfig seed TinyLike else { randomConfig seed GptLike with Mlp = Plain Relu }
            use m = randomModel seed c
            let coders = [ for l in 0 .. c.NLayers - 1 -> exactTranscoder m l ]
            try
                let tokens = randomTokens seed c.VocabSize 2 (min c.NCtx 6)
                let plain = Transformer.forward m tokens
                let spliced = Transformer.runWithHooks m (Splicing.hooks coders WithoutErrorTerms) tokens
                Expect.isLessThanOrEqual (relDiff spliced plain) 1e-5 "exact transcoders = the MLPs"
            finally disposeAll coders

        testCase "encodeLayer/decodeLayer agree with Coder.Encode/Forward layer by layer" <| fun () ->
            use scope = torch.NewDisposeScope()
            let c = { randomConfig 5 LlamaLike with NLayers = 3 }
            for kind in [ Sae; Transcoder; SkipTranscoder; CrossLayerTranscoder ] do
                let layers = if kind = CrossLayerTranscoder then [| 0; 2 |] else [| 1 |]
                use coder = randomCoder 8 (coderConfig (Random 4) c kind layers)
                let nL = layers.Length
                let x = torch.randn([| 3L; 4L; int64 nL; int64 c.DModel |])
                let user = if kind = CrossLayerTranscoder then x else x.select(2, 0L)
                let acts = coder.Encode user
                let pred = coder.Forward user
                let layerActs = [ for i in 0 .. nL - 1 -> Splicing.encodeLayer coder i (x.select(2, int64 i)) ]
                for i in 0 .. nL - 1 do
                    let expected = if kind = CrossLayerTranscoder then acts.select(2, int64 i) else acts
                    Expect.isLessThan (relDiff layerActs[i] expected) 1e-5 (sprintf "%A layer %d activations" kind i)
                    let y = Splicing.decodeLayer coder i (List.truncate (i + 1) layerActs) (Some (x.select(2, int64 i)))
                    let expectedY = if kind = CrossLayerTranscoder then pred.select(2, int64 i) else pred
                    Expect.isLessThan (relDiff y expectedY) 1e-5 (sprintf "%A layer %d prediction" kind i)
                let some = [| 3; 0; coder.Config.DSae - 1 |]
                let cols = Splicing.encodeFeatures coder 0 some (x.select(2, 0L))
                let expected = layerActs[0].index_select(-1L, torch.tensor(some |> Array.map int64))
                Expect.isLessThan (relDiff cols expected) 1e-6 (sprintf "%A selected features" kind)

        testCase "a BatchTopK coder is spliced as JumpReLU with its calibrated threshold, and refuses without one" <| fun () ->
            use scope = torch.NewDisposeScope()
            let c = randomConfig 13 GptLike
            use m = randomModel 13 c
            let cfg = { coderConfig (Random 2) c Transcoder [| 0 |] with Activation = BatchTopK 3.0 }
            use coder = randomCoder 13 cfg
            let tokens = randomTokens 13 c.VocabSize 2 5
            throwsWith (fun () -> Transformer.runWithHooks m (Splicing.hooks [ coder ] WithoutErrorTerms) tokens) [ "BatchTopK"; "calibrate" ] "no threshold"
            (use _ = torch.no_grad () in coder.BatchTopKThreshold.Value.fill_(sc 0.3) |> ignore)
            use jump = Coder.toJumpReLU coder [| 0.3 |] 0.001
            let a = Transformer.runWithHooks m (Splicing.hooks [ coder ] WithoutErrorTerms) tokens
            let b = Transformer.runWithHooks m (Splicing.hooks [ jump ] WithoutErrorTerms) tokens
            Expect.isLessThan (relDiff a b) 1e-6 "BatchTopK with threshold θ = JumpReLU θ"

        testCase "feature hooks see [batch, pos, d_sae] and what they return is decoded" <| fun () ->
            use scope = torch.NewDisposeScope()
            let c = { randomConfig 17 GptLike with NLayers = 2 }
            use m = randomModel 17 c
            let cfg = { coderConfig (Random 1) c CrossLayerTranscoder [| 0; 1 |] with InputBias = false; Scale = ActivationScale.Ones 2 }
            use clt = randomCoder 17 cfg
            let tokens = randomTokens 17 c.VocabSize 2 4
            let seen = Collections.Generic.List<int64[]>()
            let hooks =
                Splicing.hooksWith
                    { Errors = WithoutErrorTerms
                      FeatureHooks = [ "blocks.*.clt.hook_acts", (fun a -> seen.Add a.shape; torch.zeros_like a) ] }
                    [ clt ]
            use r = Transformer.run m { RunOptions.Default with Hooks = hooks; Cache = set [ "blocks.*.hook_mlp_out" ] } tokens
            Expect.equal seen.Count 2 "one call per layer"
            for s in seen do Expect.sequenceEqual s [| 2L; 4L; int64 cfg.DSae |] "shape of the features"
            for l in 0 .. 1 do
                let bias = clt.BDec.select(0, int64 l).expand(2L, 4L, int64 c.DModel)
                Expect.isLessThan (relDiff r[HookNames.mlpOut l] bias) 1e-6 (sprintf "layer %d output = b_dec when features are zeroed" l)
            // with error terms, zeroing a transcoder's features moves its output by exactly the decoded change
            use tc = randomCoder 18 (coderConfig (Random 6) c Transcoder [| 0 |])
            let zeroing = Splicing.hooksWith { Errors = WithErrorTerms; FeatureHooks = [ "blocks.0.transcoder.hook_acts", torch.zeros_like ] } [ tc ]
            use hooked = Transformer.run m { RunOptions.Default with Hooks = zeroing; Cache = set [ HookNames.mlpOut 0 ] } tokens
            use original = Transformer.runWithCache m [ HookNames.mlpOut 0; HookNames.mlpIn 0 ] tokens
            let x = original[HookNames.mlpIn 0]
            let expected = original[HookNames.mlpOut 0] + tc.Decode(torch.zeros([| 2L; 4L; int64 tc.Config.DSae |])) - tc.Forward x
            Expect.isLessThan (relDiff hooked[HookNames.mlpOut 0] expected) 1e-5 "y + decode(0) − decode(a)"
            let reading = Splicing.hooksWith { Errors = WithErrorTerms; FeatureHooks = [ "*", id ] } [ tc ]
            let same = Transformer.runWithHooks m reading tokens
            Expect.isTrue (same.eq(Transformer.forward m tokens).all().item<bool> ()) "hooks that change nothing: the original logits bit for bit"
            throwsWith (fun () -> Splicing.hooksWith { Errors = WithoutErrorTerms; FeatureHooks = [ "blocks.0.transcoder.hook_acts", id ] } [ clt ]) [ "blocks.0.transcoder.hook_acts"; "blocks.0.clt.hook_acts" ] "unknown feature hook"

        testCase "validation names the coder and hook at fault" <| fun () ->
            let c = { randomConfig 19 GptLike with NLayers = 2 }
            use m = randomModel 19 c
            use t0 = randomCoder 1 (coderConfig (Random 1) c Transcoder [| 0 |])
            use t0b = randomCoder 2 (coderConfig (Random 2) c SkipTranscoder [| 0 |])
            use far = randomCoder 3 (CoderConfig.transcoder "test" 5 c.DModel 4)
            use wide = randomCoder 4 (CoderConfig.transcoder "test" 1 (c.DModel + 1) 4)
            use backwards = randomCoder 5 { CoderConfig.transcoder "test" 1 c.DModel 4 with HookIn = [| HookNames.residPost 1 |]; HookOut = [| HookNames.mlpOut 0 |] }
            throwsWith (fun () -> Splicing.validate c [ t0; t0b ]) [ "blocks.0.hook_mlp_out"; "more than one coder" ] "two writers"
            throwsWith (fun () -> Splicing.validate c [ far ]) [ "blocks.5.ln2.hook_normalized"; "2 layers" ] "unknown layer"
            throwsWith (fun () -> Splicing.validate c [ wide ]) [ "width"; string (c.DModel + 1) ] "width"
            throwsWith (fun () -> Splicing.validate c [ backwards ]) [ "blocks.1.hook_resid_post"; "after" ] "input after output"
            throwsWith (fun () -> ReplacementModel.create m [ wide ] WithErrorTerms) [ "width" ] "replacement model validates"
            use tokens = randomTokens 19 c.VocabSize 1 3
            // hooks alone: the width is checked when the activation arrives
            throwsWith (fun () -> Transformer.runWithHooks m (Splicing.hooks [ wide ] WithoutErrorTerms) tokens) [ "blocks.1.ln2.hook_normalized"; string (c.DModel + 1) ] "width at run time"
    ]

let replacementTests =
    testList "replacement model" [
        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 20 } "the cache holds the features: Coder.Encode of the cached inputs; outputs are the spliced values"
        <| fun (seed: int) (kindIndex: uint8) (setup: uint8) ->
            use scope = torch.NewDisposeScope()
            let c = spliceConfig seed (kindOf kindIndex)
            use m = randomModel seed c
            let coders = coderSetup seed c (int setup)
            try
                let rm = ReplacementModel.create m coders WithoutErrorTerms
                let tokens = randomTokens seed c.VocabSize 2 (min c.NCtx 5)
                use r = ReplacementModel.runWithCache rm [ "*.hook_acts"; "blocks.*.ln2.hook_normalized"; "blocks.*.hook_attn_out"; "blocks.*.hook_mlp_out" ] tokens
                let forward = ReplacementModel.forward rm tokens
                Expect.isLessThan (relDiff r.Logits.Value forward) 1e-6 "cached run = forward"
                Expect.isLessThan (relDiff forward (referenceLogits m coders tokens)) 1e-4 "forward = reference"
                for site in rm.FeatureSites do
                    Expect.isTrue (r.Cache.ContainsKey site.Name) (site.Name + " cached")
                for coder in coders do
                    let cfg = coder.Config
                    if cfg.Kind = CrossLayerTranscoder then
                        let x = torch.stack([ for h in cfg.HookIn -> r[h] ], 2L)
                        let acts = coder.Encode x
                        let pred = coder.Forward x
                        for i in 0 .. cfg.NLayers - 1 do
                            Expect.isLessThan (relDiff r[featureHookName coder i] (acts.select(2, int64 i))) 1e-4 "CLT features"
                            Expect.isLessThan (relDiff r[cfg.HookOut[i]] (pred.select(2, int64 i))) 1e-4 "CLT outputs"
                    elif cfg.Kind <> Sae then
                        Expect.isLessThan (relDiff r[featureHookName coder 0] (coder.Encode r[cfg.HookIn[0]])) 1e-4 "transcoder features"
                        Expect.isLessThan (relDiff r[cfg.HookOut[0]] (coder.Forward r[cfg.HookIn[0]])) 1e-4 "transcoder output"
                    else
                        // the cache keeps the SAE's reconstruction, whose input the run does not keep: check its shape
                        Expect.sequenceEqual r[featureHookName coder 0].shape [| 2L; int64 (min c.NCtx 5); int64 cfg.DSae |] "SAE features"
            finally disposeAll coders

        testCase "run names: globs over model and feature hooks, clear errors for unknown names" <| fun () ->
            use scope = torch.NewDisposeScope()
            let c = { randomConfig 23 LlamaLike with NLayers = 2 }
            use m = randomModel 23 c
            let coders = [ for l in 0 .. 1 -> randomCoder l (coderConfig (Random l) c Transcoder [| l |]) ]
            try
                let rm = ReplacementModel.create m coders WithErrorTerms
                Expect.sequenceEqual rm.FeatureNames [ "blocks.0.transcoder.hook_acts"; "blocks.1.transcoder.hook_acts" ] "feature names"
                let tokens = randomTokens 23 c.VocabSize 1 4
                use r = ReplacementModel.runWithCache rm [ "blocks.1.*" ] tokens
                Expect.isTrue (r.Cache.ContainsKey "blocks.1.transcoder.hook_acts" && r.Cache.ContainsKey "blocks.1.hook_mlp_out") "glob covers both kinds"
                Expect.isFalse (r.Cache.ContainsKey "blocks.0.transcoder.hook_acts") "only layer 1"
                throwsWith (fun () -> ReplacementModel.runWithCache rm [ "blocks.1.transcoder.hook_act" ] tokens) [ "blocks.1.transcoder.hook_act"; "blocks.1.transcoder.hook_acts" ] "unknown name with a suggestion"
                // a hook on the features changes the output; the stop-at-layer run still caches the features it reached
                use stopped = ReplacementModel.run rm { RunOptions.Default with Cache = set [ "*.hook_acts" ]; StopAtLayer = Some 1 } tokens
                Expect.sequenceEqual (stopped.Cache |> Map.keys) [ "blocks.0.transcoder.hook_acts" ] "features up to the stop"
                let ablated = ReplacementModel.runWithHooks rm [ "blocks.0.transcoder.hook_acts", torch.zeros_like ] tokens
                let plain = Transformer.forward m tokens
                Expect.isGreaterThan (maxDiff ablated plain) 1e-4 "ablating features moves the logits even with error terms"
            finally disposeAll coders

        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 12 } "generation: error terms give the original's tokens; the KV cache changes nothing; = a slow argmax loop"
        <| fun (seed: int) (kindIndex: uint8) (setup: uint8) ->
            use scope = torch.NewDisposeScope()
            let c = spliceConfig seed (kindOf kindIndex)
            use m = randomModel seed c
            let coders = coderSetup seed c (int setup)
            try
                let prompt = [| 1 % c.VocabSize; 3 % c.VocabSize; 2 % c.VocabSize |]
                let n = c.NCtx - prompt.Length
                let exact = ReplacementModel.create m coders WithErrorTerms
                Expect.sequenceEqual (ReplacementModel.greedy exact n prompt) (Generation.greedy m n prompt) "error terms: the original's greedy tokens"
                let rm = exact.WithErrors WithoutErrorTerms
                let cached = ReplacementModel.greedy rm n prompt
                let uncached = (ReplacementModel.generate rm { Generation.GenerateOptions.Greedy with MaxNewTokens = n; UseKvCache = false } prompt).Tokens
                Expect.sequenceEqual cached uncached "with and without the KV cache"
                let slow = Collections.Generic.List<int>(prompt)
                for _ in 1 .. n do
                    use logits = ReplacementModel.forward rm (torch.tensor(slow |> Seq.map int64 |> Array.ofSeq).unsqueeze(0))
                    slow.Add(int (logits[0L, -1L].argmax().item<int64> ()))
                Expect.sequenceEqual cached (slow.ToArray()) "a slow argmax loop over full forwards"
            finally disposeAll coders

        testCase "runCached continues a KV cache with the same logits as a full run" <| fun () ->
            use scope = torch.NewDisposeScope()
            let c = { randomConfig 29 LlamaLike with NCtx = 12 }
            use m = randomModel 29 c
            let coders = coderSetup 29 c 2
            try
                let rm = ReplacementModel.create m coders WithoutErrorTerms
                let tokens = randomTokens 29 c.VocabSize 2 9
                let full = ReplacementModel.forward rm tokens
                use kv = Transformer.kvCache m 2 9
                use r1 = ReplacementModel.runCached rm kv { RunOptions.Default with Cache = set [ "*.hook_acts" ] } (tokens.narrow(1, 0L, 5L))
                use r2 = ReplacementModel.runCached rm kv RunOptions.Default (tokens.narrow(1, 5L, 4L))
                Expect.isLessThan (relDiff (torch.cat([| r1.Logits.Value; r2.Logits.Value |], 1L)) full) 1e-5 "incremental = full"
                Expect.equal r1[rm.FeatureNames.Head].shape[1] 5L "features of the new positions"
            finally disposeAll coders

        testCase "compare: error terms agree exactly, a spliced coder does not; fidelity against a per-position loop" <| fun () ->
            use scope = torch.NewDisposeScope()
            let c = randomConfig 31 GptLike
            use m = randomModel 31 c
            let coders = coderSetup 31 c 0
            try
                let tokens = randomTokens 31 c.VocabSize 2 6
                let f = ReplacementModel.compare (ReplacementModel.create m coders WithErrorTerms) tokens
                Expect.isLessThan (abs f.KlToOriginal) 1e-7 "KL 0"
                Expect.equal f.Top1Agreement 1.0 "top-1 agreement"
                Expect.floatClose { absolute = 1e-5; relative = 1e-5 } f.LogitCosine 1.0 "cosine 1"
                let rm = ReplacementModel.create m coders WithoutErrorTerms
                let g = ReplacementModel.compare rm tokens
                // the slow way
                let a = values (Transformer.forward m tokens)
                let b = values (ReplacementModel.forward rm tokens)
                let v = c.VocabSize
                let positions = a.Length / v
                let mutable kl, agree, cos, dot, na, nb = 0.0, 0, 0.0, 0.0, 0.0, 0.0
                for p in 0 .. positions - 1 do
                    let x, y = a[p * v .. p * v + v - 1], b[p * v .. p * v + v - 1]
                    let lse (z: float[]) = let mx = Array.max z in mx + log (z |> Array.sumBy (fun t -> exp (t - mx)))
                    let lx, ly = lse x, lse y
                    kl <- kl + Array.fold2 (fun s xi yi -> s + exp (xi - lx) * ((xi - lx) - (yi - ly))) 0.0 x y
                    if Array.findIndex ((=) (Array.max x)) x = Array.findIndex ((=) (Array.max y)) y then agree <- agree + 1
                    let d = Array.fold2 (fun s xi yi -> s + xi * yi) 0.0 x y
                    let nx, ny = x |> Array.sumBy (fun t -> t * t), y |> Array.sumBy (fun t -> t * t)
                    cos <- cos + d / sqrt (nx * ny)
                    dot <- dot + d
                    na <- na + nx
                    nb <- nb + ny
                let close what (actual: float) (expected: float) = Expect.floatClose { absolute = 1e-5; relative = 1e-4 } actual expected what
                Expect.equal g.Positions (int64 positions) "positions"
                close "KL" g.KlToOriginal (kl / float positions)
                close "top-1" g.Top1Agreement (float agree / float positions)
                close "cosine" g.LogitCosine (cos / float positions)
                close "flat cosine" g.LogitCosineFlat (dot / sqrt (na * nb))
                close "mse" g.LogitMse (Array.fold2 (fun s x y -> s + (x - y) * (x - y)) 0.0 a b / float a.Length)
                Expect.isGreaterThan g.KlToOriginal 1e-4 "the spliced model differs"
                let over = ReplacementModel.compareOver rm [ tokens.narrow(0, 0L, 1L); tokens.narrow(0, 1L, 1L) ]
                close "KL over batches" over.KlToOriginal g.KlToOriginal
            finally disposeAll coders
    ]

/// Next-token CE, KL and top-1 of logits computed position by position in float64.
let private slowMetrics (clean: float[]) (other: float[]) (tokens: int64[]) (b: int) (p: int) (v: int) =
    let logSoftmax (z: float[]) =
        let mx = Array.max z
        let lse = mx + log (z |> Array.sumBy (fun t -> exp (t - mx)))
        z |> Array.map (fun t -> t - lse)
    let mutable ceC, ceO, kl, agree = 0.0, 0.0, 0.0, 0
    for i in 0 .. b - 1 do
        for j in 0 .. p - 1 do
            let at (a: float[]) = a[(i * p + j) * v .. (i * p + j) * v + v - 1]
            let lc, lo = logSoftmax (at clean), logSoftmax (at other)
            if j < p - 1 then
                let next = int tokens[i * p + j + 1]
                ceC <- ceC - lc[next]
                ceO <- ceO - lo[next]
            kl <- kl + Array.fold2 (fun s x y -> s + exp x * (x - y)) 0.0 lc lo
            let argmax (z: float[]) = Array.findIndex ((=) (Array.max z)) z
            if argmax lc = argmax lo then agree <- agree + 1
    ceC, ceO, kl, agree

let evalTests =
    testList "spliced evaluation" [
        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 15 } "metrics = a per-position log-softmax loop over clean, spliced and zero-ablated logits"
        <| fun (seed: int) (kindIndex: uint8) (setup: uint8) ->
            use scope = torch.NewDisposeScope()
            let c = spliceConfig seed (kindOf kindIndex)
            use m = randomModel seed c
            let coders = coderSetup seed c (int setup)
            try
                let p = min c.NCtx 6
                let batches = [ randomTokens seed c.VocabSize 2 p; randomTokens (seed + 1) c.VocabSize 3 p ]
                let r = SplicedEval.evaluate m coders batches
                let zero = Splicing.outputHooks coders |> List.map (fun h -> h, (fun (x: Tensor) -> x * 0.0))
                let mutable ceC, ceS, ceA, klS, klA, agS, agA = 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0
                for t in batches do
                    let b = int t.shape[0]
                    let clean = values (Transformer.forward m t)
                    let spliced = values (Transformer.runWithHooks m (Splicing.hooks coders WithoutErrorTerms) t)
                    let ablated = values (Transformer.runWithHooks m zero t)
                    let ids = t.data<int64>().ToArray()
                    let c1, s1, k1, a1 = slowMetrics clean spliced ids b p c.VocabSize
                    let _, s2, k2, a2 = slowMetrics clean ablated ids b p c.VocabSize
                    ceC <- ceC + c1
                    ceS <- ceS + s1
                    ceA <- ceA + s2
                    klS <- klS + k1
                    klA <- klA + k2
                    agS <- agS + a1
                    agA <- agA + a2
                let predictions, positions = float (5 * (p - 1)), float (5 * p)
                let close what (actual: float) (expected: float) = Expect.floatClose { absolute = 1e-5; relative = 1e-4 } actual expected what
                Expect.equal r.Tokens (int64 (5 * p)) "tokens"
                Expect.equal r.Predictions (int64 (5 * (p - 1))) "predictions"
                close "CE clean" r.CeClean (ceC / predictions)
                close "CE spliced" r.CeSpliced (ceS / predictions)
                close "CE ablated" r.CeAblated (ceA / predictions)
                // a ratio whose rounding error grows without bound as ablation matters less (CE_ablated − CE_clean → 0):
                // its definition on the result's own CEs, and the slow value where the gap is not tiny
                Expect.floatClose { absolute = 1e-12; relative = 1e-9 } (r.CeRecovered * (r.CeAblated - r.CeClean)) (r.CeAblated - r.CeSpliced) "CE recovered's definition"
                let gap = (ceA - ceC) / predictions
                if abs gap > 1e-2 then close "CE recovered" r.CeRecovered ((ceA - ceS) / (ceA - ceC))
                close "KL" r.KlToClean (klS / positions)
                close "KL ablated" r.KlAblated (klA / positions)
                close "top-1" r.Top1Agreement (float agS / positions)
                close "top-1 ablated" r.Top1AgreementAblated (float agA / positions)
                let many = SplicedEval.evaluateMany m [ coders; [ coders.Head ] ] batches
                Expect.equal many.Head r "evaluateMany's first set = evaluate"
                Expect.equal many[1] (SplicedEval.evaluate m [ coders.Head ] batches) "evaluateMany's second set = evaluate"
            finally disposeAll coders

        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 10 } "CE recovered is 1 for MLP-exact transcoders and 0 for transcoders that predict 0"
        <| fun (seed: int) (tiny: bool) ->
            use scope = torch.NewDisposeScope()
            let c = if tiny then randomConfig seed TinyLike else { randomConfig seed GptLike with Mlp = Plain Relu }
            use m = randomModel seed c
            let exact = [ for l in 0 .. c.NLayers - 1 -> exactTranscoder m l ]
            let zero = [ for l in 0 .. c.NLayers - 1 -> zeroTranscoder c l ]
            try
                let batches = [ randomTokens seed c.VocabSize 4 (min c.NCtx 8) ]
                match SplicedEval.evaluateMany m [ exact; zero ] batches with
                | [ e; z ] ->
                    // (the ratio is only well defined where ablating the MLPs matters)
                    if e.CeAblated - e.CeClean > 1e-3 then Expect.floatClose { absolute = 1e-3; relative = 1e-3 } e.CeRecovered 1.0 "exact: all recovered"
                    Expect.floatClose { absolute = 1e-6; relative = 1e-5 } e.CeSpliced e.CeClean "exact: CE unchanged"
                    Expect.isLessThan e.KlToClean 1e-6 "exact: KL 0"
                    Expect.equal e.Top1Agreement 1.0 "exact: same argmax"
                    Expect.floatClose { absolute = 1e-9; relative = 1e-9 } z.CeRecovered 0.0 "zero: nothing recovered"
                    Expect.floatClose { absolute = 1e-9; relative = 1e-9 } z.KlRecovered 0.0 "zero: KL score 0"
                    Expect.equal z.CeSpliced z.CeAblated "zero coder = zero ablation"
                | other -> failwithf "two results expected, got %d" other.Length
            finally disposeAll (exact @ zero)

        testCase "bad input is refused clearly" <| fun () ->
            let c = randomConfig 37 GptLike
            use m = randomModel 37 c
            use coder = randomCoder 1 (coderConfig (Random 1) c Transcoder [| 0 |])
            throwsWith (fun () -> SplicedEval.evaluate m [ coder ] []) [ "no next-token predictions" ] "no batches"
            throwsWith (fun () -> SplicedEval.evaluate m [ coder ] [ randomTokens 1 c.VocabSize 2 1 ]) [ "at least 2 tokens" ] "single-token rows"
            throwsWith (fun () -> SplicedEval.evaluate m [] [ randomTokens 1 c.VocabSize 2 3 ]) [ "empty" ] "no coders"
            throwsWith (fun () -> SplicedEval.evaluate m [ coder ] [ torch.tensor([| 0L; int64 c.VocabSize |]).reshape(1L, 2L) ]) [ "out of range" ] "token out of range"
    ]

let featureTests =
    testList "feature access" [
        testProperty "tags parse in tinymodel's forms and print canonically" <| fun (kindIndex: uint8) (layer: uint16) (feature: uint16) (sepIndex: uint8) (whole: bool) ->
            let prefixes = [| "M", FeatureAccess.Mlp; "A", FeatureAccess.Attn; "Mo", FeatureAccess.MlpOut; "Rm", FeatureAccess.ResidMid; "Ra", FeatureAccess.ResidPre |]
            let prefix, kind = prefixes[int kindIndex % prefixes.Length]
            let sep = [| "N"; "."; "_"; "n" |][int sepIndex % 4]
            let text = if whole then sprintf "%s%d" prefix layer else sprintf "%s%d%s%d" prefix layer sep feature
            let tag = FeatureAccess.parse text
            Expect.equal tag { Kind = kind; Layer = int layer; Feature = (if whole then None else Some (int feature)) } text
            Expect.equal (FeatureAccess.parse (string tag)) tag "canonical text parses back"
            Expect.equal (string tag) (if whole then text else sprintf "%s%dN%d" prefix layer feature) "canonical text"

        testCase "malformed tags are refused with the expected form" <| fun () ->
            for bad in [ ""; "M"; "N1"; "X1N2"; "MN1"; "M1N"; "M1NN2"; "M-1N2"; "M1N2x"; "M99999999999N1" ] do
                match FeatureAccess.tryParse bad with
                | Ok t -> failtestf "'%s' parsed as %A" bad t
                | Error e -> Expect.isTrue (e.Contains "M{layer}N{feature}" || e.Contains "too large") (sprintf "'%s': %s" bad e)
            throwsWith (fun () -> FeatureAccess.parse "Q3") [ "'Q3'"; "M{layer}N{feature}" ] "parse"

        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 15 } "M{l}N{f} = column f of M{l} = Coder.Encode of the layer's MLP input in the original model"
        <| fun (seed: int) (kindIndex: uint8) (setup: uint8) ->
            use scope = torch.NewDisposeScope()
            let c = spliceConfig seed (kindOf kindIndex)
            use m = randomModel seed c
            let coders = coderSetup seed c (int setup % 3)
            try
                let lm = FeatureAccess.FeatureModel(m, coders)
                let tokens = randomTokens seed c.VocabSize 2 (min c.NCtx 5)
                use r = Transformer.runWithCache m [ "blocks.*.ln2.hook_normalized" ] tokens
                for coder in coders do
                    let cfg = coder.Config
                    let encoded =
                        if cfg.Kind = CrossLayerTranscoder then coder.Encode(torch.stack([ for h in cfg.HookIn -> r[h] ], 2L))
                        else coder.Encode r[cfg.HookIn[0]]
                    for i in 0 .. cfg.NLayers - 1 do
                        let l = cfg.Layers[i]
                        let expected = if cfg.Kind = CrossLayerTranscoder then encoded.select(2, int64 i) else encoded
                        let layer = lm.[sprintf "M%d" l] tokens
                        Expect.isLessThan (relDiff layer expected) 1e-4 (sprintf "M%d" l)
                        let f = (seed &&& 0x7fffffff) % cfg.DSae
                        let one = lm.[sprintf "M%dN%d" l f] tokens
                        Expect.sequenceEqual one.shape [| 2L; int64 (min c.NCtx 5) |] "one feature: [batch, pos]"
                        Expect.isLessThan (relDiff one (expected.select(2, int64 f))) 1e-4 (sprintf "M%dN%d" l f)
                        let cols = lm.Columns(sprintf "M%d" l, [| f; 0 |], tokens)
                        Expect.isLessThan (relDiff cols (expected.index_select(2L, torch.tensor([| int64 f; 0L |])))) 1e-4 "columns"
            finally disposeAll coders

        testCase "SAE tags, and errors naming the layers, features and coders available" <| fun () ->
            use scope = torch.NewDisposeScope()
            let c = { randomConfig 41 GptLike with NLayers = 2 }
            use m = randomModel 41 c
            use tc = randomCoder 1 (coderConfig (Random 1) c Transcoder [| 1 |])
            use sae = randomCoder 2 (coderConfig (Random 2) c Sae [| 0 |])
            use mo = randomCoder 3 (CoderConfig.sae "test" (HookNames.mlpOut 1) 1 c.DModel 6)
            let lm = FeatureAccess.FeatureModel(m, [ tc; sae; mo ])
            let tokens = randomTokens 41 c.VocabSize 2 4
            use r = Transformer.runWithCache m [ HookNames.attnOut 0; HookNames.mlpOut 1 ] tokens
            Expect.isLessThan (relDiff (lm.["A0"] tokens) (sae.Encode r[HookNames.attnOut 0])) 1e-5 "A0 = SAE on attn_out"
            Expect.isLessThan (relDiff (lm.["Mo1_2"] tokens) ((mo.Encode r[HookNames.mlpOut 1]).select(2, 2L))) 1e-5 "Mo1_2"
            throwsWith (fun () -> lm.["M0N1"]) [ "M0N1"; "no coder"; "M1, A0, Mo1" ] "no coder at that layer"
            throwsWith (fun () -> lm.["M5"]) [ "M5"; "2 layers" ] "no such layer"
            throwsWith (fun () -> lm.[sprintf "M1N%d" tc.Config.DSae]) [ sprintf "feature %d" tc.Config.DSae; sprintf "%d features" tc.Config.DSae ] "no such feature"
            use clt = randomCoder 4 (coderConfig (Random 4) c CrossLayerTranscoder [| 0; 1 |])
            throwsWith (fun () -> FeatureAccess.features m [ tc; clt ] "M1" tokens) [ "ambiguous" ] "two coders for M1"
    ]

/// llama2.c's stories260K on its own greedy text (a sample the model predicts well).
let storiesTests =
    testList "stories260K" [
        testCase "a CLT over all five layers with error terms reproduces the logits; spliced evaluation is sane" <| fun () ->
            use scope = torch.NewDisposeScope()
            let m, _ = ModelFiles.load stories260K cpu
            use m = m
            use doc = JsonDocument.Parse(File.ReadAllText(Paths.data "models/stories260K/reference_greedy.json"))
            let ids = [| for x in doc.RootElement.GetProperty("greedy_token_ids").EnumerateArray() -> int64 (x.GetInt32()) |]
            let tokens = torch.tensor(ids[.. 127]).reshape(2L, 64L)
            let c = m.Config
            let rng = Random 5
            use clt = randomCoder 5 { coderConfig rng c CrossLayerTranscoder [| 0 .. c.NLayers - 1 |] with Activation = JumpReLU JumpReLUSpec.Default }
            let plain = Transformer.forward m tokens
            let rm = ReplacementModel.create m [ clt ] WithErrorTerms
            Expect.isLessThanOrEqual (relDiff (ReplacementModel.forward rm tokens) plain) 1e-5 "error terms: original logits"
            let f = ReplacementModel.compare (rm.WithErrors WithoutErrorTerms) tokens
            Expect.isGreaterThan f.KlToOriginal 1e-3 "a random CLT without error terms changes the predictions"
            let zero = [ for l in 0 .. c.NLayers - 1 -> zeroTranscoder c l ]
            try
                let r = SplicedEval.evaluate m zero [ tokens ]
                let loss = Transformer.nextTokenLoss plain tokens
                Expect.floatClose { absolute = 1e-5; relative = 1e-5 } r.CeClean (float (loss.item<float32> ())) "CE clean = the model's next-token loss"
                Expect.isGreaterThan r.CeAblated (r.CeClean + 0.5) "ablating every MLP hurts a trained model on its own text"
                Expect.equal r.CeSpliced r.CeAblated "zero transcoders = zero ablation"
            finally disposeAll zero
    ]

/// Sequenced: the random models (`Transformer.create`) draw from torch's global generator, which tests that replay
/// global-generator streams bit for bit (training resume) must have to themselves.
let tests = testSequenced <| testList "Splicing" [ spliceTests; replacementTests; evalTests; featureTests; storiesTests ]
