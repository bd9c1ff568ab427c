/// The transformer: Hugging Face and llama2.c references, hook points, KV cache, grouped-query attention,
/// rotary layouts, autograd through hooks, and clear errors on bad input.
module Transcoders.Tests.ModelTests

open System
open System.IO
open System.Text.Json
open Expecto
open TorchSharp
open Transcoders.Files
open Transcoders.Models
open Transcoders.Tests.Fixtures

/// The shape the docs give for each hook point, for a batch b of p positions.
let expectedShape (c: TransformerConfig) (b: int64) (p: int64) (name: string) : int64[] =
    let d, h, k, e, m = int64 c.DModel, int64 c.NHeads, int64 c.NKvHeads, int64 (TransformerConfig.dHead c), int64 c.DMlp
    let last = name.Substring(name.LastIndexOf '.' + 1)
    match last with
    | "hook_scale" -> [| b; p; 1L |]
    | "hook_q" | "hook_rot_q" | "hook_z" -> [| b; p; h; e |]
    | "hook_k" | "hook_v" | "hook_rot_k" -> [| b; p; k; e |]
    | "hook_attn_scores" | "hook_pattern" -> [| b; h; p; p |]
    | "hook_pre" | "hook_pre_linear" | "hook_post" -> [| b; p; m |]
    | _ -> [| b; p; d |]

/// Reads a fixture's greedy.json: prompt and the full greedy sequence (prompt included).
let readGreedy (dir: string) =
    use doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "greedy.json")))
    let ints (name: string) = [| for x in doc.RootElement.GetProperty(name).EnumerateArray() -> x.GetInt32() |]
    ints "prompt", ints "greedy"

/// Hugging Face fixture: logits, every layer's resid_pre / mlp_in / mlp_out and the final hidden state
/// (after the final norm) within 1e-4 of transformers 5.17's values.
let hfActivations (name: string) =
    testCase (name + " reproduces logits and every saved activation") <| fun () ->
        let dir = fixture name
        use m = HuggingFace.load dir cpu
        use expected = Safetensors.Reader.Open(Path.Combine(dir, "expected.safetensors"))
        use ids = expected.Tensor "input_ids"
        let layers = m.Config.NLayers
        let names =
            [ for l in 0 .. layers - 1 do
                  yield HookNames.residPre l
                  yield HookNames.mlpIn l
                  yield HookNames.mlpOut l
              yield HookNames.lnFinalNormalized ]
        use r = Transformer.runWithCache m names ids
        let check (actual: torch.Tensor) key =
            use e = expected.Tensor key
            let d = maxDiff actual e
            Expect.isLessThan d 1e-4 (sprintf "%s %s: max abs error %g" name key d)
        check r.Logits.Value "logits"
        for l in 0 .. layers - 1 do
            check r.[HookNames.residPre l] (sprintf "blocks.%d.resid_pre" l)
            check r.[HookNames.mlpIn l] (sprintf "blocks.%d.mlp_in" l)
            check r.[HookNames.mlpOut l] (sprintf "blocks.%d.mlp_out" l)
        check r.[HookNames.lnFinalNormalized] "final_hidden"

let hfGreedy (name: string) =
    testCase (name + " greedy continuation matches exactly (with and without the KV cache)") <| fun () ->
        let dir = fixture name
        use m = HuggingFace.load dir cpu
        let prompt, expected = readGreedy dir
        let n = expected.Length - prompt.Length
        for useCache in [ true; false ] do
            let g = Generation.generate m { Generation.GenerateOptions.Greedy with MaxNewTokens = n; UseKvCache = useCache } prompt
            Expect.sequenceEqual g.Tokens expected (sprintf "greedy tokens (KV cache %b)" useCache)
            Expect.equal g.Stop Generation.ReachedMaxNewTokens "ran to MaxNewTokens"


let stories260KTests =
    testList "stories260K (llama2.c)" [
        testCase "header, config and parameter count" <| fun () ->
            let h = Llama2c.readHeader stories260K
            Expect.equal (h.Dim, h.HiddenDim, h.NLayers, h.NHeads, h.NKvHeads, h.VocabSize, h.SeqLen, h.SharedClassifier)
                         (64, 172, 5, 8, 4, 512, 512, true) "header"
            use m = Llama2c.load stories260K cpu
            // 264,128 floats in the file, of which 4,096 are the skipped RoPE tables
            Expect.equal (Transformer.parameterCount m) (264128L - 4096L) "parameters"
            Expect.equal (TransformerConfig.parameterCount m.Config) (264128L - 4096L) "parameters from the config"

        testCase "reproduces llama2.c's greedy sample token for token (256 steps from BOS, KV cache)" <| fun () ->
            use doc = JsonDocument.Parse(File.ReadAllText(Paths.data "models/stories260K/reference_greedy.json"))
            let root = doc.RootElement
            let expected = [| for x in root.GetProperty("greedy_token_ids").EnumerateArray() -> x.GetInt32() |]
            let steps = root.GetProperty("steps").GetInt32()
            use m = Llama2c.load stories260K cpu
            use logits = Transformer.forward m (torch.tensor([| 1L |]))
            let first8 = [| for x in root.GetProperty("logits_pos0_first8").EnumerateArray() -> x.GetDouble() |]
            first8 |> Array.iteri (fun i v ->
                let actual = float (logits.[0L, 0L, int64 i].item<float32> ())
                Expect.floatClose { absolute = 1e-4; relative = 1e-5 } actual v (sprintf "logit %d at position 0" i))
            let g = Generation.generate m { Generation.GenerateOptions.Greedy with MaxNewTokens = steps } [| 1 |]
            Expect.sequenceEqual g.Tokens expected "greedy tokens"

        testCase "the greedy sample decodes to llama2.c's text; saved in our format with its tokenizer, it comes back the same" <| fun () ->
            use doc = JsonDocument.Parse(File.ReadAllText(Paths.data "models/stories260K/reference_greedy.json"))
            let text = doc.RootElement.GetProperty("greedy_text").GetString()
            use m = Llama2c.load stories260K cpu
            let tokenizer = Transcoders.Text.Tokenizer.llama2c (Paths.data "models/stories260K/tok512.bin") m.Config.VocabSize
            let ids = Generation.greedy m 256 [| 1 |]
            Expect.equal (Transcoders.Text.Tokenizer.decode tokenizer ids) text "decoded greedy text"
            use dir = new TempDir()
            let description = JsonSerializer.SerializeToElement(Transcoders.Text.Tokenizer.toJson tokenizer)
            Checkpoint.save dir.Path { Checkpoint.Metadata.Empty with Tokenizer = Some description } m
            let loaded, meta = ModelFiles.load dir.Path cpu
            use loaded = loaded
            let tokenizer2 = Transcoders.Text.Tokenizer.ofJsonElement "config.json" meta.Tokenizer.Value
            Expect.sequenceEqual (Generation.greedy loaded 256 [| 1 |]) ids "same greedy tokens"
            Expect.equal (Transcoders.Text.Tokenizer.decode tokenizer2 ids) text "same text through the saved tokenizer"

        testCase "a run without the KV cache agrees for the first 64 tokens" <| fun () ->
            use doc = JsonDocument.Parse(File.ReadAllText(Paths.data "models/stories260K/reference_greedy.json"))
            let expected = [| for x in doc.RootElement.GetProperty("greedy_token_ids").EnumerateArray() -> x.GetInt32() |]
            use m = Llama2c.load stories260K cpu
            let g = Generation.generate m { Generation.GenerateOptions.Greedy with MaxNewTokens = 64; UseKvCache = false } [| 1 |]
            Expect.sequenceEqual g.Tokens expected.[.. 64] "greedy tokens without cache"
    ]

let hookTests =
    testList "hooks" [
        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 30 } "every hook point is cached with its documented shape"
        <| fun (seed: int) (kindIndex: uint8) ->
            let kind = kinds.[int kindIndex % 3]
            let c = randomConfig seed kind
            use m = randomModel seed c
            let b, p = 2, min c.NCtx (3 + abs seed % 5)
            use tokens = randomTokens seed c.VocabSize b p
            use r = Transformer.runWithCache m [ "*" ] tokens
            Expect.sequenceEqual (r.Cache |> Map.keys |> Set.ofSeq) (HookNames.all c |> Set.ofList) "every hook point is cached"
            for KeyValue (name, t) in r.Cache do
                Expect.sequenceEqual t.shape (expectedShape c (int64 b) (int64 p) name) name
            Expect.sequenceEqual r.Logits.Value.shape [| int64 b; int64 p; int64 c.VocabSize |] "logits"
            use plain = Transformer.forward m tokens
            // caching the attention pattern switches to explicit attention: same logits as the fused kernel
            Expect.isLessThan (relDiff r.Logits.Value plain) 1e-4 "cached run = plain forward"

        testCase "the residual stream adds up: resid_post = resid_pre + attn_out + mlp_out" <| fun () ->
            let c = randomConfig 7 GptLike
            use m = randomModel 7 c
            use tokens = randomTokens 7 c.VocabSize 2 6
            use r = Transformer.runWithCache m [ "blocks.*.hook_resid_*"; "blocks.*.hook_*_out" ] tokens
            for l in 0 .. c.NLayers - 1 do
                use sum = r.[HookNames.residPre l] + r.[HookNames.attnOut l] + r.[HookNames.mlpOut l]
                Expect.isLessThan (relDiff sum r.[HookNames.residPost l]) 1e-5 (sprintf "layer %d" l)

        testCase "attention patterns are causal probability distributions" <| fun () ->
            let c = randomConfig 3 LlamaLike
            use m = randomModel 3 c
            use tokens = randomTokens 3 c.VocabSize 2 7
            use r = Transformer.runWithCache m [ "blocks.*.attn.hook_pattern" ] tokens
            for l in 0 .. c.NLayers - 1 do
                let pattern = r.[HookNames.pattern l]
                use sums = pattern.sum(-1L)
                Expect.isLessThan (maxDiff sums (torch.ones_like sums)) 1e-5 "rows sum to 1"
                use future = pattern.triu(1L).abs().max()
                Expect.equal (future.item<float32> ()) 0.0f "no weight on later positions"

        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 15 } "identity hooks everywhere leave logits unchanged; zero-ablating hook_mlp_out changes them"
        <| fun (seed: int) (kindIndex: uint8) ->
            let c = randomConfig seed kinds.[int kindIndex % 3]
            use m = randomModel seed c
            use tokens = randomTokens seed c.VocabSize 2 (min c.NCtx 5)
            use plain = Transformer.forward m tokens
            use hooked = Transformer.runWithHooks m [ "*", id ] tokens
            Expect.isLessThan (relDiff hooked plain) 1e-4 "identity hooks (explicit attention and norms)"
            use ablated = Transformer.runWithHooks m [ "blocks.*.hook_mlp_out", torch.zeros_like ] tokens
            // small random weights can make the MLPs' effect tiny (~1e-5) but never zero; an ignored hook gives exactly 0
            Expect.isGreaterThan (maxDiff plain ablated) 1e-7 "zero-ablated MLPs change the logits"

        testCase "a hook's replacement flows downstream, hooks at one point run in order, the cache keeps the hooked value" <| fun () ->
            let c = randomConfig 11 GptLike
            use m = randomModel 11 c
            use tokens = randomTokens 11 c.VocabSize 1 5
            let last = c.NLayers - 1
            let opts =
                { RunOptions.Default with
                    Hooks = [ HookNames.mlpOut last, (fun t -> t * 2.0); HookNames.mlpOut last, (fun t -> t + 1.0) ]
                    Cache = set [ HookNames.mlpOut last; HookNames.residMid last; HookNames.residPost last ] }
            use r = Transformer.run m opts tokens
            use clean = Transformer.runWithCache m [ HookNames.mlpOut last ] tokens
            use expectedOut = clean.[HookNames.mlpOut last] * 2.0 + 1.0
            Expect.isLessThan (relDiff r.[HookNames.mlpOut last] expectedOut) 1e-5 "(2x) then (+1)"
            use sum = r.[HookNames.residMid last] + r.[HookNames.mlpOut last]
            Expect.isLessThan (relDiff r.[HookNames.residPost last] sum) 1e-5 "resid_post uses the replacement"

        testCase "StopAtLayer returns resid_pre of that layer, equal to the full run's cache, and no logits" <| fun () ->
            for kind in kinds do
                let c = { randomConfig 5 kind with NLayers = 3 }
                use m = randomModel 5 c
                use tokens = randomTokens 5 c.VocabSize 2 6
                use full = Transformer.runWithCache m [ "blocks.*.hook_resid_pre"; "blocks.*.hook_resid_post" ] tokens
                for l in 0 .. c.NLayers do
                    use r = Transformer.run m { RunOptions.Default with StopAtLayer = Some l } tokens
                    Expect.isNone r.Logits "no logits"
                    let expected = if l < c.NLayers then full.[HookNames.residPre l] else full.[HookNames.residPost (l - 1)]
                    Expect.isTrue (identical r.Residual.Value expected) (sprintf "%A layer %d" kind l)
                let stopped = Transformer.run m { RunOptions.Default with StopAtLayer = Some 1; Cache = set [ "*" ] } tokens
                Expect.isFalse (stopped.Cache.ContainsKey(HookNames.attnOut 1)) "nothing after the stop is computed"
                Expect.isTrue (stopped.Cache.ContainsKey(HookNames.residPre 1)) "the stop point itself is cached"
                (stopped :> IDisposable).Dispose()

        testCase "freezing a norm's scale at its own value changes nothing; replacing it changes the output linearly" <| fun () ->
            for kind in [ GptLike; LlamaLike ] do
                let c = randomConfig 13 kind
                use m = randomModel 13 c
                use tokens = randomTokens 13 c.VocabSize 2 5
                use r = Transformer.runWithCache m [ HookNames.ln2Scale 0; HookNames.mlpIn 0 ] tokens
                let scale = r.[HookNames.ln2Scale 0]
                use frozen = Transformer.run m { RunOptions.Default with Hooks = [ HookNames.ln2Scale 0, (fun _ -> scale) ]; Cache = set [ HookNames.mlpIn 0 ] } tokens
                Expect.isLessThan (relDiff frozen.Logits.Value r.Logits.Value) 1e-5 (sprintf "%A: frozen scale" kind)
                Expect.isLessThan (maxDiff frozen.[HookNames.mlpIn 0] r.[HookNames.mlpIn 0]) 1e-6 (sprintf "%A: same MLP input" kind)
                // manual check of the divisor: √(var + ε) for LayerNorm, √(mean x² + ε) for RMSNorm
                use mid = Transformer.runWithCache m [ HookNames.residMid 0 ] tokens
                let x = mid.[HookNames.residMid 0]
                use centered = if c.Norm = LayerNorm then x - x.mean([| -1L |], true) else x.alias()
                use manual = (centered.square().mean([| -1L |], true) + c.NormEps).sqrt()
                Expect.isLessThan (maxDiff scale manual) 1e-6 (sprintf "%A: hook_scale value" kind)

        testCase "gradients flow through hooks: d(sum of logits)/d(delta at ln_final) = Σ_v W_U[v]" <| fun () ->
            for tied in [ true; false ] do
                let c = { randomConfig 17 GptLike with TiedUnembed = tied }
                use m = randomModel 17 c
                use tokens = randomTokens 17 c.VocabSize 1 4
                use delta = torch.zeros([| 1L; 4L; int64 c.DModel |], requires_grad = true)
                let logits = Transformer.runWithHooks m [ HookNames.lnFinalNormalized, (fun t -> t + delta) ] tokens
                use total = logits.sum()
                let grad = torch.autograd.grad([| total |], [| delta |]).[0]
                let wU = if tied then m.get_parameter "embed.weight" else m.get_parameter "unembed.weight"
                use expected = wU.sum(0L).detach().expand(1L, 4L, int64 c.DModel)
                Expect.isLessThan (maxDiff grad expected) 1e-4 (sprintf "tied %b" tied)
                logits.Dispose()

        testCase "unknown hook names fail clearly, naming close ones" <| fun () ->
            let c = randomConfig 1 GptLike
            use m = randomModel 1 c
            use tokens = randomTokens 1 c.VocabSize 1 3
            let ex = Expect.throwsC (fun () -> Transformer.runWithCache m [ "blocks.0.hook_mlp_outt" ] tokens |> ignore) id
            Expect.stringContains ex.Message "unknown hook point 'blocks.0.hook_mlp_outt'" "names the bad hook"
            Expect.stringContains ex.Message "'blocks.0.hook_mlp_out'" "suggests the right one"
            let ex = Expect.throwsC (fun () -> Transformer.runWithHooks m [ sprintf "blocks.%d.hook_resid_pre" c.NLayers, id ] tokens |> ignore) id
            Expect.stringContains ex.Message (sprintf "the model has %d layers" c.NLayers) "says how many layers"
            let ex = Expect.throwsC (fun () -> Transformer.runWithCache m [ "blocks.*.attn.hook_rot_q" ] tokens |> ignore) id
            Expect.stringContains ex.Message "unknown hook point" "rotary hooks do not exist with learned positions"
            let ex = Expect.throwsC (fun () -> Transformer.runWithHooks m [ HookNames.mlpOut 0, (fun t -> t.sum(-1L)) ] tokens |> ignore) id
            Expect.stringContains ex.Message "returned shape" "a hook changing the shape is refused"
            Expect.throwsT<ArgumentException> (fun () -> Transformer.run m { RunOptions.Default with StopAtLayer = Some (c.NLayers + 1) } tokens |> ignore) "StopAtLayer out of range"
    ]

let attentionTests =
    testList "attention" [
        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 15 } "grouped-query attention = multi-head attention with each key/value head repeated for its group"
        <| fun (seed: int) ->
            let c = { randomConfig seed LlamaLike with NHeads = 4; NKvHeads = 2; DHead = Some 4; DModel = 12 }
            use gqa = randomModel seed c
            use mha = Transformer.create { c with NKvHeads = 4 } cpu
            mha.eval ()
            let e = 4L
            (use _ = torch.no_grad ()
             for name, p in Transformer.parameters mha do
                 let source = gqa.get_parameter name
                 if name.EndsWith "attn.k.weight" || name.EndsWith "attn.v.weight" then
                     // kv head j serves query heads 2j and 2j+1
                     use repeated = source.view(2L, e, -1L).repeat_interleave(2L, dim = 0L).reshape(p.shape)
                     p.copy_(repeated) |> ignore
                 else p.copy_(source) |> ignore)
            use tokens = randomTokens seed c.VocabSize 2 (min c.NCtx 6)
            use a = Transformer.forward gqa tokens
            use b = Transformer.forward mha tokens
            Expect.isLessThan (relDiff a b) 1e-4 "same logits"

        testCase "interleaved rotary = half-split rotary with query/key rows permuted per head (HF's conversion)" <| fun () ->
            let c = { randomConfig 21 LlamaLike with Positions = Rotary (Interleaved, 10000.0); DHead = None; DModel = 16; NHeads = 2; NKvHeads = 1 }
            use inter = randomModel 21 c
            use half = Transformer.create { c with Positions = Rotary (HalfSplit, 10000.0) } cpu
            half.eval ()
            let e = 8L
            // half-split coordinate i < e/2 is interleaved 2i; i ≥ e/2 is 2(i − e/2) + 1
            let perm = [| for i in 0L .. e - 1L -> if i < e / 2L then 2L * i else 2L * (i - e / 2L) + 1L |]
            (use _ = torch.no_grad ()
             use index = torch.tensor(perm)
             for name, p in Transformer.parameters half do
                 let source = inter.get_parameter name
                 if name.EndsWith "attn.q.weight" || name.EndsWith "attn.k.weight" then
                     let heads = source.shape.[0] / e
                     use permuted = source.view(heads, e, -1L).index_select(1L, index).reshape(p.shape)
                     p.copy_(permuted) |> ignore
                 else p.copy_(source) |> ignore)
            use tokens = randomTokens 21 c.VocabSize 2 8
            use a = Transformer.forward inter tokens
            use b = Transformer.forward half tokens
            Expect.isLessThan (relDiff a b) 1e-4 "same logits"

        testCase "rotary embeddings make attention scores depend only on relative position" <| fun () ->
            for layout in [ HalfSplit; Interleaved ] do
                let c = { randomConfig 23 LlamaLike with Positions = Rotary (layout, 10000.0); NCtx = 16 }
                use m = randomModel 23 c
                // the same two tokens at positions (1, 3) and (9, 11) must get the same q·k score
                let ids = Array.init 12 (fun i -> int64 ((7 * i + 3) % c.VocabSize))
                ids.[9] <- ids.[1]
                ids.[11] <- ids.[3]
                use t2 = torch.tensor(ids).unsqueeze(0)
                // only layer 0's scores: before any attention mixes positions, q and k depend on the token alone
                use r = Transformer.runWithCache m [ HookNames.attnScores 0 ] t2
                let s = r.[HookNames.attnScores 0]
                use early = s.[0L, 0L, 3L, 1L]
                use late = s.[0L, 0L, 11L, 9L]
                Expect.floatClose { absolute = 1e-4; relative = 1e-4 } (float (late.item<float32> ())) (float (early.item<float32> ())) (sprintf "%A" layout)
    ]

let kvCacheTests =
    testList "KV cache" [
        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 25 } "incremental decoding (prompt, single tokens, a multi-token chunk) = full recompute"
        <| fun (seed: int) (kindIndex: uint8) ->
            let c = randomConfig seed kinds.[int kindIndex % 3]
            use m = randomModel seed c
            let n = c.NCtx
            use tokens = randomTokens seed c.VocabSize 2 n
            use full = Transformer.forward m tokens
            use _ = torch.no_grad ()
            use cache = Transformer.kvCache m 2 n
            let rng = Random seed
            let prompt = rng.Next(1, n / 2)
            // chunks: the prompt, then ones and a chunk of three
            let chunks =
                let rec split start acc =
                    if start >= n then List.rev acc
                    else
                        let len = min (n - start) (if List.length acc = 2 then 3 else 1)
                        split (start + len) ((start, len) :: acc)
                (0, prompt) :: split prompt []
            for start, len in chunks do
                use logits = Transformer.forwardCached m cache (tokens.narrow(1, int64 start, int64 len))
                use expected = full.narrow(1, int64 start, int64 len)
                Expect.isLessThan (relDiff logits expected) 1e-4 (sprintf "positions %d..%d" start (start + len - 1))
            Expect.equal cache.Length n "cache holds every position"
            Expect.throwsT<ArgumentException> (fun () -> Transformer.forwardCached m cache (tokens.narrow(1, 0L, 1L)) |> ignore) "past n_ctx"

        testCase "hooks and caching work on cached steps (pattern over all keys)" <| fun () ->
            let c = randomConfig 4 LlamaLike
            use m = randomModel 4 c
            use tokens = randomTokens 4 c.VocabSize 1 6
            use full = Transformer.runWithCache m [ HookNames.pattern 0 ] tokens
            use _ = torch.no_grad ()
            use cache = Transformer.kvCache m 1 6
            use first = Transformer.runCached m cache RunOptions.Default (tokens.narrow(1, 0L, 5L))
            use step = Transformer.runCached m cache { RunOptions.Default with Cache = set [ HookNames.pattern 0 ] } (tokens.narrow(1, 5L, 1L))
            let p = step.[HookNames.pattern 0]
            Expect.sequenceEqual p.shape [| 1L; int64 c.NHeads; 1L; 6L |] "pattern of one query over six keys"
            use lastRow = full.[HookNames.pattern 0].narrow(2, 5L, 1L)
            Expect.isLessThan (maxDiff p lastRow) 1e-5 "same pattern as the full run's last row"
    ]

let validationTests =
    testList "bad input" [
        testCase "token ids out of range, too long, wrong type" <| fun () ->
            let c = randomConfig 2 GptLike
            use m = randomModel 2 c
            let ex = Expect.throwsC (fun () -> Transformer.forward m (torch.tensor([| 0L; int64 c.VocabSize |])) |> ignore) id
            Expect.stringContains ex.Message (sprintf "token id %d at [0, 1] is out of range" c.VocabSize) "out of range"
            let ex = Expect.throwsC (fun () -> Transformer.forward m (torch.tensor([| -1L |])) |> ignore) id
            Expect.stringContains ex.Message "token id -1" "negative"
            let ex = Expect.throwsC (fun () -> Transformer.forward m (torch.zeros([| 1L; int64 c.NCtx + 1L |], dtype = torch.int64)) |> ignore) id
            Expect.stringContains ex.Message (sprintf "exceeds the context length n_ctx = %d" c.NCtx) "too long"
            Expect.throwsT<ArgumentException> (fun () -> Transformer.forward m (torch.zeros([| 1L; 2L |])) |> ignore) "float ids"
            Expect.throwsT<ArgumentException> (fun () -> Transformer.forward m (torch.zeros([| 1L; 2L; 3L |], dtype = torch.int64)) |> ignore) "3-D ids"
            use ok = Transformer.forward m (torch.tensor([| 0; 1; 2 |]))
            Expect.sequenceEqual ok.shape [| 1L; 3L; int64 c.VocabSize |] "int32 [pos] ids are accepted as a batch of one"

        testCase "impossible configurations are refused with every problem named" <| fun () ->
            let bad (c: TransformerConfig) (fragment: string) =
                let ex = Expect.throwsC (fun () -> Transformer.create c cpu |> ignore) id
                Expect.stringContains ex.Message fragment fragment
            let g = { TransformerConfig.gpt2 with DModel = 64; NHeads = 4; NKvHeads = 4; NLayers = 1; NCtx = 8; VocabSize = 10; DMlp = 8 }
            bad { g with DModel = 65 } "d_model 65 is not divisible by n_heads 4"
            bad { g with NKvHeads = 3 } "n_heads 4 is not divisible by n_kv_heads 3"
            bad { g with Positions = Rotary (HalfSplit, 10000.0); DHead = Some 5 } "even head size"
            bad { g with NLayers = 0 } "n_layers must be positive"
            bad { g with VocabSize = 0 } "vocab_size must be positive"
            bad { g with DMlp = -1 } "d_mlp must be positive"
            bad { g with NormEps = 0.0 } "norm_eps"
            bad { g with Positions = Rotary (HalfSplit, 0.5) } "theta"
            let ex = Expect.throwsC (fun () -> Transformer.create { g with NLayers = 0; VocabSize = 0 } cpu |> ignore) id
            Expect.stringContains ex.Message "n_layers" "both problems"
            Expect.stringContains ex.Message "vocab_size" "both problems"
            Expect.isEmpty (TransformerConfig.problems { g with DModel = 63; DHead = Some 16 }) "an explicit head size need not divide d_model"

        testCase "dropout acts in training mode only; loaded models come in eval mode" <| fun () ->
            let c = { randomConfig 30 GptLike with Dropout = 0.3 }
            use m = randomModel 30 c
            use tokens = randomTokens 30 c.VocabSize 2 6
            use e1 = Transformer.forward m tokens
            use e2 = Transformer.forward m tokens
            Expect.isTrue (identical e1 e2) "eval mode is deterministic"
            m.train ()
            use t1 = Transformer.forward m tokens
            use t2 = Transformer.forward m tokens
            use t3 = Transformer.runWithHooks m [ "*", id ] tokens // explicit attention with dropout on the pattern
            Expect.isGreaterThan (maxDiff t1 t2) 1e-3 "two training-mode passes differ"
            Expect.isGreaterThan (maxDiff t1 e1) 1e-3 "training differs from eval"
            Expect.isGreaterThan (maxDiff t3 e1) 1e-3 "explicit path drops out too"
            use dir = new TempDir()
            Checkpoint.save dir.Path Checkpoint.Metadata.Empty m
            let loaded, _ = Checkpoint.load dir.Path cpu
            use loaded = loaded
            Expect.isFalse loaded.training "loaded in eval mode"
            use l1 = Transformer.forward loaded tokens
            Expect.isTrue (identical l1 e1) "the loaded model gives the eval-mode logits"

        testCase "parameter count from the configuration = the model's" <| fun () ->
            for seed in 0 .. 11 do
                let c = randomConfig seed kinds.[seed % 3]
                use m = Transformer.create c cpu
                Expect.equal (TransformerConfig.parameterCount c) (Transformer.parameterCount m) (sprintf "%A" c)
            // GPT-2 small: 124,439,808 parameters (tied)
            Expect.equal (TransformerConfig.parameterCount TransformerConfig.gpt2) 124439808L "GPT-2 small"
    ]

/// TransformerLens' weight processing (`LoadOptions.Processing = TransformerLens`) on the GPT-2 fixture.
let tlProcessingTests =
    let processed = { LoadOptions.Default with Processing = TransformerLens }
    let maxAbs (t: torch.Tensor) = (use m = t.abs().max() in float (m.item<float32> ()))
    testList "TransformerLens weight processing" [
        testCase "hf-gpt2-tiny: the processed model gives the same log-probabilities" <| fun () ->
            let dir = fixture "hf-gpt2-tiny"
            use plain = HuggingFace.load dir cpu
            use tl = HuggingFace.loadWith processed dir cpu
            use expected = Safetensors.Reader.Open(Path.Combine(dir, "expected.safetensors"))
            use ids = expected.Tensor "input_ids"
            use _ = torch.no_grad ()
            use a = Transformer.forward plain ids
            use b = Transformer.forward tl ids
            use la = a.log_softmax(-1L)
            use lb = b.log_softmax(-1L)
            Expect.isLessThan (maxDiff la lb) 1e-5 "log-softmax unchanged"
            // the logits themselves move by one constant per position (the centred unembedding)
            use shift = a.sub(b)
            use spread = shift.amax([| -1L |]).sub(shift.amin([| -1L |]))
            Expect.isLessThan (maxAbs spread) 1e-4 "logits shift by a per-position constant"
            Expect.isGreaterThan (maxAbs shift) 1e-3 "…which is not zero (the unembedding was centred)"

        testCase "hf-neox-tiny (parallel residual, partial rotary) and its sequential twin: the same log-probabilities processed" <| fun () ->
            for name in [ "hf-neox-tiny"; "hf-neox-tiny-sequential" ] do
                let dir = fixture name
                use plain = HuggingFace.load dir cpu
                use tl = HuggingFace.loadWith processed dir cpu
                use expected = Safetensors.Reader.Open(Path.Combine(dir, "expected.safetensors"))
                use ids = expected.Tensor "input_ids"
                use _ = torch.no_grad ()
                use a = Transformer.forward plain ids
                use b = Transformer.forward tl ids
                use la = a.log_softmax(-1L)
                use lb = b.log_softmax(-1L)
                Expect.isLessThan (maxDiff la lb) 1e-4 (name + ": log-softmax unchanged")

        testCase "hf-gpt2-tiny: processed weights have the properties TransformerLens promises" <| fun () ->
            use tl = HuggingFace.loadWith processed (fixture "hf-gpt2-tiny") cpu
            let p = Transformer.parameters tl |> List.map (fun (n, t) -> n, (t :> torch.Tensor)) |> dict
            Expect.isFalse tl.Config.TiedUnembed "the unembedding is untied (folding ln_final changed it, not W_E)"
            for KeyValue(name, t) in p do
                if name.Contains "ln" && name.EndsWith ".weight" then
                    use d = t.sub(sc 1.0)
                    Expect.equal (maxAbs d) 0.0 (name + " is all ones")
                if name.Contains "ln" && name.EndsWith ".bias" then Expect.equal (maxAbs t) 0.0 (name + " is all zeros")
            let meanOver (name: string) (dim: int64) =
                use m = p[name].mean([| dim |])
                maxAbs m
            // writing weights: nn.Linear's [out = d_model, in], embeddings [·, d_model]
            Expect.isLessThan (meanOver "embed.weight" 1L) 1e-6 "W_E centred over d_model"
            Expect.isLessThan (meanOver "pos_embed.weight" 1L) 1e-6 "W_pos centred over d_model"
            for l in 0 .. tl.Config.NLayers - 1 do
                for w in [ "attn.o.weight"; "attn.o.bias"; "mlp.fc_out.weight"; "mlp.fc_out.bias" ] do
                    Expect.isLessThan (meanOver (sprintf "blocks.%d.%s" l w) 0L) 1e-6 (sprintf "layer %d %s centred over d_model" l w)
                // reading weights folded with their LayerNorm are centred over their d_model (input) axis
                for w in [ "attn.q.weight"; "attn.k.weight"; "attn.v.weight"; "mlp.fc_in.weight" ] do
                    Expect.isLessThan (meanOver (sprintf "blocks.%d.%s" l w) 1L) 1e-6 (sprintf "layer %d %s centred over its input" l w)
                Expect.equal (maxAbs p[sprintf "blocks.%d.attn.v.bias" l]) 0.0 (sprintf "layer %d b_V folded into b_O" l)
            Expect.isLessThan (meanOver "unembed.weight" 0L) 1e-6 "W_U centred over the vocabulary"
            Expect.isLessThan (meanOver "unembed.bias" 0L) 1e-6 "b_U centred"

        testCase "hf-gpt2-tiny: hook activations change as documented (ln2 output without the affine map, mlp_out centred)" <| fun () ->
            let dir = fixture "hf-gpt2-tiny"
            use plain = HuggingFace.load dir cpu
            use tl = HuggingFace.loadWith processed dir cpu
            use expected = Safetensors.Reader.Open(Path.Combine(dir, "expected.safetensors"))
            use ids = expected.Tensor "input_ids"
            let names = [ for l in 0 .. plain.Config.NLayers - 1 do yield HookNames.mlpIn l; yield HookNames.mlpOut l; yield HookNames.residMid l ]
            use _ = torch.no_grad ()
            use ra = Transformer.runWithCache plain names ids
            use rb = Transformer.runWithCache tl names ids
            let pa = Transformer.parameters plain |> dict
            for l in 0 .. plain.Config.NLayers - 1 do
                let w, b = pa[sprintf "blocks.%d.ln2.weight" l], pa[sprintf "blocks.%d.ln2.bias" l]
                use bare = ra[HookNames.mlpIn l].sub(b).div(w)
                Expect.isLessThan (maxDiff rb[HookNames.mlpIn l] bare) 1e-4 (sprintf "layer %d: ln2.hook_normalized = (plain − β)/w" l)
                use centred = ra[HookNames.mlpOut l].sub(ra[HookNames.mlpOut l].mean([| -1L |], true))
                Expect.isLessThan (maxDiff rb[HookNames.mlpOut l] centred) 1e-5 (sprintf "layer %d: hook_mlp_out centred over d_model" l)
                use mean = rb[HookNames.residMid l].mean([| -1L |])
                Expect.isLessThan (maxAbs mean) 1e-5 (sprintf "layer %d: the residual stream is centred" l)

        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 8 } "random LayerNorm GPTs with non-trivial LayerNorms: same log-probabilities after processing" <| fun (seed: int) ->
            let rng = System.Random(seed)
            let heads = rng.Next(1, 4)
            let c = { TransformerConfig.gpt2 with DModel = 4 * heads; NHeads = heads; NKvHeads = heads; NLayers = rng.Next(1, 4); DMlp = 12
                                                  NCtx = 16; VocabSize = 23; TiedUnembed = rng.Next 2 = 0 }
            torch.manual_seed (int64 seed) |> ignore
            use m = Transformer.create c cpu
            (use _ = torch.no_grad ()
             for name, p in Transformer.parameters m do
                 if name.Contains "ln" then p.copy_(torch.randn(p.shape).mul(sc 0.5).add(sc (if name.EndsWith ".weight" then 1.0 else 0.0))) |> ignore
                 elif name.EndsWith ".bias" then p.copy_(torch.randn(p.shape).mul(sc 0.1)) |> ignore)
            m.eval ()
            use tl = WeightProcessing.transformerLens m
            use ids = torch.randint(23L, [| 2L; 9L |], dtype = torch.int64)
            use _ = torch.no_grad ()
            use a = Transformer.forward m ids
            use b = Transformer.forward tl ids
            use la = a.log_softmax(-1L)
            use lb = b.log_softmax(-1L)
            Expect.isLessThan (maxDiff la lb) 1e-5 "log-softmax unchanged"

        testCase "RMSNorm models are refused with the reason" <| fun () ->
            let msg = (try (HuggingFace.loadWith processed (fixture "hf-llama-tiny") cpu).Dispose(); "" with e -> e.Message)
            Expect.stringContains msg "LayerNorm" "the reason"
    ]

/// The forward pass frees each block's temporaries when the block ends (`HookPoints.InScope`): gradients, hooks that
/// keep tensors across layers, and the number of tensors alive during a pass.
let scopeTests =
    let live () = DisposeScopeManager.Statistics.ThreadTotalLiveCount
    testList "per-block dispose scopes" [
        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 6 } "a training step's gradients match central differences and a pass that keeps every activation"
        <| fun (seed: int) (kindIndex: uint8) ->
            let c = { randomConfig seed kinds.[int kindIndex % 3] with Dropout = 0.0 }
            use m = randomModel seed c
            m.``to``(torch.float64) |> ignore
            m.train ()
            use scope = torch.NewDisposeScope()
            let tokens = randomTokens seed c.VocabSize 2 (min c.NCtx 6)
            let ps = Transformer.parameters m |> List.map snd
            let gradients (logits: unit -> torch.Tensor) =
                for p in ps do p.grad <- null
                let loss = Transformer.nextTokenLoss (logits ()) tokens
                loss.backward ()
                loss.item<float> (), [ for p in ps -> p.grad.clone() ]
            let loss, grads = gradients (fun () -> Transformer.forward m tokens)
            // identity hooks at every point whose hook does not switch to another kernel: each sees its activation,
            // which then stays alive until the run ends
            let keepAll =
                HookNames.all c
                |> List.filter (fun n -> not (n.EndsWith "hook_scale" || n.EndsWith "hook_attn_scores" || n.EndsWith "hook_pattern"))
                |> List.map (fun n -> n, id)
            let loss2, grads2 = gradients (fun () -> Transformer.runWithHooks m keepAll tokens)
            Expect.equal loss2 loss "same loss"
            List.iteri2 (fun i (a: torch.Tensor) b -> Expect.isTrue (identical a b) (sprintf "parameter %d: same gradient" i)) grads grads2
            // central differences on a few entries of the first and last weight matrices
            use _ = torch.no_grad ()
            let lossAt () = (Transformer.nextTokenLoss (Transformer.forward m tokens) tokens).item<float> ()
            let rng = Random seed
            for pi in [ 0; ps.Length - 1 ] do
                let p, g = ps[pi], grads[pi]
                let flat = p.view(-1L)
                for _ in 1 .. 3 do
                    let k = int64 (rng.Next(int (flat.shape[0])))
                    let x0 = flat[k].item<float> ()
                    let h = 1e-6
                    flat[k].fill_((x0 + h).ToScalar()) |> ignore
                    let up = lossAt ()
                    flat[k].fill_((x0 - h).ToScalar()) |> ignore
                    let down = lossAt ()
                    flat[k].fill_(x0.ToScalar()) |> ignore
                    let numeric = (up - down) / (2.0 * h)
                    let analytic = (g.view(-1L)).[k].item<float> ()
                    Expect.isLessThan (abs (numeric - analytic)) (1e-6 + 1e-5 * abs analytic) (sprintf "parameter %d entry %d: %g vs %g" pi k numeric analytic)

        testCase "with dropout in training mode, a pass that keeps every activation gives the same loss and gradients" <| fun () ->
            let c = { randomConfig 5 GptLike with Dropout = 0.1; NLayers = 3 }
            use m = randomModel 5 c
            m.train ()
            use scope = torch.NewDisposeScope()
            let tokens = randomTokens 5 c.VocabSize 2 (min c.NCtx 6)
            let ps = Transformer.parameters m |> List.map snd
            let gradients (hooks: (string * HookFn) list) =
                for p in ps do p.grad <- null
                Transcoders.Tensors.Device.seed 3L
                let loss = Transformer.nextTokenLoss (Transformer.runWithHooks m hooks tokens) tokens
                loss.backward ()
                loss.item<float32> (), [ for p in ps -> p.grad.clone() ]
            // a hook at the pattern makes the attention explicit in both (dropout on the pattern needs it anyway)
            let pattern = [ "blocks.*.attn.hook_pattern", id ]
            let loss, grads = gradients pattern
            let keepAll = pattern @ [ for n in HookNames.all c do if not (n.EndsWith "hook_scale") then yield n, id ]
            let loss2, grads2 = gradients keepAll
            Expect.equal loss2 loss "same loss"
            List.iteri2 (fun i (a: torch.Tensor) b -> Expect.isTrue (identical a b) (sprintf "parameter %d: same gradient" i)) grads grads2

        testCase "a hook may keep what it saw or made at one layer for a later layer's hook" <| fun () ->
            for kind in kinds do
                let c = { randomConfig 9 kind with NLayers = 3 }
                use m = randomModel 9 c
                use _ = torch.no_grad ()
                use scope = torch.NewDisposeScope()
                let tokens = randomTokens 9 c.VocabSize 2 (min c.NCtx 5)
                let mutable seen : torch.Tensor = null
                let mutable made : torch.Tensor = null
                let mutable escaped : torch.Tensor = null
                let hooks : (string * HookFn) list =
                    [ HookNames.ln2Normalized 0, (fun (x: torch.Tensor) -> seen <- x; made <- x * 2.0; escaped <- x.clone().MoveToOuterDisposeScope(); x)
                      HookNames.mlpOut 2, (fun (y: torch.Tensor) -> y.add(seen).add(made)) ]
                let hooked = Transformer.runWithHooks m hooks tokens
                // the same edit with the layer-0 value taken from a cached run
                use r = Transformer.runWithCache m [ HookNames.ln2Normalized 0 ] tokens
                let x0 = r[HookNames.ln2Normalized 0]
                let twice = x0 * 2.0
                let expected = Transformer.runWithHooks m [ HookNames.mlpOut 2, (fun (y: torch.Tensor) -> y.add(x0).add(twice)) ] tokens
                Expect.isTrue (identical hooked expected) (sprintf "%A: the kept tensors were alive and unchanged" kind)
                Expect.isTrue (identical escaped x0) (sprintf "%A: a tensor a hook moved out of its scope outlives the run" kind)

        testCase "a pass holds one block's temporaries at a time, and leaves only what it returns" <| fun () ->
            for kind in kinds do
                let c = { randomConfig 13 kind with NLayers = 5 }
                use m = randomModel 13 c
                use _ = torch.no_grad ()
                use scope = torch.NewDisposeScope()
                let tokens = randomTokens 13 c.VocabSize 2 (min c.NCtx 6)
                let counts = Array.zeroCreate c.NLayers
                let hooks = [ for l in 0 .. c.NLayers - 1 -> HookNames.residPre l, (fun (x: torch.Tensor) -> counts[l] <- live (); x) ]
                let before = live ()
                let names = [ HookNames.pattern 1; HookNames.mlpIn 3 ]
                (use r = Transformer.run m { RunOptions.Default with Cache = set names; Hooks = hooks } tokens
                 Expect.equal (live ()) (before + int64 (names.Length + 1)) (sprintf "%A: the logits and the cached values" kind)
                 // each hooked stream stays alive (a hook saw it), the two cached values, and nothing else per block
                 let growth = counts[c.NLayers - 1] - counts[0]
                 Expect.isLessThanOrEqual growth (int64 (c.NLayers - 1 + names.Length)) (sprintf "%A: tensors alive at the last block against the first: %d more" kind growth))
                Expect.equal (live ()) before (sprintf "%A: nothing left after disposing the result" kind)
    ]

let tests =
    testList "Models" [
        testList "Hugging Face fixtures" [
            hfActivations "hf-gpt2-tiny"
            hfActivations "hf-llama-tiny"
            hfGreedy "hf-gpt2-tiny"
            hfGreedy "hf-llama-tiny"
            hfActivations "hf-neox-tiny"
            hfActivations "hf-neox-tiny-sequential"
            hfGreedy "hf-neox-tiny"
            hfGreedy "hf-neox-tiny-sequential"
        ]
        stories260KTests
        hookTests
        attentionTests
        kvCacheTests
        validationTests
        tlProcessingTests
        scopeTests
    ]
