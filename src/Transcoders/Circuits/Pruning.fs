namespace Transcoders.Circuits

open System
open TorchSharp
open Transcoders.Coders.Scalars

/// How to prune a graph (circuit-tracer's defaults: keep the nodes holding 80% of the influence on the logits and
/// the edges holding 98%).
type PruneConfig =
    { NodeThreshold: float
      EdgeThreshold: float
      /// Where the influence computations run (the graph's blocks are copied there).
      Device: torch.Device }

    static member Default = { NodeThreshold = 0.8; EdgeThreshold = 0.98; Device = torch.CPU }

/// A kept edge of a pruned graph (node ids of the original graph).
type PrunedEdge =
    { Target: int
      Source: int
      Weight: float32 }

/// The result of pruning: which nodes and edges of `Graph` stay.
type PrunedGraph =
    { Graph: Graph
      /// Per node id of `Graph`: kept or not (token and logit nodes always are).
      NodeMask: bool[]
      Edges: PrunedEdge[]
      /// Per node: its total influence on the logits in the unpruned graph.
      NodeInfluence: float[]
      /// Per node: the fraction of all influence held by the nodes at least as influential as it (what the node
      /// threshold is compared with).
      CumulativeInfluence: float[] }

    member p.KeptNodes = [| for i in 0 .. p.NodeMask.Length - 1 do if p.NodeMask[i] then yield i |]

/// How much of the graph's explanation goes through features rather than error nodes (circuit-tracer's scores).
type GraphScores =
    { /// Share of the end-to-end influence of the token embeddings on the logits (as opposed to that of the error
      /// nodes): I_tokens / (I_tokens + I_errors).
      Replacement: float
      /// Influence-weighted share of every node's incoming (normalised) weight that does not come from error nodes.
      Completeness: float }

/// Pruning attribution graphs by influence, and their replacement and completeness scores.
[<RequireQualifiedAccess>]
module Pruning =

    let private logitWeights (g: Graph) (device: torch.Device) =
        let w = Array.zeroCreate<float> g.NodeCount
        g.Logits |> Array.iteri (fun k l -> w[g.LogitStart + k] <- l.Probability)
        torch.tensor(w, device = device)

    /// (Σ of the scores ≥ t, how many) over blocks of scores, the sum in float64.
    let private massAtLeast (blocks: torch.Tensor[]) (t: float32) =
        let mutable mass, count = 0.0, 0L
        for s in blocks do
            use scope = torch.NewDisposeScope()
            let m = s.ge(sc (float t))
            mass <- mass + s.mul(m).sum(torch.float64).item<float> ()
            count <- count + m.sum().item<int64> ()
        mass, count

    /// At most this many candidate scores are sorted to find a threshold exactly.
    let private sortLimit = 4_000_000L

    /// The score threshold keeping the smallest set of highest scores whose sum reaches `fraction` of the total
    /// (circuit-tracer's `find_threshold`: the k-th largest score for the least such k), over scores held in any
    /// number of tensors; never below the smallest positive score (zeros are never kept); +∞ when every score is 0.
    /// No sort of all scores: scores below (1 − fraction)·total/n cannot matter (all of them together hold less than
    /// the 1 − fraction left out), bisection on the float bits raises that floor while more than a few million remain,
    /// and only the candidates above it are sorted.
    let threshold (scores: torch.Tensor[]) (fraction: float) : float32 =
        use scope = torch.NewDisposeScope()
        let scores = scores |> Array.map (fun s -> s.to_type(torch.float32).reshape(-1L)) |> Array.filter (fun s -> s.numel () > 0L)
        let total = scores |> Array.sumBy (fun s -> s.sum(torch.float64).item<float> ())
        if not (total > 0.0) then Single.PositiveInfinity
        else
            let target = fraction * total
            let n = scores |> Array.sumBy (fun s -> s.numel ())
            let maxScore = scores |> Array.map (fun s -> s.max().item<float32> ()) |> Array.max
            let bits (f: float32) = BitConverter.SingleToInt32Bits f
            let ofBits (i: int) = BitConverter.Int32BitsToSingle i
            // floor: a value every threshold is at least (S(floor) ≥ target), at least the smallest positive float
            let mutable floor = max (float32 ((1.0 - fraction) * total / float n * (1.0 - 1e-6))) (ofBits 1)
            let mutable _, count = massAtLeast scores floor
            let mutable hi = bits maxScore + 1                 // S(ofBits hi) < target (nothing is above the max)
            while count > sortLimit && hi - bits floor > 1 do
                let mid = bits floor + (hi - bits floor) / 2
                let m, c = massAtLeast scores (ofBits mid)
                if m >= target then
                    floor <- ofBits mid
                    count <- c
                else hi <- mid
            let candidates = torch.cat(scores |> Array.map (fun s -> s.masked_select(s.ge(sc (float floor)))), 0L)
            let struct (sorted: torch.Tensor, _) = candidates.sort(descending = true)
            let cum = sorted.cumsum(0L, torch.float64)
            let reached: torch.Tensor = cum.ge(sc target).nonzero()
            let k = if reached.shape[0] > 0L then reached[0L, 0L].item<int64> () else sorted.shape[0] - 1L
            sorted[k].item<float32> ()

    /// Every node's total influence on the logits: w·(Â + Â² + …) with Â the row-normalised |A| and w the logit
    /// probabilities.
    let nodeInfluence (g: Graph) (device: torch.Device) : float[] =
        let blocks = Adjacency.toDevice device g
        try
            use w = logitWeights g device
            use infl = Adjacency.influence g.NodeCount blocks None w
            use cpu = infl.cpu()
            cpu.data<float>().ToArray()
        finally Adjacency.dispose blocks

    /// Prunes a graph: keeps the nodes holding `NodeThreshold` of the total influence on the logits (token and logit
    /// nodes always), then the edges holding `EdgeThreshold` of the influence-weighted edge scores of the graph
    /// restricted to those nodes, then drops feature and error nodes left without outgoing edges and features left
    /// without incoming ones, until nothing changes. Works on the graph's blocks (no dense N×N matrix); besides the
    /// blocks it holds one normalised copy of them (reused for the restricted graph and the edge scores) and the
    /// edge masks.
    let prune (config: PruneConfig) (g: Graph) : PrunedGraph =
        if not (config.NodeThreshold >= 0.0 && config.NodeThreshold <= 1.0) then
            invalidArg "NodeThreshold" (sprintf "NodeThreshold must be in [0, 1], got %g" config.NodeThreshold)
        if not (config.EdgeThreshold >= 0.0 && config.EdgeThreshold <= 1.0) then
            invalidArg "EdgeThreshold" (sprintf "EdgeThreshold must be in [0, 1], got %g" config.EdgeThreshold)
        let device = config.Device
        let n = g.NodeCount
        use _ = torch.no_grad ()
        use scope = torch.NewDisposeScope()
        let blocks = Adjacency.toDevice device g
        let w = logitWeights g device
        // nodes, by influence on the whole graph
        let norms = blocks |> Array.map (Adjacency.normalised None)
        let influence = Adjacency.influenceOver n blocks norms w
        let nodeThreshold = threshold [| influence |] config.NodeThreshold
        let nodeMask = influence.to_type(torch.float32).ge(sc (float nodeThreshold))
        nodeMask.narrow(0, int64 g.TokenStart, int64 (n - g.TokenStart)).fill_(true) |> ignore
        // edges, on the graph restricted to the kept nodes: the normalised copy is rewritten, then scaled to scores
        for i in 0 .. blocks.Length - 1 do Adjacency.normaliseInto norms[i] (Some nodeMask) blocks[i]
        let prunedInfluence = (Adjacency.influenceOver n blocks norms w).add(w)
        for i in 0 .. blocks.Length - 1 do
            use f = prunedInfluence.index_select(0L, blocks[i].Rows).to_type(torch.float32).unsqueeze 1
            norms[i].mul_(f) |> ignore
        let edgeThreshold = threshold norms config.EdgeThreshold
        let edgeMasks = norms |> Array.map (fun s -> s.ge(sc (float edgeThreshold)))
        for t in norms do t.Dispose()
        let nodeMask = nodeMask.clone()
        let featureOrError = torch.zeros([| int64 n |], dtype = torch.ScalarType.Bool, device = device)
        featureOrError.narrow(0, 0L, int64 g.TokenStart).fill_(true) |> ignore
        let isFeature = torch.zeros([| int64 n |], dtype = torch.ScalarType.Bool, device = device)
        isFeature.narrow(0, 0L, int64 g.Features.Length).fill_(true) |> ignore
        let mutable changed = true
        let mutable rounds = 0
        while changed do
            use round = torch.NewDisposeScope()
            rounds <- rounds + 1
            for i in 0 .. blocks.Length - 1 do
                let b = blocks[i]
                edgeMasks[i].logical_and_(nodeMask.index_select(0L, b.Rows).unsqueeze(1)).logical_and_(nodeMask.index_select(0L, b.Cols).unsqueeze(0)) |> ignore
            let hasOut = torch.zeros([| int64 n |], dtype = torch.int64, device = device)
            let hasIn = torch.zeros([| int64 n |], dtype = torch.int64, device = device)
            for i in 0 .. blocks.Length - 1 do
                hasOut.index_add_(0L, blocks[i].Cols, edgeMasks[i].sum([| 0L |], false, torch.int64), scl 1L) |> ignore
                hasIn.index_add_(0L, blocks[i].Rows, edgeMasks[i].sum([| 1L |], false, torch.int64), scl 1L) |> ignore
            let drop =
                featureOrError.logical_and(hasOut.eq(sc 0.0))
                    .logical_or(isFeature.logical_and(hasIn.eq(sc 0.0)))
            let next = nodeMask.logical_and(drop.logical_not())
            changed <- not (next.eq(nodeMask).all().item<bool> ())
            nodeMask.copy_(next) |> ignore
            if rounds > g.NLayers + 3 + n then invalidOp "pruning did not settle"
        // cumulative influence per node
        let infl = influence.cpu().data<float>().ToArray()
        let total = Array.sum infl
        let order = Array.init n id |> Array.sortWith (fun a b -> let c = compare infl[b] infl[a] in if c <> 0 then c else compare a b)
        let cumulative = Array.zeroCreate<float> n
        let mutable acc = 0.0
        for i in order do
            acc <- acc + infl[i]
            cumulative[i] <- if total > 0.0 then acc / total else 0.0
        let edges =
            [| for i in 0 .. blocks.Length - 1 do
                 use step = torch.NewDisposeScope()
                 let b = g.Blocks[i]
                 let kept = edgeMasks[i].reshape(-1L).nonzero().reshape(-1L).cpu().data<int64>().ToArray()
                 let c = b.Sources.Length
                 for k in kept do
                     let k = int k
                     yield { Target = b.Targets[k / c]; Source = b.Sources[k % c]; Weight = b.Weights[k] } |]
        { Graph = g
          NodeMask = nodeMask.cpu().data<bool>().ToArray()
          Edges = edges
          NodeInfluence = infl
          CumulativeInfluence = cumulative }

    /// The graph's replacement score (share of the token-to-logit influence that does not go through error nodes)
    /// and completeness score (influence-weighted share of incoming weight not from error nodes).
    let scores (g: Graph) (device: torch.Device) : GraphScores =
        let n = g.NodeCount
        use scope = torch.NewDisposeScope()
        let blocks = Adjacency.toDevice device g
        let w = logitWeights g device
        let influence = Adjacency.influence n blocks None w
        let sumRange (t: torch.Tensor) (start: int) (count: int) = t.narrow(0, int64 start, int64 count).sum().item<float> ()
        let tokenInfl = sumRange influence g.TokenStart g.NPositions
        let errorInfl = sumRange influence g.ErrorStart (g.NLayers * g.NPositions)
        let nonError = torch.ones([| int64 n |], dtype = torch.float64, device = device)
        let isError = torch.zeros([| int64 n |], dtype = torch.float32, device = device)
        isError.narrow(0, int64 g.ErrorStart, int64 (g.NLayers * g.NPositions)).fill_(1.0) |> ignore
        for b in blocks do
            let a = Adjacency.normalised None b
            let errMass = a.mul(isError.index_select(0L, b.Cols).unsqueeze 0).sum([| 1L |]).to_type(torch.float64)
            nonError.index_copy_(0L, b.Rows, torch.ones_like(errMass).sub(errMass)) |> ignore
        let output = influence.add(w)
        let completeness = nonError.mul(output).sum().item<float> () / output.sum().item<float> ()
        { Replacement = (if tokenInfl + errorInfl > 0.0 then tokenInfl / (tokenInfl + errorInfl) else nan)
          Completeness = completeness }
