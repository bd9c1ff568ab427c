using System;
using System.Collections.Generic;
using System.Linq;
using Transcoders.Circuits;
using AttributionCore = Transcoders.Circuits.Attribution;
using CircuitCore = Transcoders.Circuits.CircuitModelModule;
using ComponentCore = Transcoders.Circuits.ComponentModule;
using PathCore = Transcoders.Circuits.ComputationalPath;
using PathsCore = Transcoders.Circuits.PathSearchModule;
using PromptCore = Transcoders.Circuits.Prompt;

namespace Transcoders;

/// <summary>How the greedy path search explores (the transcoder paper's Algorithm 1; the defaults are its).</summary>
public sealed class PathSearchSettings
{
    private static readonly PathSearchOptions Defaults = PathSearchOptions.Default;

    /// <summary>Iterations: the longest paths have Depth + 1 nodes.</summary>
    public int Depth { get; set; } = Defaults.Depth;

    /// <summary>Candidates kept per transcoder layer and per attention layer before the overall choice.</summary>
    public int PerLayer { get; set; } = Defaults.PerLayer;

    /// <summary>Contributors expanded per node.</summary>
    public int Branches { get; set; } = Defaults.Branches;

    /// <summary>Paths kept after each iteration (the beam).</summary>
    public int Beam { get; set; } = Defaults.Beam;

    /// <summary>Rank by |attribution| instead of positive attribution.</summary>
    public bool ByMagnitude { get; set; }

    /// <summary>Let error terms (transcoder errors, biases) be path leaves.</summary>
    public bool IncludeErrors { get; set; } = Defaults.IncludeErrors;

    /// <summary>Leave attention heads at the BOS position out of the candidates.</summary>
    public bool IgnoreBos { get; set; }

    internal PathSearchOptions ToCore() =>
        Tracing.pathSearch(Depth, PerLayer, Branches, Beam, ByMagnitude, IncludeErrors, IgnoreBos);
}

/// <summary>One node of a computational path and its attribution to the path's root along the path.</summary>
/// <param name="Component">The node in the transcoder paper's names: <c>mlp2tc[17]@5</c>, <c>attn1[0]@2</c>, <c>embed@2</c>, <c>logit[87]@14</c>.</param>
/// <param name="Contribution">Its attribution to the root along the path.</param>
public sealed record PathNode(string Component, double Contribution);

/// <summary>A path from a root (a logit or a feature) back towards the embeddings, root first.</summary>
public sealed class ComputationalPath
{
    internal PathCore Core { get; }

    internal ComputationalPath(PathCore core)
    {
        Core = core;
        Nodes = core.Nodes.Select(n => new PathNode(n.Component.Display, n.Contribution)).ToList();
    }

    /// <summary>The nodes, root first.</summary>
    public IReadOnlyList<PathNode> Nodes { get; }

    /// <summary>The path's attribution (its last node's).</summary>
    public double Attribution => Core.Attribution;

    /// <summary><c>logit[87]@14 &lt;- mlp0tc[917]@14 &lt;- embed@14</c>.</summary>
    public override string ToString() => Core.Display;
}

/// <summary>
/// The transcoder paper's circuit analysis of one prompt: greedy computational paths to a logit or a feature
/// through transcoders (or a cross-layer transcoder), feature activations, and input-invariant de-embeddings. The
/// model and coders are borrowed; dispose this to free the prompt's cached activations.
/// </summary>
public sealed class PathFinder : IDisposable
{
    private readonly CircuitModel circuit;
    private readonly PromptRun run;

    /// <summary>Runs <paramref name="tokens"/> through <paramref name="model"/> with <paramref name="coders"/>
    /// (transcoders replacing MLPs), caching what the path search needs.</summary>
    /// <param name="model">The model.</param>
    /// <param name="coders">Transcoders or a cross-layer transcoder.</param>
    /// <param name="tokens">The prompt's token ids.</param>
    public PathFinder(LanguageModel model, IEnumerable<SparseCoder> coders, IReadOnlyList<int> tokens)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(coders);
        ArgumentNullException.ThrowIfNull(tokens);
        circuit = CircuitCore.create(model.Core, Interop.List(coders.Select(c => c.Core)));
        try
        {
            run = PromptCore.run(circuit, Interop.Array(tokens));
        }
        catch
        {
            ((IDisposable)circuit).Dispose();
            throw;
        }
    }

    /// <summary>The prompt's token ids.</summary>
    public IReadOnlyList<int> Tokens => run.Tokens;

    /// <summary>
    /// The best paths to <paramref name="root"/>, best first: a feature <c>mlp2tc[17]@5</c>, a logit
    /// <c>logit[87]@14</c> or a logit difference <c>logit[87-12]@14</c>. A malformed name, or a feature or position
    /// the prompt does not have, fails with a message saying which.
    /// </summary>
    /// <param name="root">The root's name.</param>
    /// <param name="settings">The search; null for the paper's defaults.</param>
    public IReadOnlyList<ComputationalPath> Find(string root, PathSearchSettings? settings = null)
    {
        ArgumentNullException.ThrowIfNull(root);
        var search = PathsCore.find(run, (settings ?? new PathSearchSettings()).ToCore(), Tracing.root(run, ComponentCore.parse(root)));
        return search.Paths.Select(p => new ComputationalPath(p)).ToList();
    }

    /// <summary>The best paths to the logit of <paramref name="token"/> at the last position.</summary>
    /// <param name="token">The next token.</param>
    /// <param name="settings">The search; null for the paper's defaults.</param>
    public IReadOnlyList<ComputationalPath> FindToLogit(int token, PathSearchSettings? settings = null) =>
        Find(Component.NewTokenLogit(token, run.Length - 1).Display, settings);

    /// <summary>The best paths to feature <paramref name="feature"/> of layer <paramref name="layer"/> at <paramref name="position"/>.</summary>
    /// <param name="layer">The layer.</param>
    /// <param name="feature">The feature.</param>
    /// <param name="position">The position.</param>
    /// <param name="settings">The search; null for the paper's defaults.</param>
    public IReadOnlyList<ComputationalPath> FindToFeature(int layer, int feature, int position, PathSearchSettings? settings = null) =>
        Find(Component.NewTranscoderFeature(new FeatureAt(layer, position, feature)).Display, settings);

    /// <summary>The <paramref name="k"/> feature nodes with the largest summed attribution over <paramref name="paths"/>.</summary>
    /// <param name="paths">Paths from <see cref="Find"/>.</param>
    /// <param name="k">How many.</param>
    public static IReadOnlyList<KeyValuePair<string, double>> TopFeatures(IEnumerable<ComputationalPath> paths, int k)
    {
        ArgumentNullException.ThrowIfNull(paths);
        var top = PathsCore.topNodes(k, NodeFilter.NewOfKind(ComponentKind.FeatureComponent), Interop.List(paths.Select(p => p.Core)));
        return top.Select(t => KeyValuePair.Create(t.Item1.Display, t.Item2)).ToList();
    }

    /// <summary>The activations [features] at <paramref name="position"/> of the coder reading layer <paramref name="layer"/>.</summary>
    /// <param name="layer">The layer.</param>
    /// <param name="position">The position.</param>
    public IReadOnlyList<double> Activations(int layer, int position) => run.ActivationsAt(layer, position);

    /// <summary>The model's logits [vocab] at a position.</summary>
    /// <param name="position">The position.</param>
    public IReadOnlyList<double> LogitsAt(int position) => run.LogitsAt(position);

    /// <summary>A feature's de-embedding: per vocabulary token, how strongly its embedding drives the feature directly.</summary>
    /// <param name="layer">The layer.</param>
    /// <param name="feature">The feature.</param>
    public IReadOnlyList<double> FeatureDeembedding(int layer, int feature) => AttributionCore.featureDeembedding(circuit, layer, feature);

    /// <summary>Frees the prompt's cached activations and the circuit's copies of the weights.</summary>
    public void Dispose()
    {
        ((IDisposable)run).Dispose();
        ((IDisposable)circuit).Dispose();
    }
}
