using System;
using System.Collections.Generic;
using System.Linq;
using Microsoft.FSharp.Collections;
using Microsoft.FSharp.Core;
using TorchSharp;
using Transcoders.Circuits;
using GraphCore = Transcoders.Circuits.Graph;
using GraphFunctions = Transcoders.Circuits.GraphModule;
using GraphBuilder = Transcoders.Circuits.AttributionGraph;
using GraphFileCore = Transcoders.Circuits.GraphFile;
using GraphFileInfoCore = Transcoders.Circuits.GraphFileInfo;
using GraphScoresCore = Transcoders.Circuits.GraphScores;
using PruningCore = Transcoders.Circuits.Pruning;

namespace Transcoders;

/// <summary>Progress of a graph build, reported after every backward pass.</summary>
/// <param name="Phase">"logits" or "features".</param>
/// <param name="Done">Rows (targets) computed so far in this phase.</param>
/// <param name="Total">Rows of this phase.</param>
/// <param name="Elapsed">Time since the build started.</param>
public sealed record GraphProgress(string Phase, int Done, int Total, TimeSpan Elapsed);

/// <summary>How to build an attribution graph (circuit-tracer's settings; the defaults are theirs).</summary>
public sealed class GraphOptions
{
    private static readonly GraphConfig Defaults = GraphConfig.Default;

    /// <summary>At most this many logit nodes (when <see cref="LogitTokens"/> is null).</summary>
    public int MaxLogits { get; set; } = Defaults.MaxLogits;

    /// <summary>Take the most likely next tokens until their probabilities add up to this (at most <see cref="MaxLogits"/>).</summary>
    public double DesiredLogitProbability { get; set; } = Defaults.DesiredLogitProbability;

    /// <summary>Explain these next tokens instead of the most likely ones; null for the most likely.</summary>
    public IReadOnlyList<int>? LogitTokens { get; set; }

    /// <summary>Targets per backward pass.</summary>
    public int BatchSize { get; set; } = Defaults.BatchSize;

    /// <summary>At most this many feature nodes, the most influential; null for every active feature.</summary>
    public int? MaxFeatureNodes { get; set; } = Interop.Nullable(Defaults.MaxFeatureNodes);

    /// <summary>Batches between two re-rankings of the features by influence.</summary>
    public int UpdateInterval { get; set; } = Defaults.UpdateInterval;

    /// <summary>Restrict each backward pass to its causal cone (same edges, less work).</summary>
    public bool CausalCone { get; set; } = Defaults.CausalCone;

    /// <summary>Refuse a graph whose estimated memory exceeds this many bytes; null for no limit.</summary>
    public long? MemoryBudgetBytes { get; set; } = Interop.Nullable(Defaults.MemoryBudgetBytes);

    /// <summary>Called after every backward pass; null for nothing.</summary>
    public Action<GraphProgress>? Progress { get; set; }

    internal GraphConfig ToCore() =>
        Tracing.graphConfig(
            MaxLogits, DesiredLogitProbability,
            LogitTokens is null ? FSharpOption<int[]>.None : FSharpOption<int[]>.Some(Interop.Array(LogitTokens)),
            BatchSize, Interop.Some(MaxFeatureNodes), UpdateInterval, CausalCone, Interop.Some(MemoryBudgetBytes),
            FuncConvert.FromAction<Transcoders.Circuits.GraphProgress>(p => Progress?.Invoke(new GraphProgress(p.Phase, p.Done, p.Total, p.Elapsed))));
}

/// <summary>A feature node of a graph: feature <paramref name="Feature"/> of the coder reading layer
/// <paramref name="Layer"/>'s MLP input, active at <paramref name="Position"/>.</summary>
/// <param name="Id">The node's id.</param>
/// <param name="Layer">The model layer.</param>
/// <param name="Position">The token position.</param>
/// <param name="Feature">The feature index.</param>
/// <param name="Activation">Its activation on the prompt.</param>
/// <param name="Label">The transcoder paper's name, e.g. <c>mlp2tc[17]@5</c>.</param>
public sealed record GraphFeature(int Id, int Layer, int Position, int Feature, double Activation, string Label);

/// <summary>A logit node of a graph: a next token the graph explains.</summary>
/// <param name="Id">The node's id.</param>
/// <param name="Token">The token id.</param>
/// <param name="Probability">Its probability at the last position.</param>
/// <param name="Logit">Its logit.</param>
public sealed record GraphLogit(int Id, int Token, double Probability, double Logit);

/// <summary>An edge: the direct effect of <paramref name="Source"/> on <paramref name="Target"/> (node ids).</summary>
/// <param name="Target">The target node (a feature or a logit).</param>
/// <param name="Source">The source node (a feature, error or token node).</param>
/// <param name="Weight">The weight.</param>
public sealed record GraphEdge(int Target, int Source, float Weight);

/// <summary>How much of a graph's influence on the logits flows from the token embeddings rather than error nodes.</summary>
/// <param name="Replacement">Share of the end-to-end influence that starts at token embeddings.</param>
/// <param name="Completeness">Share of the direct inputs to nodes that is not error.</param>
public sealed record GraphScores(double Replacement, double Completeness)
{
    internal static GraphScores FromCore(GraphScoresCore s) => new(s.Replacement, s.Completeness);
    internal GraphScoresCore ToCore() => new(Replacement, Completeness);
}

/// <summary>Pruning thresholds (circuit-tracer's defaults: 0.8 of node influence, 0.98 of edge influence).</summary>
public sealed class PruneOptions
{
    /// <summary>Keep the nodes that hold this share of the influence on the logits.</summary>
    public double NodeThreshold { get; set; } = PruneConfig.Default.NodeThreshold;

    /// <summary>Keep the edges that hold this share of the influence.</summary>
    public double EdgeThreshold { get; set; } = PruneConfig.Default.EdgeThreshold;
}

/// <summary>A pruned graph: which nodes and edges of the graph stay.</summary>
public sealed class PrunedGraph
{
    internal PrunedGraph(Transcoders.Circuits.PrunedGraph core)
    {
        KeptNodes = core.KeptNodes;
        Edges = core.Edges.Select(e => new GraphEdge(e.Target, e.Source, e.Weight)).ToList();
        NodeInfluence = core.NodeInfluence;
        CumulativeInfluence = core.CumulativeInfluence;
    }

    /// <summary>The ids of the kept nodes, ascending (token and logit nodes always stay).</summary>
    public IReadOnlyList<int> KeptNodes { get; }

    /// <summary>The kept edges.</summary>
    public IReadOnlyList<GraphEdge> Edges { get; }

    /// <summary>Per node id: its total influence on the logits in the unpruned graph.</summary>
    public IReadOnlyList<double> NodeInfluence { get; }

    /// <summary>Per node id: the share of all influence held by the nodes at least as influential as it.</summary>
    public IReadOnlyList<double> CumulativeInfluence { get; }
}

/// <summary>
/// The attribution graph of a prompt's next-token prediction (circuit-tracer's method, in causal cones, blockwise):
/// feature nodes, error nodes per (layer, position), token nodes and logit nodes, with the direct effects between
/// them in the local replacement model. Node ids: features first, then errors (<see cref="ErrorNode"/>), tokens
/// (<see cref="TokenNode"/>) and logits (<see cref="LogitNode"/>). Plain data: prune it, score it, save it.
/// </summary>
public sealed class AttributionGraph
{
    internal GraphCore Core { get; }

    internal AttributionGraph(GraphCore core) => Core = core;

    /// <summary>
    /// Builds the graph of the prediction after <paramref name="tokens"/> through <paramref name="coders"/> (per-layer
    /// transcoders or a cross-layer transcoder replacing the MLPs). Too long a prompt, coders that do not fit and a
    /// graph beyond the memory budget fail with a message saying which.
    /// </summary>
    /// <param name="model">The model.</param>
    /// <param name="coders">The coders.</param>
    /// <param name="tokens">The prompt's token ids (BOS first when the model has one).</param>
    /// <param name="options">Settings; null for the defaults.</param>
    /// <param name="tokenizer">Decodes the tokens' display strings (<see cref="TokenStrings"/>); null for none.</param>
    public static AttributionGraph Build(LanguageModel model, IEnumerable<SparseCoder> coders, IReadOnlyList<int> tokens,
                                         GraphOptions? options = null, TextTokenizer? tokenizer = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(coders);
        ArgumentNullException.ThrowIfNull(tokens);
        var graph = GraphBuilder.build(model.Core, Interop.List(coders.Select(c => c.Core)), Interop.Array(tokens), (options ?? new GraphOptions()).ToCore());
        return new AttributionGraph(tokenizer is null ? graph : Tracing.withTokenStrings(tokenizer.Core, graph));
    }

    /// <summary>Reads a graph file written by <see cref="Save"/> (or <c>trace</c>); a clear error names what is wrong.</summary>
    /// <param name="path">The file.</param>
    public static AttributionGraph Load(string path) => Load(path, out _, out _);

    /// <summary>Reads a graph file with its saved scores (null when none were saved) and description.</summary>
    /// <param name="path">The file.</param>
    /// <param name="scores">The scores saved with it, or null.</param>
    /// <param name="description">The description saved with it (e.g. model, prompt).</param>
    public static AttributionGraph Load(string path, out GraphScores? scores, out IReadOnlyDictionary<string, string> description)
    {
        ArgumentNullException.ThrowIfNull(path);
        var (graph, info) = GraphFileCore.loadWith(path);
        scores = FSharpOption<GraphScoresCore>.get_IsSome(info.Scores) ? GraphScores.FromCore(info.Scores.Value) : null;
        description = info.Description.ToDictionary(kv => kv.Key, kv => kv.Value);
        return new AttributionGraph(graph);
    }

    /// <summary>Saves the graph as one safetensors file (adjacency blocks plus a JSON header), atomically.</summary>
    /// <param name="path">The file to write.</param>
    /// <param name="scores">Scores to save with it; null for none.</param>
    /// <param name="description">Free-form description (model, prompt, coders); null for none.</param>
    public void Save(string path, GraphScores? scores = null, IReadOnlyDictionary<string, string>? description = null)
    {
        ArgumentNullException.ThrowIfNull(path);
        var info = new GraphFileInfoCore(
            scores is null ? FSharpOption<GraphScoresCore>.None : FSharpOption<GraphScoresCore>.Some(scores.ToCore()),
            Interop.Map(description ?? new Dictionary<string, string>()));
        GraphFileCore.saveWith(path, info, Core);
    }

    /// <summary>Prunes the graph by influence on the logits (circuit-tracer's algorithm).</summary>
    /// <param name="options">Thresholds; null for 0.8 / 0.98.</param>
    /// <param name="device">Where to compute; null for the CPU.</param>
    public PrunedGraph Prune(PruneOptions? options = null, torch.Device? device = null)
    {
        var o = options ?? new PruneOptions();
        return new PrunedGraph(PruningCore.prune(Tracing.pruneConfig(o.NodeThreshold, o.EdgeThreshold, device ?? torch.CPU), Core));
    }

    /// <summary>The graph's replacement and completeness scores.</summary>
    /// <param name="device">Where to compute; null for the CPU.</param>
    public GraphScores Scores(torch.Device? device = null) => GraphScores.FromCore(PruningCore.scores(Core, device ?? torch.CPU));

    /// <summary>The prompt's token ids.</summary>
    public IReadOnlyList<int> Tokens => Core.Tokens;

    /// <summary>The tokens' display strings (empty when built without a tokenizer).</summary>
    public IReadOnlyList<string> TokenStrings => Core.TokenStrings;

    /// <summary>Model layers (one error node per layer and position).</summary>
    public int Layers => Core.NLayers;

    /// <summary>Number of nodes.</summary>
    public int NodeCount => Core.NodeCount;

    /// <summary>Active features on the prompt (before the cap on feature nodes).</summary>
    public int ActiveFeatures => Core.Stats.ActiveFeatures;

    /// <summary>Seconds the build took.</summary>
    public double BuildSeconds => Core.Stats.BuildSeconds;

    /// <summary>The feature nodes (ids 0 … count − 1), sorted by layer, position, feature.</summary>
    public IReadOnlyList<GraphFeature> Features =>
        Core.Features.Select((f, i) => new GraphFeature(i, f.Layer, f.Position, f.Feature, f.Activation, GraphFunctions.label(Core, i))).ToList();

    /// <summary>The logit nodes, most likely first.</summary>
    public IReadOnlyList<GraphLogit> Logits =>
        Core.Logits.Select((l, k) => new GraphLogit(GraphFunctions.logitNode(Core, k), l.Token, l.Probability, l.Logit)).ToList();

    /// <summary>Every edge with a non-zero weight.</summary>
    public IEnumerable<GraphEdge> Edges => GraphFunctions.edges(Core).Select(e => new GraphEdge(e.Item1, e.Item2, e.Item3));

    /// <summary>The weight of the edge from <paramref name="source"/> to <paramref name="target"/> (0 when there is none).</summary>
    /// <param name="target">The target node.</param>
    /// <param name="source">The source node.</param>
    public float Edge(int target, int source) => GraphFunctions.edge(Core, target, source);

    /// <summary>The id of the error node of a layer at a position.</summary>
    /// <param name="layer">The layer.</param>
    /// <param name="position">The position.</param>
    public int ErrorNode(int layer, int position) => GraphFunctions.errorNode(Core, layer, position);

    /// <summary>The id of the token node at a position.</summary>
    /// <param name="position">The position.</param>
    public int TokenNode(int position) => GraphFunctions.tokenNode(Core, position);

    /// <summary>The id of the k-th logit node.</summary>
    /// <param name="k">Index among the logits.</param>
    public int LogitNode(int k) => GraphFunctions.logitNode(Core, k);

    /// <summary>A node's label: <c>mlp2tc[17]@5</c>, <c>tc_error1@3</c>, <c>embed@0</c>, <c>logit[87]@5</c> (the paths' names).</summary>
    /// <param name="id">The node.</param>
    public string Label(int id) => GraphFunctions.label(Core, id);
}
