/// Generation: greedy and sampled decoding, the sampler's distribution, stop tokens, context limits,
/// sliding windows and hooks while generating.
module Transcoders.Tests.GenerationTests

open System
open Expecto
open TorchSharp
open Transcoders.Models
open Transcoders.Models.Generation
open Transcoders.Tests.Fixtures

let private greedy n = { GenerateOptions.Greedy with MaxNewTokens = n }

/// Greedy continuation computed the slow obvious way: a full forward pass per token, argmax at the end.
let private slowGreedy (m: Transformer) (prompt: int[]) (n: int) (window: int) =
    let tokens = ResizeArray prompt
    for _ in 1 .. n do
        let context = tokens.GetRange(max 0 (tokens.Count - window), min tokens.Count window) |> Seq.map int64 |> Array.ofSeq
        use logits = Transformer.forward m (torch.tensor(context))
        use last = logits.[0L, -1L]
        tokens.Add(int (last.argmax().item<int64> ()))
    tokens.ToArray()

let tests =
    testList "Generation" [
        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 15 } "greedy with the KV cache = greedy without = a forward pass per token"
        <| fun (seed: int) (kindIndex: uint8) ->
            let c = randomConfig seed kinds.[int kindIndex % 3]
            use m = randomModel seed c
            let prompt = [| 0; 1 % c.VocabSize; 2 % c.VocabSize |]
            let n = c.NCtx - prompt.Length
            let cached = generate m (greedy n) prompt
            let uncached = generate m { greedy n with UseKvCache = false } prompt
            Expect.sequenceEqual cached.Tokens uncached.Tokens "cache or not"
            Expect.sequenceEqual cached.Tokens (slowGreedy m prompt n c.NCtx) "slow greedy"
            Expect.equal cached.Tokens.Length c.NCtx "prompt + new tokens"
            Expect.sequenceEqual cached.NewTokens cached.Tokens.[prompt.Length ..] "NewTokens"

        testCase "seeded sampling is reproducible, and the seed matters" <| fun () ->
            let c = { randomConfig 9 GptLike with NCtx = 32; VocabSize = 30 }
            use m = randomModel 9 c
            let sample seed useCache =
                (generate m { greedy 24 with Temperature = 1.5; Seed = Some seed; UseKvCache = useCache } [| 0 |]).Tokens
            Expect.sequenceEqual (sample 1L true) (sample 1L true) "same seed, same tokens"
            Expect.sequenceEqual (sample 1L true) (sample 1L false) "same tokens with or without the KV cache"
            Expect.isGreaterThan ([ 2L .. 5L ] |> List.map (fun s -> sample s true) |> List.distinct |> List.length) 1 "different seeds, different samples"

        testCase "top-k = 1 is greedy at any temperature" <| fun () ->
            let c = randomConfig 12 LlamaLike
            use m = randomModel 12 c
            let g = generate m (greedy 6) [| 1 |]
            for t in [ 0.5; 1.0; 5.0 ] do
                let s = generate m { greedy 6 with Temperature = t; TopK = Some 1; Seed = Some 3L } [| 1 |]
                Expect.sequenceEqual s.Tokens g.Tokens (sprintf "temperature %g" t)

        testCase "the sampler draws from softmax(logits / T) restricted to the top k" <| fun () ->
            // probabilities ∝ 1, 2, 3, 4 at T = 1
            use logits = torch.tensor([| 1.0f; 2.0f; 3.0f; 4.0f |]).log()
            use g = new torch.Generator(7UL, cpu)
            let draws = 8000
            let frequencies opts =
                let counts = Array.zeroCreate 4
                for _ in 1 .. draws do
                    let i = pick opts g logits
                    counts.[i] <- counts.[i] + 1
                counts |> Array.map (fun n -> float n / float draws)
            let close (expected: float[]) (actual: float[]) label =
                // 4.5 standard deviations of a binomial proportion at n = 8000
                Array.iteri2 (fun i e a -> Expect.isLessThan (abs (a - e)) (4.5 * sqrt (e * (1.0 - e) / float draws) + 1e-9) (sprintf "%s: p[%d]" label i)) expected actual
            let t1 = { greedy 1 with Temperature = 1.0 }
            close [| 0.1; 0.2; 0.3; 0.4 |] (frequencies t1) "T = 1"
            // T = 2: probabilities ∝ √1, √2, √3, √4
            let roots = [| 1.0; 2.0; 3.0; 4.0 |] |> Array.map sqrt
            close (roots |> Array.map (fun r -> r / Array.sum roots)) (frequencies { t1 with Temperature = 2.0 }) "T = 2"
            close [| 0.0; 0.0; 3.0 / 7.0; 4.0 / 7.0 |] (frequencies { t1 with TopK = Some 2 }) "top-2"
            Expect.equal (pick (greedy 1) g logits) 3 "greedy picks the largest"

        testCase "generation stops after a stop token" <| fun () ->
            let c = randomConfig 14 GptLike
            use m = randomModel 14 c
            let free = generate m (greedy 8) [| 0 |]
            let stop = free.Tokens.[3]
            let firstAt = Array.IndexOf(free.Tokens, stop, 1)
            let stopped = generate m { greedy 8 with StopTokens = set [ stop ] } [| 0 |]
            Expect.equal stopped.Stop (StopToken stop) "stop reason"
            Expect.sequenceEqual stopped.Tokens free.Tokens.[.. firstAt] "tokens up to and including the stop token"

        testCase "a sliding window continues past n_ctx like a forward pass over the last n_ctx tokens" <| fun () ->
            let c = { randomConfig 15 GptLike with NCtx = 8 }
            use m = randomModel 15 c
            let prompt = [| 0; 1; 2 |]
            let g = generate m { greedy 12 with Overflow = SlidingWindow } prompt
            Expect.equal g.Tokens.Length 15 "prompt + 12"
            Expect.sequenceEqual g.Tokens (slowGreedy m prompt 12 c.NCtx) "window of n_ctx tokens"

        testCase "bad requests fail clearly" <| fun () ->
            let c = { randomConfig 16 GptLike with NCtx = 8 }
            use m = randomModel 16 c
            let fails opts prompt (fragment: string) =
                let ex = Expect.throwsC (fun () -> generate m opts prompt |> ignore) id
                Expect.stringContains ex.Message fragment fragment
            fails (greedy 6) [| 0; 1; 2 |] "exceeds the context length n_ctx = 8"
            fails (greedy 2) [||] "the prompt is empty"
            fails (greedy 2) [| c.VocabSize |] "out of range"
            fails { greedy 2 with Temperature = -1.0 } [| 0 |] "Temperature"
            fails { greedy 2 with TopK = Some 0 } [| 0 |] "TopK"

        testCase "hooks run at every step (with and without the KV cache)" <| fun () ->
            let c = randomConfig 18 LlamaLike
            use m = randomModel 18 c
            // replace the final residual stream by a constant: every step must then predict the same token
            torch.manual_seed 5L |> ignore
            use constant = torch.randn(int64 c.DModel) * 3.0
            let steer = HookNames.lnFinalNormalized, (fun (t: torch.Tensor) -> constant.expand_as(t))
            use logits = Transformer.runWithHooks m [ steer ] (torch.tensor([| 0L |]))
            let target = int (logits.[0L, 0L].argmax().item<int64> ())
            let free = generate m (greedy 5) [| 0 |]
            Expect.notEqual free.NewTokens (Array.create 5 target) "the hook changes what is generated"
            for useCache in [ true; false ] do
                let g = generate m { greedy 5 with Hooks = [ steer ]; UseKvCache = useCache } [| 0 |]
                Expect.sequenceEqual g.NewTokens (Array.create 5 target) (sprintf "steered (KV cache %b)" useCache)
    ]
