/// An attribution graph as data: its nodes (features, errors, tokens, logits), the adjacency in blocks, labels
/// (the one display form of circuit components) and lookups, apart from the code that builds it
/// (`AttributionGraph`), the influence computations over it (`Adjacency`) and the pages that show it.
namespace Transcoders.Circuits

open System
open System.Collections.Generic

/// An active transcoder feature of the prompt: a node of an attribution graph.
type FeatureNode =
    { /// The model layer whose MLP input the feature reads.
      Layer: int
      Position: int
      /// Index of the feature within its layer's coder.
      Feature: int
      Activation: float }

    member f.At : FeatureAt = { Layer = f.Layer; Position = f.Position; Feature = f.Feature }

/// An output logit explained by the graph (the last position's next-token prediction).
type LogitNode =
    { Token: int
      /// Its probability under the original model: the node's weight in influence computations.
      Probability: float
      Logit: float }

/// Any node of a graph, as `Graph.node` describes it.
[<RequireQualifiedAccess>]
type GraphNode =
    | Feature of FeatureNode
    /// The part of layer `layer`'s MLP output at `position` that the coders do not reconstruct.
    | Error of layer: int * position: int
    /// The embedding (token plus learned position embedding) at `position`.
    | Token of position: int * token: int
    | Logit of LogitNode

/// A block of the adjacency: the direct effects on `Targets` (rows) of `Sources` (columns), row-major
/// `Weights` [Targets.Length × Sources.Length]. Node ids are the graph's (see `Graph`). A block holds the rows of one
/// backward pass, restricted to that pass's causal cone, so the whole adjacency never exists as a dense N×N matrix.
type AdjacencyBlock =
    { Targets: int[]
      Sources: int[]
      Weights: float32[] }

/// How a graph was built (what `GraphConfig` held, without the callbacks).
type GraphSettings =
    { MaxLogits: int
      DesiredLogitProbability: float
      BatchSize: int
      MaxFeatureNodes: int option
      UpdateInterval: int
      CausalCone: bool }

/// Counts and times of one build.
type GraphStats =
    { /// Active features on the prompt (before the cap on feature nodes).
      ActiveFeatures: int
      /// Backward passes run.
      Batches: int
      BuildSeconds: float
      /// Of which: ranking the features by influence between batches.
      RankingSeconds: float
      /// The memory estimate the build was checked against, in bytes.
      EstimatedBytes: int64 }

/// An attribution graph: plain data, separate from the code that computes it and from the pages that show it.
///
/// Node ids, in order (as circuit-tracer's): the selected feature nodes `Features` (sorted by layer, position,
/// feature), then one error node per (layer, position) (id F + layer·p + position), then one token node per position
/// (id F + L·p + position), then the logit nodes (id F + (L+1)·p + k). The adjacency's rows are targets (features
/// and logits), its columns sources; an edge weight is the direct effect of the source on the target's
/// pre-activation (features) or de-meaned logit (logits) in the local replacement model: A_{s→t} = a_s·(decoder of
/// s)·J·(encoder of t).
type Graph =
    { Tokens: int[]
      /// Display strings of the tokens (empty when unknown).
      TokenStrings: string[]
      NLayers: int
      Features: FeatureNode[]
      Logits: LogitNode[]
      Blocks: AdjacencyBlock[]
      Settings: GraphSettings
      Stats: GraphStats }

    member g.NPositions = g.Tokens.Length
    member g.ErrorStart = g.Features.Length
    member g.TokenStart = g.Features.Length + g.NLayers * g.Tokens.Length
    member g.LogitStart = g.TokenStart + g.Tokens.Length
    member g.NodeCount = g.LogitStart + g.Logits.Length

/// Functions over graphs.
[<RequireQualifiedAccess>]
module Graph =

    /// The node with this id.
    let node (g: Graph) (id: int) : GraphNode =
        if id < 0 || id >= g.NodeCount then invalidArg "id" (sprintf "node id %d is outside 0..%d" id (g.NodeCount - 1))
        let p = g.NPositions
        if id < g.ErrorStart then GraphNode.Feature g.Features[id]
        elif id < g.TokenStart then let e = id - g.ErrorStart in GraphNode.Error(e / p, e % p)
        elif id < g.LogitStart then let q = id - g.TokenStart in GraphNode.Token(q, g.Tokens[q])
        else GraphNode.Logit g.Logits[id - g.LogitStart]

    let errorNode (g: Graph) (layer: int) (position: int) = g.ErrorStart + layer * g.NPositions + position
    let tokenNode (g: Graph) (position: int) = g.TokenStart + position
    let logitNode (g: Graph) (k: int) = g.LogitStart + k

    /// Ids of the feature nodes by where they fire.
    let featureIndex (g: Graph) : IReadOnlyDictionary<FeatureAt, int> =
        let d = Dictionary<FeatureAt, int>()
        g.Features |> Array.iteri (fun i f -> d[f.At] <- i)
        d :> _

    /// The circuit component a node stands for: a feature, the transcoder error of (layer, position), the embedding
    /// of a position (token plus learned position embedding), or the logit of a token at the last position.
    let toComponent (g: Graph) (id: int) : Component =
        match node g id with
        | GraphNode.Feature f -> TranscoderFeature f.At
        | GraphNode.Error (l, p) -> ErrorTerm (TranscoderError, l, p)
        | GraphNode.Token (p, _) -> Embedding p
        | GraphNode.Logit l -> TokenLogit (l.Token, g.NPositions - 1)

    /// A node's name, the one display form of components (`Component.Display`): `mlp2tc[17]@5`, `tc_error2@5`,
    /// `embed@5`, `logit[42]@5`.
    let label (g: Graph) (id: int) : string = (toComponent g id).Display

    /// Every stored edge (target, source, weight) with a non-zero weight.
    let edges (g: Graph) : seq<int * int * float32> =
        seq {
            for b in g.Blocks do
                let c = b.Sources.Length
                for i in 0 .. b.Targets.Length - 1 do
                    for j in 0 .. c - 1 do
                        let w = b.Weights[i * c + j]
                        if w <> 0.0f then yield b.Targets[i], b.Sources[j], w }

    /// The adjacency as a dense [nodes, nodes] array (targets × sources): only for small graphs.
    let toDense (g: Graph) : float32[,] =
        let n = g.NodeCount
        if int64 n * int64 n > 100_000_000L then invalidOp (sprintf "a dense adjacency of %d nodes is too large; use the blocks" n)
        let a = Array2D.zeroCreate n n
        for t, s, w in edges g do a[t, s] <- w
        a

    /// Weight of the edge source → target (0 when absent).
    let edge (g: Graph) (target: int) (source: int) : float32 =
        g.Blocks
        |> Array.tryPick (fun b ->
            match Array.IndexOf(b.Targets, target), Array.IndexOf(b.Sources, source) with
            | i, j when i >= 0 && j >= 0 -> Some b.Weights[i * b.Sources.Length + j]
            | i, _ when i >= 0 -> Some 0.0f
            | _ -> None)
        |> Option.defaultValue 0.0f
