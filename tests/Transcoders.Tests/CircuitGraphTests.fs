/// Attribution graphs: the local replacement model reproduces the logits; edge weights equal an explicit Jacobian
/// computed the slow way (one ablation per source node, float64); causal cones change nothing; pruning invariants
/// and influence against a dense reference; memory budget; graph files; interventions against the graph's linear
/// prediction; bad input.
module Transcoders.Tests.CircuitGraphTests

open System
open System.IO
open Expecto
open TorchSharp
open Transcoders.Files
open Transcoders.Models
open Transcoders.Coders
open Transcoders.Circuits
open Transcoders.Tests.Fixtures

let private kindOf (i: uint8) = kinds[int i % 3]

/// max |a − b| / max(1, max |b|), in float64.
let private rel (a: Tensor) (b: Tensor) =
    use a64 = a.to_type(torch.float64)
    use b64 = b.to_type(torch.float64)
    use d = (a64 - b64).abs().max()
    use m = b64.abs().max()
    d.item<float> () / max 1.0 (m.item<float> ())

/// A small random model of `kind` with 1 to 3 layers, in float64 when asked.
let private model (seed: int) (kind: Kind) (float64: bool) =
    let c = { randomConfig seed kind with NLayers = 1 + (seed &&& 0x7fffffff) % 3; Dropout = 0.0 }
    let m = randomModel seed c
    if float64 then m.``to``(torch.float64) |> ignore
    m

/// Coders replacing every MLP: per-layer transcoders and skip transcoders (setup 0) or one cross-layer transcoder
/// over all layers (setup 1), with random activations, widths, input biases and scales.
let private mlpCoders (seed: int) (c: TransformerConfig) (clt: bool) : Coder list =
    let rng = Random(seed * 13 + (if clt then 1 else 0))
    if clt then [ randomCoder seed (coderConfig rng c CrossLayerTranscoder [| 0 .. c.NLayers - 1 |]) ]
    else
        [ for l in 0 .. c.NLayers - 1 ->
              let kind = if rng.Next 3 = 0 then SkipTranscoder else Transcoder
              randomCoder (seed * 31 + l) (coderConfig rng c kind [| l |]) ]

let private disposeAll (coders: Coder list) = for c in coders do (c :> IDisposable).Dispose()

let private promptOf (seed: int) (c: TransformerConfig) (length: int) =
    let rng = Random(seed + 77)
    Array.init (max 1 (min c.NCtx length)) (fun _ -> rng.Next c.VocabSize)

let private fullConfig = { GraphConfig.Default with MaxFeatureNodes = None; BatchSize = 3; MemoryBudgetBytes = None; ZeroPositions = [] }

let private throwsWith<'e when 'e :> exn> (f: unit -> unit) (parts: string list) (what: string) =
    let e = Expect.throwsC f id
    Expect.isTrue (e :? 'e) (sprintf "%s: %s expected, got %s: %s" what typeof<'e>.Name (e.GetType().Name) e.Message)
    for part in parts do Expect.stringContains e.Message part (sprintf "%s: the message names '%s'" what part)

/// The value each target of the graph reads in a local run: pre-activation (encoder direction · MLP input, without
/// bias) for feature targets, de-meaned logit for logit targets.
let private targetValues (lr: LocalReplacement) (g: Graph) (logits: Tensor) (mlpIn: Tensor[]) : float[] =
    let demeaned = Interventions.demeanedLogits logits (g.Logits |> Array.map (fun l -> l.Token))
    [| for f in g.Features do
         use fi = torch.tensor([| int64 f.Feature |])
         use dir = LocalReplacement.encoderDirections lr f.Layer fi
         use v = mlpIn[f.Layer].select(0, int64 f.Position).to_type(torch.float64).dot(dir.select(0, 0L).to_type(torch.float64))
         yield v.item<float> ()
       yield! demeaned |]

/// Edges computed the slow way: for every source node, the change of every target's value when that node alone is
/// removed from the local replacement model (exact, since the model is linear in its nodes). Returns target ids ×
/// source ids in the graph's node numbering.
let private slowEdges (lr: LocalReplacement) (g: Graph) : float[,] =
    let targets = Array.append [| 0 .. g.Features.Length - 1 |] [| g.LogitStart .. g.NodeCount - 1 |]
    let run changes =
        let logits, ins = LocalReplacement.runWith lr changes
        try targetValues lr g logits ins
        finally
            logits.Dispose()
            for t in ins do t.Dispose()
    let clean = run NodeChanges.None
    let a = Array2D.zeroCreate g.NodeCount g.NodeCount
    for s in 0 .. g.LogitStart - 1 do
        let changes =
            match Graph.node g s with
            | GraphNode.Feature f -> { NodeChanges.None with Features = [ f.At, 0.0 ] }
            | GraphNode.Error (l, p) -> { NodeChanges.None with ErrorScales = [ (l, p), 0.0 ] }
            | GraphNode.Token (p, _) -> { NodeChanges.None with EmbeddingScales = [ p, 0.0 ] }
            | GraphNode.Logit _ -> failwith "logits are no sources"
        let ablated = run changes
        targets |> Array.iteri (fun k t -> a[t, s] <- clean[k] - ablated[k])
    a

let localReplacementTests =
    testList "local replacement" [
        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 30 } "reproduces the original logits (float32 ≤ 1e-5; GPT-2-, Llama-, tinymodel-like; transcoders, skip, CLT)"
        <| fun (seed: int) (kindIndex: uint8) (clt: bool) ->
            use scope = torch.NewDisposeScope()
            use m = model seed (kindOf kindIndex) false
            let coders = mlpCoders seed m.Config clt
            try
                let tokens = promptOf seed m.Config (1 + (seed &&& 0xffff) % 12)
                use lr = LocalReplacement.create m coders tokens
                use original = Transformer.forward m (torch.tensor(tokens |> Array.map int64).unsqueeze 0)
                use local = LocalReplacement.forward lr
                let d = rel local original[0L]
                Expect.isLessThanOrEqual d 1e-5 (sprintf "local replacement logits differ by %g" d)
                // the errors are what the coders miss: removing every error moves the logits (unless the coders are exact)
                Expect.equal lr.Errors.Length m.Config.NLayers "one error tensor per layer"
            finally disposeAll coders

        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 15 } "reproduces the original logits in float64 (≤ 1e-10)"
        <| fun (seed: int) (kindIndex: uint8) (clt: bool) ->
            use scope = torch.NewDisposeScope()
            use m = model seed (kindOf kindIndex) true
            let coders = mlpCoders seed m.Config clt
            try
                let tokens = promptOf seed m.Config 7
                use lr = LocalReplacement.create m coders tokens
                use original = Transformer.forward m (torch.tensor(tokens |> Array.map int64).unsqueeze 0)
                use local = LocalReplacement.forward lr
                Expect.equal local.dtype torch.float64 "runs in the model's dtype"
                let d = rel local original[0L]
                Expect.isLessThanOrEqual d 1e-10 (sprintf "local replacement logits differ by %g" d)
            finally disposeAll coders

        test "the residual stream is linear in the nodes: scaling every node by 2 doubles the logits minus biases" {
            use scope = torch.NewDisposeScope()
            use m = model 5 GptLike true
            let coders = mlpCoders 5 m.Config false
            try
                let tokens = promptOf 5 m.Config 6
                use lr = LocalReplacement.create m coders tokens
                let all k =
                    { Features = [ for i in 0 .. lr.Active.Count - 1 -> lr.Active.At i, k * lr.Active.Activation[i] ]
                      ErrorScales = [ for l in 0 .. lr.NLayers - 1 do for p in 0 .. tokens.Length - 1 -> (l, p), k ]
                      EmbeddingScales = [ for p in 0 .. tokens.Length - 1 -> p, k ] }
                let logitsAt k = let l, ins = LocalReplacement.runWith lr (all k) in (for t in ins do t.Dispose()); l
                use l0 = logitsAt 0.0
                use l1 = logitsAt 1.0
                use l2 = logitsAt 2.0
                // affine in the nodes: l(2) − l(1) = l(1) − l(0)
                let d = rel (l2 - l1) (l1 - l0)
                Expect.isLessThanOrEqual d 1e-9 (sprintf "not affine: %g" d)
            finally disposeAll coders
        }
    ]

let edgeTests =
    testList "edges" [
        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 12 } "edge weights = the slow Jacobian (float64, relative error ≤ 1e-4; transcoders, skip, CLT)"
        <| fun (seed: int) (kindIndex: uint8) (clt: bool) ->
            use scope = torch.NewDisposeScope()
            use m = model seed (kindOf kindIndex) true
            let coders = mlpCoders seed m.Config clt
            try
                let tokens = promptOf seed m.Config (2 + (seed &&& 0xffff) % 4)
                use lr = LocalReplacement.create m coders tokens
                let g = AttributionGraph.buildFrom lr fullConfig
                Expect.equal g.Features.Length lr.Active.Count "every active feature is a node"
                let fast = Graph.toDense g
                let slow = slowEdges lr g
                let scale = seq { for t in 0 .. g.NodeCount - 1 do for s in 0 .. g.NodeCount - 1 -> abs slow[t, s] } |> Seq.max
                for t in 0 .. g.NodeCount - 1 do
                    for s in 0 .. g.NodeCount - 1 do
                        let f, e = float fast[t, s], slow[t, s]
                        if abs (f - e) > 1e-4 * abs e + 1e-7 * scale then
                            failtestf "edge %s → %s: graph %g, slow %g" (Graph.label g s) (Graph.label g t) f e
                // the graph is not trivially empty: some feature or token reaches a logit
                Expect.isGreaterThan scale 0.0 "some edge is non-zero"
            finally disposeAll coders

        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 10 } "the causal cone gives the same edges as whole-prompt passes"
        <| fun (seed: int) (kindIndex: uint8) (clt: bool) ->
            use scope = torch.NewDisposeScope()
            use m = model seed (kindOf kindIndex) false
            let coders = mlpCoders seed m.Config clt
            try
                let tokens = promptOf seed m.Config 9
                use lr = LocalReplacement.create m coders tokens
                let cone = AttributionGraph.buildFrom lr fullConfig |> Graph.toDense
                let whole = AttributionGraph.buildFrom lr { fullConfig with CausalCone = false; BatchSize = 5 } |> Graph.toDense
                let scale = whole |> Seq.cast<float32> |> Seq.map abs |> Seq.fold max 0.0f
                for t in 0 .. Array2D.length1 cone - 1 do
                    for s in 0 .. Array2D.length2 cone - 1 do
                        if abs (cone[t, s] - whole[t, s]) > 1e-5f * max 1.0f scale then
                            failtestf "edge %d → %d: cone %g, whole %g" s t cone[t, s] whole[t, s]
            finally disposeAll coders

        test "the influence-ordered cap keeps the most influential features, with logits and every error and token" {
            use scope = torch.NewDisposeScope()
            use m = model 11 LlamaLike false
            let coders = mlpCoders 11 m.Config true
            try
                let tokens = promptOf 11 m.Config 10
                use lr = LocalReplacement.create m coders tokens
                let cap = max 1 (lr.Active.Count / 3)
                let progress = ResizeArray<GraphProgress>()
                let g = AttributionGraph.buildFrom lr { fullConfig with MaxFeatureNodes = Some cap; UpdateInterval = 1; Progress = progress.Add }
                Expect.equal g.Features.Length cap "exactly the cap"
                Expect.equal g.Stats.ActiveFeatures lr.Active.Count "stats count every active feature"
                Expect.equal (g.NodeCount - g.Features.Length - g.Logits.Length) ((m.Config.NLayers + 1) * tokens.Length) "errors and tokens"
                Expect.isTrue (g.Features |> Array.pairwise |> Array.forall (fun (a, b) -> (a.Layer, a.Position, a.Feature) < (b.Layer, b.Position, b.Feature))) "features sorted"
                Expect.isNonEmpty progress "progress is reported"
                Expect.equal (progress |> Seq.last).Done cap "the last report counts every feature row"
                let probs = g.Logits |> Array.sumBy (fun l -> l.Probability)
                Expect.isTrue (probs >= 0.95 || g.Logits.Length = 10) "logits up to 95% probability or 10"
                Expect.isTrue (g.Logits.Length <= 10) "at most 10 logits"
            finally disposeAll coders
        }
    ]

/// Edges of two graphs over the same prompt matched by node identity (features by layer, position and feature,
/// errors, tokens and logits by place): max |a − b| over edges of either, and the nodes only one of them has.
let private compareGraphs (a: Graph) (b: Graph) =
    let key (g: Graph) (id: int) =
        match Graph.node g id with
        | GraphNode.Feature f -> sprintf "f%d.%d.%d" f.Layer f.Position f.Feature
        | GraphNode.Error (l, p) -> sprintf "e%d.%d" l p
        | GraphNode.Token (p, _) -> sprintf "t%d" p
        | GraphNode.Logit l -> sprintf "l%d" l.Token
    let edgesOf (g: Graph) = Graph.edges g |> Seq.map (fun (t, s, w) -> (key g t, key g s), float w) |> dict
    let nodesOf (g: Graph) = Set.ofSeq (seq { for i in 0 .. g.NodeCount - 1 -> key g i })
    let ea, eb = edgesOf a, edgesOf b
    let diff =
        Seq.append ea.Keys eb.Keys |> Seq.distinct
        |> Seq.map (fun k -> abs ((match ea.TryGetValue k with | true, v -> v | _ -> 0.0) - (match eb.TryGetValue k with | true, v -> v | _ -> 0.0)))
        |> Seq.fold max 0.0
    let scale = Seq.append ea.Values eb.Values |> Seq.map abs |> Seq.fold max 0.0
    diff, scale, Set.difference (nodesOf a) (nodesOf b), Set.difference (nodesOf b) (nodesOf a)

let engineTests =
    testList "explicit engine" [
        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 40 } "= the autograd engine on random models, prompts, batches, zeroed positions, cones and caps (float64: ≤ 1e-6 of the largest edge; float32: ≤ 1e-4)"
        <| fun (seed: int) (kindIndex: uint8) (clt: bool) (f64: bool) (batch: byte) (zero: byte) (cone: bool) (capped: bool) ->
            use scope = torch.NewDisposeScope()
            use m = model seed (kindOf kindIndex) f64
            let coders = mlpCoders seed m.Config clt
            try
                let tokens = promptOf seed m.Config (1 + (seed &&& 0xffff) % 12)
                use lr = LocalReplacement.create m coders tokens
                let zeros = [ for p in 0 .. tokens.Length - 1 do if (int zero >>> (p % 8)) &&& 1 = 1 then yield p ] |> List.truncate 3
                let cap = if capped && lr.Active.Count > 2 then Some (max 1 (lr.Active.Count / 2)) else None
                let config =
                    { fullConfig with BatchSize = 1 + int batch % 7; ZeroPositions = zeros; CausalCone = cone
                                      MaxFeatureNodes = cap; UpdateInterval = 1 }
                let fast = AttributionGraph.buildFrom lr config
                let slow = AttributionGraph.buildFrom lr { config with Engine = GraphEngine.Autograd }
                let diff, scale, onlyFast, onlySlow = compareGraphs fast slow
                Expect.isEmpty onlyFast (sprintf "nodes only the explicit engine has: %A" onlyFast)
                Expect.isEmpty onlySlow (sprintf "nodes only the autograd engine has: %A" onlySlow)
                let tol = if f64 then 1e-6 else 1e-4
                Expect.isLessThanOrEqual diff (tol * max scale 1e-12) (sprintf "edges differ by %g (largest edge %g)" diff scale)
                Expect.equal (fast.Features |> Array.map (fun f -> f.Layer, f.Position, f.Feature)) (slow.Features |> Array.map (fun f -> f.Layer, f.Position, f.Feature)) "same feature nodes in the same order"
            finally disposeAll coders

        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 15 } "zeroed positions: no feature nodes there, their error nodes have no edges, every other edge unchanged"
        <| fun (seed: int) (kindIndex: uint8) (clt: bool) (zero: byte) ->
            use scope = torch.NewDisposeScope()
            use m = model seed (kindOf kindIndex) true
            let coders = mlpCoders seed m.Config clt
            try
                let tokens = promptOf seed m.Config (2 + (seed &&& 0xffff) % 8)
                use lr = LocalReplacement.create m coders tokens
                let zeros = 0 :: [ for p in 1 .. tokens.Length - 1 do if (int zero >>> (p % 8)) &&& 1 = 1 then yield p ]
                let all = AttributionGraph.buildFrom lr fullConfig
                let zeroed = AttributionGraph.buildFrom lr { fullConfig with ZeroPositions = zeros }
                for f in zeroed.Features do
                    Expect.isFalse (List.contains f.Position zeros) (sprintf "feature at zeroed position %d" f.Position)
                Expect.equal zeroed.Features.Length (all.Features |> Array.filter (fun f -> not (List.contains f.Position zeros)) |> Array.length) "every other feature stays"
                for t, s, w in Graph.edges zeroed do
                    match Graph.node zeroed s with
                    | GraphNode.Error (_, p) when List.contains p zeros -> failtestf "error node at zeroed position %d has an edge (%g)" p w
                    | _ -> ()
                // every edge between nodes both graphs have is the same
                let index = Graph.featureIndex all
                let toAll (id: int) =
                    match Graph.node zeroed id with
                    | GraphNode.Feature f -> index[f.At]
                    | GraphNode.Error (l, p) -> Graph.errorNode all l p
                    | GraphNode.Token (p, _) -> Graph.tokenNode all p
                    | GraphNode.Logit _ -> all.LogitStart + (id - zeroed.LogitStart)
                for t, s, w in Graph.edges zeroed do
                    let e = Graph.edge all (toAll t) (toAll s)
                    if abs (float (w - e)) > 1e-6 * max 1.0 (abs (float e)) then failtestf "edge %s → %s: %g zeroed, %g not" (Graph.label zeroed s) (Graph.label zeroed t) w e
            finally disposeAll coders

        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 10 } "prompts built in a batch = each built alone (zeroed position 0 by default)"
        <| fun (seed: int) (kindIndex: uint8) (clt: bool) (count: byte) ->
            use scope = torch.NewDisposeScope()
            use m = model seed (kindOf kindIndex) false
            let coders = mlpCoders seed m.Config clt
            try
                let prompts = Array.init (2 + int count % 3) (fun i -> promptOf (seed + 31 * i) m.Config (1 + (seed + 7 * i &&& 0xffff) % 10))
                let config = { fullConfig with ZeroPositions = GraphConfig.Default.ZeroPositions }
                let many = AttributionGraph.buildMany m coders prompts config
                Expect.equal many.Length prompts.Length "one graph per prompt"
                for i in 0 .. prompts.Length - 1 do
                    let alone = AttributionGraph.build m coders prompts[i] config
                    Expect.equal many[i].Tokens prompts[i] "the graph's prompt"
                    Expect.isTrue (many[i].Features |> Array.forall (fun f -> f.Position <> 0)) "no features at position 0"
                    let diff, scale, onlyMany, onlyAlone = compareGraphs many[i] alone
                    Expect.isEmpty onlyMany (sprintf "prompt %d: nodes only in the batch: %A" i onlyMany)
                    Expect.isEmpty onlyAlone (sprintf "prompt %d: nodes only alone: %A" i onlyAlone)
                    Expect.isLessThanOrEqual diff (1e-5 * max scale 1e-12) (sprintf "prompt %d: edges differ by %g (largest %g)" i diff scale)
            finally disposeAll coders

        test "bf16 backward: same nodes, edges within 5e-2 of the largest (measured ~1e-2 and below on random models)" {
            use scope = torch.NewDisposeScope()
            use m = model 12 GptLike false
            let coders = mlpCoders 12 m.Config false
            try
                let tokens = promptOf 12 m.Config 10
                use lr = LocalReplacement.create m coders tokens
                let g32 = AttributionGraph.buildFrom lr fullConfig
                let g16 = AttributionGraph.buildFrom lr { fullConfig with BackwardDType = Some torch.bfloat16 }
                let diff, scale, a, b = compareGraphs g16 g32
                Expect.isEmpty a "same nodes"
                Expect.isEmpty b "same nodes"
                Expect.isGreaterThan diff 0.0 "bf16 does change the weights"
                Expect.isLessThanOrEqual diff (5e-2 * scale) (sprintf "bf16 error %g of the largest edge" (diff / scale))
            finally disposeAll coders
        }

        test "BatchSize 0 chooses the largest batch whose estimate fits the budget; the edges do not depend on it" {
            use scope = torch.NewDisposeScope()
            use m = model 13 LlamaLike false
            let coders = mlpCoders 13 m.Config true
            try
                let tokens = promptOf 13 m.Config 12
                use lr = LocalReplacement.create m coders tokens
                let at b = (AttributionGraph.estimateFor lr { fullConfig with BatchSize = b }).TotalBytes
                let budget = (at 5 + at 6) / 2L
                let config = { fullConfig with BatchSize = 0; MemoryBudgetBytes = Some budget }
                let g = AttributionGraph.buildFrom lr config
                Expect.equal g.Settings.BatchSize 5 "the largest batch within the budget"
                Expect.equal (AttributionGraph.estimateFor lr config).TotalBytes (at 5) "estimateFor uses the chosen batch"
                let fixedBatch = AttributionGraph.buildFrom lr { fullConfig with BatchSize = 2 }
                let diff, scale, _, _ = compareGraphs g fixedBatch
                Expect.isLessThanOrEqual diff (1e-5 * scale) "same edges"
                Expect.throwsT<ArgumentException> (fun () -> AttributionGraph.buildFrom lr { fullConfig with BatchSize = 0; MemoryBudgetBytes = None } |> ignore) "BatchSize 0 needs a budget"
            finally disposeAll coders
        }

        test "a build leaves no tensor alive (nothing left to finalizers)" {
            use m = model 14 GptLike false
            let coders = mlpCoders 14 m.Config true
            try
                let tokens = promptOf 14 m.Config 9
                let live () = DisposeScopeManager.Statistics.ThreadTotalLiveCount
                let start = live ()
                (LocalReplacement.create m coders tokens :> IDisposable).Dispose()
                Expect.equal (live ()) start "tensors alive after creating and disposing a local replacement model"
                use lr = LocalReplacement.create m coders tokens
                let before = live ()
                for config in [ fullConfig; { fullConfig with MaxFeatureNodes = Some 3; UpdateInterval = 1; ZeroPositions = [ 0 ] }
                                { fullConfig with BackwardDType = Some torch.bfloat16 } ] do
                    let g = AttributionGraph.buildFrom lr config
                    Pruning.prune PruneConfig.Default g |> ignore
                    Pruning.scores g torch.CPU |> ignore
                    Expect.equal (live ()) before (sprintf "tensors alive after building and pruning (%A, cap %A)" config.BackwardDType config.MaxFeatureNodes)
            finally disposeAll coders
        }
    ]

/// w·(Â + Â² + …) on a dense matrix, the obvious way.
let private denseInfluence (a: float32[,]) (w: float[]) =
    let n = w.Length
    let norm = Array2D.init n n (fun i j -> float (abs a[i, j]))
    for i in 0 .. n - 1 do
        let s = Seq.sum (seq { for j in 0 .. n - 1 -> norm[i, j] })
        if s > 0.0 then for j in 0 .. n - 1 do norm[i, j] <- norm[i, j] / max s 1e-10
    let total = Array.zeroCreate n
    let mutable prod = Array.copy w
    for _ in 0 .. n do
        let next = Array.init n (fun j -> Seq.sum (seq { for i in 0 .. n - 1 -> prod[i] * norm[i, j] }))
        for j in 0 .. n - 1 do total[j] <- total[j] + next[j]
        prod <- next
    total, norm

let private smallGraph (seed: int) (kindIndex: uint8) (clt: bool) =
    use m = model seed (kindOf kindIndex) false
    let coders = mlpCoders seed m.Config clt
    try
        let tokens = promptOf seed m.Config (3 + (seed &&& 0xffff) % 6)
        AttributionGraph.build m coders tokens fullConfig
    finally disposeAll coders

let pruningTests =
    testList "pruning" [
        testProperty "the threshold keeps the fewest top scores reaching the fraction (as a full sort would)"
        <| fun (values: int list) (cuts: byte) (fraction: byte) ->
            let xs = values |> List.map (fun v -> float32 (abs (int64 v) % 100000L) / 7.0f) |> Array.ofList
            let frac = float fraction / 255.0
            let pieces =
                let k = 1 + int cuts % 4
                [| for i in 0 .. k - 1 -> xs[i * xs.Length / k .. (i + 1) * xs.Length / k - 1] |]
            let tensors = pieces |> Array.map (fun p -> torch.tensor(p))
            try
                let t = Pruning.threshold tensors frac
                let sorted = xs |> Array.filter (fun x -> x > 0.0f) |> Array.sortDescending
                if sorted.Length = 0 then Expect.equal t Single.PositiveInfinity "nothing to keep"
                else
                    let total = sorted |> Array.sumBy float
                    let mutable acc, k = 0.0, 0
                    while k < sorted.Length - 1 && acc + float sorted[k] < frac * total do
                        acc <- acc + float sorted[k]
                        k <- k + 1
                    Expect.equal t sorted[k] (sprintf "threshold for %g of %A" frac sorted)
            finally for t in tensors do t.Dispose()

        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 12 } "node influence and scores equal a dense reference"
        <| fun (seed: int) (kindIndex: uint8) (clt: bool) ->
            let g = smallGraph seed kindIndex clt
            let dense = Graph.toDense g
            let w = Array.init g.NodeCount (fun i -> if i >= g.LogitStart then g.Logits[i - g.LogitStart].Probability else 0.0)
            let reference, norm = denseInfluence dense w
            let infl = Pruning.nodeInfluence g torch.CPU
            for i in 0 .. g.NodeCount - 1 do
                Expect.floatClose { absolute = 1e-7; relative = 1e-4 } infl[i] reference[i] (sprintf "influence of %s" (Graph.label g i))
            let s = Pruning.scores g torch.CPU
            let sumOver a b (xs: float[]) = xs[a .. b - 1] |> Array.sum
            let tokens, errors = sumOver g.TokenStart g.LogitStart reference, sumOver g.ErrorStart g.TokenStart reference
            Expect.floatClose { absolute = 1e-7; relative = 1e-4 } s.Replacement (tokens / (tokens + errors)) "replacement score"
            let output = Array.init g.NodeCount (fun i -> reference[i] + w[i])
            let nonError i = 1.0 - Seq.sum (seq { for j in g.ErrorStart .. g.TokenStart - 1 -> norm[i, j] })
            let completeness = (Seq.sum (seq { for i in 0 .. g.NodeCount - 1 -> nonError i * output[i] })) / Array.sum output
            Expect.floatClose { absolute = 1e-7; relative = 1e-4 } s.Completeness completeness "completeness score"
            Expect.isTrue (s.Replacement >= 0.0 && s.Replacement <= 1.0 && s.Completeness >= 0.0 && s.Completeness <= 1.0) "scores in [0, 1]"

        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 12 } "invariants: tokens and logits kept, kept nodes above the node threshold, edges between kept nodes, no dangling features"
        <| fun (seed: int) (kindIndex: uint8) (clt: bool) (nodeT: byte) (edgeT: byte) ->
            let g = smallGraph seed kindIndex clt
            let config = { PruneConfig.Default with NodeThreshold = 0.5 + float nodeT / 512.0; EdgeThreshold = 0.7 + float edgeT / 900.0 }
            let pr = Pruning.prune config g
            for i in g.TokenStart .. g.NodeCount - 1 do Expect.isTrue pr.NodeMask[i] (sprintf "%s is kept" (Graph.label g i))
            // the node threshold: every kept feature or error is among the nodes whose cumulative influence first reaches it
            let cutoff = pr.CumulativeInfluence |> Array.filter (fun c -> c >= config.NodeThreshold - 1e-12) |> Array.append [| 1.0 |] |> Array.min
            for i in 0 .. g.TokenStart - 1 do
                if pr.NodeMask[i] then
                    Expect.isLessThanOrEqual pr.CumulativeInfluence[i] (cutoff + 1e-9) (sprintf "%s kept below the node threshold" (Graph.label g i))
            for e in pr.Edges do
                Expect.isTrue (pr.NodeMask[e.Target] && pr.NodeMask[e.Source]) (sprintf "edge %d → %d joins kept nodes" e.Source e.Target)
                Expect.equal e.Weight (Graph.edge g e.Target e.Source) "kept edges keep their weights"
            for i in 0 .. g.TokenStart - 1 do
                if pr.NodeMask[i] then
                    Expect.isTrue (pr.Edges |> Array.exists (fun e -> e.Source = i)) (sprintf "kept %s has an outgoing edge" (Graph.label g i))
                    if i < g.Features.Length then
                        Expect.isTrue (pr.Edges |> Array.exists (fun e -> e.Target = i)) (sprintf "kept %s has an incoming edge" (Graph.label g i))
            // with thresholds of 1 nothing of influence is dropped; with 0 no feature survives
            let all = Pruning.prune { config with NodeThreshold = 1.0; EdgeThreshold = 1.0 } g
            Expect.isGreaterThanOrEqual (Array.length all.Edges) pr.Edges.Length "thresholds of 1 keep at least as many edges"
    ]

let memoryTests =
    testList "memory" [
        test "the estimate grows with the prompt and the build refuses beyond the budget" {
            let c = { TransformerConfig.gpt2 with NLayers = 2; DModel = 64; NHeads = 4; NKvHeads = 4; DMlp = 128; VocabSize = 100 }
            let est n = AttributionGraph.estimateMemory c 4 n (int64 n * 20L) 5 GraphConfig.Default
            Expect.isLessThan (est 16).TotalBytes (est 64).TotalBytes "more tokens, more memory"
            Expect.isLessThan (est 64).TotalBytes (est 256).TotalBytes "more tokens, more memory"
            let e = est 64
            Expect.equal e.TotalBytes (e.CleanRunBytes + e.BatchBytes + e.AdjacencyBytes) "total is the sum"
            use m = model 3 GptLike false
            let coders = mlpCoders 3 m.Config false
            try
                let tokens = promptOf 3 m.Config 8
                throwsWith<InvalidOperationException> (fun () -> AttributionGraph.build m coders tokens { GraphConfig.Default with MemoryBudgetBytes = Some 1000L } |> ignore)
                    [ "memory budget"; "MemoryBudgetBytes" ] "budget"
                let g = AttributionGraph.build m coders tokens { GraphConfig.Default with MemoryBudgetBytes = Some (1L <<< 30) }
                Expect.isGreaterThan g.Stats.EstimatedBytes 0L "the estimate is recorded"
            finally disposeAll coders
        }
    ]

let estimateTests =
    testList "memory estimate" [
        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 200 } "the estimate is the sum of its parts, within its bound, and grows with tokens, active features and batch"
        <| fun (tokens: uint16) (active: uint16) (logits: uint8) (batch: uint8) (cap: uint16 option) (bf16: bool) ->
            let c = { TransformerConfig.gpt2 with NLayers = 3; DModel = 64; NHeads = 4; NKvHeads = 4; DMlp = 256; VocabSize = 500 }
            let n, a, k, b = 1 + int tokens % 2048, int64 active, 1 + int logits % 16, 1 + int batch
            let config =
                { GraphConfig.Default with
                    MaxFeatureNodes = cap |> Option.map int; BatchSize = b
                    BackwardDType = (if bf16 then Some torch.bfloat16 else None) }
            let est n a b = AttributionGraph.estimateMemory c 4 n a k { config with BatchSize = b }
            let e = est n a b
            Expect.equal e.TotalBytes (e.CleanRunBytes + e.BatchBytes + e.AdjacencyBytes) "total is the sum of the parts"
            Expect.isGreaterThan e.CleanRunBytes 0L "the clean run costs something"
            Expect.isLessThanOrEqual e.TotalBytes e.BoundBytes "the estimate is within its bound"
            Expect.isLessThanOrEqual e.TotalBytes (est (n + 1) a b).TotalBytes "monotone in tokens"
            Expect.isLessThanOrEqual e.TotalBytes (est n (a + 1L) b).TotalBytes "monotone in active features"
            Expect.isLessThanOrEqual e.TotalBytes (est n a (b + 1)).TotalBytes "monotone in batch"
            Expect.isLessThan e.TotalBytes (est (n + 64) a b).TotalBytes "strictly more for many more tokens"

        test "after the clean run: expected within the bound (equal without a binding cap), monotone in batch when capped, and not below the blocks the build holds" {
            use scope = torch.NewDisposeScope()
            use m = model 21 GptLike false
            let coders = mlpCoders 21 m.Config false
            try
                let tokens = promptOf 21 m.Config 12
                use lr = LocalReplacement.create m coders tokens
                let nActive = lr.Active.Count
                // fixed logit targets: the estimate counts MaxLogits rows, the build the likely tokens it picks
                let uncapped = { fullConfig with ZeroPositions = [ 0 ]; LogitTokens = Some [| 1; 2; 3 |] }
                let capped = { uncapped with MaxFeatureNodes = Some (max 1 (nActive / 3)) }
                for config in [ uncapped; capped ] do
                    let sizes = [ 1; 2; 3; 8 ] |> List.map (fun b -> AttributionGraph.estimateFor lr { config with BatchSize = b })
                    for e in sizes do
                        Expect.equal e.TotalBytes (e.CleanRunBytes + e.BatchBytes + e.AdjacencyBytes) "total is the sum"
                        Expect.isLessThanOrEqual e.TotalBytes e.BoundBytes "within the bound"
                    // (uncapped, the exact cones depend on how the batches split the positions, not monotonically)
                    if config.MaxFeatureNodes.IsSome then
                        sizes |> List.pairwise |> List.iter (fun (x, y) -> Expect.isLessThanOrEqual x.TotalBytes y.TotalBytes "monotone in batch")
                let eu = AttributionGraph.estimateFor lr uncapped
                Expect.equal eu.TotalBytes eu.BoundBytes "no cap: the expected is the bound"
                let ec = AttributionGraph.estimateFor lr capped
                Expect.isLessThan ec.TotalBytes ec.BoundBytes "a binding cap: the expected is below the bound"
                Expect.isLessThan ec.AdjacencyBytes eu.AdjacencyBytes "fewer rows, less adjacency"
                // uncapped, every block is kept: the build holds its float32 blocks and the graph's copy of them
                let g = AttributionGraph.buildFrom lr uncapped
                let weights = g.Blocks |> Array.sumBy (fun b -> int64 b.Weights.Length)
                Expect.isGreaterThanOrEqual eu.AdjacencyBytes (8L * weights) "the adjacency part covers the blocks and their copy"
                Expect.equal g.Stats.EstimatedBytes eu.TotalBytes "the build records the estimate"
                // capped, whichever rows the ranking picks, the bound covers their blocks and copies
                let gc = AttributionGraph.buildFrom lr capped
                let weightsC = gc.Blocks |> Array.sumBy (fun b -> int64 b.Weights.Length)
                Expect.isGreaterThanOrEqual (ec.BoundBytes - ec.CleanRunBytes - ec.BatchBytes) (8L * weightsC) "the bound covers the capped blocks"
            finally disposeAll coders
        }
    ]

let private tempFile () = Path.Combine(Path.GetTempPath(), sprintf "graph-%s.safetensors" (Guid.NewGuid().ToString "N"))

let fileTests =
    testList "graph files" [
        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 8 } "save then load gives the same graph, scores and description"
        <| fun (seed: int) (kindIndex: uint8) (clt: bool) ->
            let g = { smallGraph seed kindIndex clt with TokenStrings = [||] }
            let g = { g with TokenStrings = g.Tokens |> Array.map (sprintf "tok%d\"é") }
            let path = tempFile ()
            try
                let info = { Scores = Some (Pruning.scores g torch.CPU); Description = Map.ofList [ "model", "random"; "prompt", "a b c" ] }
                GraphFile.saveWith path info g
                let g2, info2 = GraphFile.loadWith path
                Expect.equal g2 g "the graph round-trips"
                Expect.equal info2 info "scores and description round-trip"
            finally if File.Exists path then File.Delete path

        test "corrupted files are refused with clear errors" {
            let g = smallGraph 21 0uy false
            let path = tempFile ()
            try
                GraphFile.save path g
                let bytes = File.ReadAllBytes path
                // truncated data
                File.WriteAllBytes(path, bytes[.. bytes.Length - 5])
                let e = Expect.throwsC (fun () -> GraphFile.load path |> ignore) id
                Expect.stringContains e.Message path "a damaged container names the file"
                // rewrite with tampered pieces
                GraphFile.save (path + ".ok") g
                use reader = Safetensors.Reader.Open(path + ".ok")
                let tensors = [ for e in reader.Entries -> e.Name, reader.Tensor e.Name ]
                let meta = reader.Metadata
                let write (meta: Map<string, string>) (tensors: (string * Tensor) list) = Safetensors.save path meta tensors
                write (meta.Add("format", "transcoders.coder")) tensors
                throwsWith<GraphFileError> (fun () -> GraphFile.load path |> ignore) [ "not an attribution graph"; path ] "wrong format"
                write (meta.Add("version", "99")) tensors
                throwsWith<GraphFileError> (fun () -> GraphFile.load path |> ignore) [ "version 99" ] "future version"
                write (meta.Add("graph", "{not json")) tensors
                throwsWith<GraphFileError> (fun () -> GraphFile.load path |> ignore) [ "not a JSON object" ] "bad JSON"
                write (meta.Add("graph", meta["graph"].Replace("\"n_layers\":", "\"layers\":"))) tensors
                throwsWith<GraphFileError> (fun () -> GraphFile.load path |> ignore) [ "n_layers" ] "missing field"
                let withTensor name (t: Tensor) = tensors |> List.map (fun (n, x) -> if n = name then n, t else n, x)
                write meta (tensors |> List.filter (fun (n, _) -> n <> "adjacency.weights"))
                throwsWith<GraphFileError> (fun () -> GraphFile.load path |> ignore) [ "adjacency.weights"; "missing" ] "missing tensor"
                use shorter = (snd (tensors |> List.find (fun (n, _) -> n = "adjacency.weights"))).narrow(0, 0L, 1L).clone()
                write meta (withTensor "adjacency.weights" shorter)
                throwsWith<GraphFileError> (fun () -> GraphFile.load path |> ignore) [ "adjacency.weights holds 1" ] "inconsistent sizes"
                use badIds = (snd (tensors |> List.find (fun (n, _) -> n = "adjacency.sources"))).clone().fill_(Scalar.op_Implicit (int64 g.NodeCount + 5L))
                write meta (withTensor "adjacency.sources" badIds)
                throwsWith<GraphFileError> (fun () -> GraphFile.load path |> ignore) [ "adjacency.sources"; "outside" ] "node ids out of range"
                use asFloat = (snd (tensors |> List.find (fun (n, _) -> n = "adjacency.targets"))).to_type(torch.float32)
                write meta (withTensor "adjacency.targets" asFloat)
                throwsWith<GraphFileError> (fun () -> GraphFile.load path |> ignore) [ "adjacency.targets"; "dtype" ] "wrong dtype"
                // block sizes whose sums or products overflow int64: a clear error, not a bare OverflowException
                let blocks = (snd (tensors |> List.find (fun (n, _) -> n = "adjacency.block_targets"))).shape.[0]
                for sizes in [ Array.init (int blocks) (fun i -> if i = 0 then Int64.MaxValue else 1L); Array.create (int blocks) (1L <<< 62)
                               Array.init (int blocks) (fun i -> if i = 0 then 1L <<< 40 else 0L) ] do
                    use huge = torch.tensor(sizes)
                    for name in [ "adjacency.block_targets"; "adjacency.block_sources" ] do
                        write meta (withTensor name huge)
                        throwsWith<GraphFileError> (fun () -> GraphFile.load path |> ignore) [ path; name; "more than the" ] (sprintf "%s = %A" name sizes)
                // prompt tokens are ids: never negative
                write (meta.Add("graph", meta["graph"].Replace(sprintf "\"tokens\":[%d," g.Tokens[0], "\"tokens\":[-3,"))) tensors
                throwsWith<GraphFileError> (fun () -> GraphFile.load path |> ignore) [ path; "tokens[0]"; "negative token id -3" ] "negative token"
                // scores and description of the wrong kind are refused, not dropped
                write (meta.Add("graph", meta["graph"].Replace("\"description\":{}", "\"description\":5"))) tensors
                throwsWith<GraphFileError> (fun () -> GraphFile.load path |> ignore) [ path; "description must be an object" ] "description"
                for _, t in tensors do t.Dispose()
                throwsWith<GraphFileError> (fun () -> GraphFile.load (path + ".missing") |> ignore) [ "no such file" ] "missing file"
            finally
                for p in [ path; path + ".ok" ] do if File.Exists p then File.Delete p
        }
    ]

let interventionTests =
    testList "interventions" [
        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 10 } "constrained changes of the logits = the graph's linear prediction (single feature; set, scale, ablate)"
        <| fun (seed: int) (kindIndex: uint8) (clt: bool) (action: byte) ->
            use scope = torch.NewDisposeScope()
            use m = model seed (kindOf kindIndex) true
            let coders = mlpCoders seed m.Config clt
            try
                let tokens = promptOf seed m.Config 6
                use lr = LocalReplacement.create m coders tokens
                let g = AttributionGraph.buildFrom lr fullConfig
                if g.Features.Length > 0 then
                    let f = g.Features[(seed &&& 0xffff) % g.Features.Length]
                    let act = match action % 3uy with 0uy -> SetTo (f.Activation * 2.5 + 0.3) | 1uy -> ScaleBy -1.5 | _ -> Ablate
                    let iv = ({ Layer = f.Layer; Feature = f.Feature; Position = At f.Position; Action = act } : FeatureIntervention)
                    let cmp = Interventions.compareWithGraph lr g [ iv ]
                    Expect.equal cmp.Length g.Logits.Length "one comparison per logit"
                    for c in cmp do
                        Expect.floatClose { absolute = 1e-9; relative = 1e-6 } c.Constrained c.Predicted (sprintf "logit %d: predicted %g, measured %g" c.Token c.Predicted c.Constrained)
                        Expect.isTrue (Double.IsFinite c.Free) "the free effect is a number"
            finally disposeAll coders

        test "free interventions: none reproduces the original logits; ablating every feature changes them; generation steers" {
            use scope = torch.NewDisposeScope()
            use m = model 4 TinyLike false
            let coders = mlpCoders 4 m.Config false
            try
                let tokens = promptOf 4 m.Config (m.Config.NCtx - 3)
                use original = Transformer.forward m (torch.tensor(tokens |> Array.map int64).unsqueeze 0)
                use none = Interventions.free m coders tokens []
                Expect.isLessThanOrEqual (rel none original[0L]) 1e-5 "no intervention: the original logits"
                let ablateAll = [ for l in 0 .. m.Config.NLayers - 1 do for f in 0 .. coders[l].Config.DSae - 1 -> ({ Layer = l; Feature = f; Position = From 0; Action = Ablate } : FeatureIntervention) ]
                use ablated = Interventions.free m coders tokens ablateAll
                Expect.isGreaterThan (rel ablated original[0L]) 1e-6 "ablating every feature changes the logits"
                let opts = { Generation.GenerateOptions.Greedy with MaxNewTokens = 3 }
                let plain = Interventions.generate m coders opts tokens []
                Expect.equal plain.Tokens (Generation.greedy m 3 tokens) "no intervention: the model's own greedy tokens"
                let steered = Interventions.generate m coders opts tokens [ ({ Layer = 0; Feature = 0; Position = From 0; Action = SetTo 50.0 } : FeatureIntervention) ]
                Expect.equal steered.Tokens.Length (tokens.Length + 3) "three new tokens"
                // the steered continuation is what the free logits say, step by step
                use first = Interventions.free m coders tokens [ ({ Layer = 0; Feature = 0; Position = From 0; Action = SetTo 50.0 } : FeatureIntervention) ]
                Expect.equal steered.Tokens[tokens.Length] (int (first[-1L].argmax().item<int64> ())) "the first steered token is the free argmax"
            finally disposeAll coders
        }
    ]

let badInputTests =
    testList "bad input" [
        test "long, empty and out-of-vocabulary prompts, bad targets and coders that do not fit are refused clearly" {
            use m = model 8 GptLike false
            let c = m.Config
            let coders = mlpCoders 8 c false
            try
                let build tokens config = fun () -> AttributionGraph.build m coders tokens config |> ignore
                throwsWith<ArgumentException> (build (Array.zeroCreate (c.NCtx + 1)) fullConfig) [ "context length"; string c.NCtx ] "too long"
                throwsWith<ArgumentException> (build [||] fullConfig) [ "empty" ] "empty"
                throwsWith<ArgumentException> (build [| 0; c.VocabSize |] fullConfig) [ "outside the vocabulary"; "position 1" ] "token out of vocabulary"
                throwsWith<ArgumentException> (build [| 0; 1 |] { fullConfig with LogitTokens = Some [| c.VocabSize + 3 |] }) [ "target token"; "vocabulary" ] "target out of vocabulary"
                throwsWith<ArgumentException> (build [| 0; 1 |] { fullConfig with BatchSize = 0 }) [ "BatchSize" ] "bad config"
                // coders that do not fit
                throwsWith<ArgumentException> (fun () -> AttributionGraph.build m (List.tail coders) [| 0 |] fullConfig |> ignore) [ "layer 0"; "no coder" ] "a layer without a coder"
                use wide = randomCoder 1 (CoderConfig.transcoder "x" 0 (c.DModel + 1) 4)
                throwsWith<ArgumentException> (fun () -> AttributionGraph.build m (wide :: List.tail coders) [| 0 |] fullConfig |> ignore) [ "d_model" ] "wrong width"
                use sae = randomCoder 2 (CoderConfig.sae "x" (HookNames.mlpOut 0) 0 c.DModel 4)
                throwsWith<ArgumentException> (fun () -> AttributionGraph.build m (sae :: coders) [| 0 |] fullConfig |> ignore) [ "SAE" ] "an SAE"
                use late = randomCoder 3 (CoderConfig.transcoder "x" (c.NLayers + 2) c.DModel 4)
                throwsWith<ArgumentException> (fun () -> AttributionGraph.build m (late :: coders) [| 0 |] fullConfig |> ignore) [ "layer"; string (c.NLayers + 2) ] "a layer the model lacks"
                throwsWith<ArgumentException> (fun () -> AttributionGraph.build m (coders @ [ coders.Head ]) [| 0 |] fullConfig |> ignore) [ "two coders" ] "two coders for one MLP"
                use lr = LocalReplacement.create m coders [| 0; 1 |]
                throwsWith<ArgumentException> (fun () -> Interventions.constrained lr [ ({ Layer = 0; Feature = 0; Position = At 5; Action = Ablate } : FeatureIntervention) ] |> ignore) [ "position 5" ] "intervention beyond the prompt"
                throwsWith<ArgumentException> (fun () -> Interventions.constrained lr [ ({ Layer = 0; Feature = 10_000; Position = At 0; Action = Ablate } : FeatureIntervention) ] |> ignore) [ "feature 10000" ] "feature out of range"
            finally disposeAll coders
        }

        test "a parallel-residual model (GPT-NeoX) is refused by attribution graphs and path analysis, naming the reason" {
            let c = { randomConfig 9 GptLike with NLayers = 2; Dropout = 0.0; ParallelResidual = true }
            use m = randomModel 9 c
            let coders = mlpCoders 9 c false
            try
                let reason = [ "parallel residual"; "use_parallel_residual" ]
                throwsWith<ArgumentException> (fun () -> AttributionGraph.build m coders [| 0; 1 |] fullConfig |> ignore) ("attribution graphs" :: reason) "attribution graph"
                throwsWith<ArgumentException> (fun () -> LocalReplacement.create m coders [| 0; 1 |] |> ignore) reason "local replacement"
                throwsWith<ArgumentException> (fun () -> CircuitModel.create m coders |> ignore) ("path analysis" :: reason) "path analysis"
                // the same coders on the sequential twin are accepted
                use twin = randomModel 9 { c with ParallelResidual = false }
                use lr = LocalReplacement.create twin coders [| 0; 1 |]
                Expect.equal lr.NLayers 2 "sequential twin"
            finally disposeAll coders
        }
    ]

let tests =
    testList "Circuit graphs" [
        localReplacementTests
        edgeTests
        engineTests
        pruningTests
        memoryTests
        estimateTests
        fileTests
        interventionTests
        badInputTests
    ]
