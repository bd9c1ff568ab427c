using System;
using System.Collections.Generic;
using System.Linq;
using TorchSharp;
using Transcoders.Circuits;
using InterventionCore = Transcoders.Circuits.FeatureIntervention;
using InterventionsCore = Transcoders.Circuits.Interventions;
using LocalReplacementCore = Transcoders.Circuits.LocalReplacementModule;

namespace Transcoders;

/// <summary>What an intervention does to a feature's activation a.</summary>
public enum InterventionAction
{
    /// <summary>a ← 0.</summary>
    Ablate,
    /// <summary>a ← value.</summary>
    Set,
    /// <summary>a ← value · a.</summary>
    Scale,
}

/// <summary>An intervention on feature <paramref name="Feature"/> of the coder reading layer <paramref name="Layer"/>.</summary>
/// <param name="Layer">The model layer.</param>
/// <param name="Feature">The feature.</param>
/// <param name="Position">The token position.</param>
/// <param name="Action">Ablate, set or scale.</param>
/// <param name="Value">The value set, or the factor scaled by (ignored for Ablate).</param>
/// <param name="FromPosition">Apply at this position and every later one (generated tokens included: steering).</param>
public sealed record FeatureIntervention(int Layer, int Feature, int Position, InterventionAction Action = InterventionAction.Ablate,
                                         double Value = 0.0, bool FromPosition = false)
{
    /// <summary>An intervention on a feature named as in the transcoder paper, <c>mlp2tc[17]@5</c>, or
    /// <c>mlp2tc[17]@last</c> for the last of <paramref name="promptLength"/> tokens.</summary>
    /// <param name="feature">The feature's name.</param>
    /// <param name="promptLength">Tokens in the prompt (for <c>@last</c>).</param>
    /// <param name="action">Ablate, set or scale.</param>
    /// <param name="value">The value set, or the factor scaled by.</param>
    /// <param name="fromPosition">Apply from the position on.</param>
    public static FeatureIntervention Parse(string feature, int promptLength, InterventionAction action = InterventionAction.Ablate,
                                            double value = 0.0, bool fromPosition = false)
    {
        ArgumentNullException.ThrowIfNull(feature);
        var at = InterventionsCore.parseFeature(promptLength, feature);
        return new FeatureIntervention(at.Layer, at.Feature, at.Position, action, value, fromPosition);
    }

    internal InterventionCore ToCore() => new(
        Layer, Feature,
        FromPosition ? InterventionPosition.NewFrom(Position) : InterventionPosition.NewAt(Position),
        Action switch
        {
            InterventionAction.Set => Transcoders.Circuits.InterventionAction.NewSetTo(Value),
            InterventionAction.Scale => Transcoders.Circuits.InterventionAction.NewScaleBy(Value),
            _ => Transcoders.Circuits.InterventionAction.Ablate,
        });

    internal static Microsoft.FSharp.Collections.FSharpList<InterventionCore> ToCore(IEnumerable<FeatureIntervention> interventions)
    {
        ArgumentNullException.ThrowIfNull(interventions);
        return Interop.List(interventions.Select(i => i.ToCore()));
    }
}

/// <summary>The graph's prediction of an intervention's effect on one explained logit, next to what happened
/// (changes of the de-meaned logit).</summary>
/// <param name="Token">The logit's token.</param>
/// <param name="Predicted">The graph's linear prediction from its direct edges.</param>
/// <param name="Constrained">The change in the local replacement model (attention and normalisation frozen: the direct effect).</param>
/// <param name="Free">The change through the real model with the coders spliced in (every indirect effect included).</param>
public sealed record InterventionEffect(int Token, double Predicted, double Constrained, double Free);

/// <summary>
/// Setting, scaling and ablating features on one prompt: next-token logits constrained (through the prompt's local
/// replacement model, the direct effect a graph predicts) and free (through the real model with the coders spliced
/// in, error terms kept), and the comparison with an attribution graph's prediction. The model and coders are
/// borrowed; dispose this to free the local replacement model.
/// </summary>
public sealed class FeatureInterventions : IDisposable
{
    private readonly LocalReplacement local;

    /// <summary>Builds the local replacement model of <paramref name="tokens"/> (the one attribution graphs use).</summary>
    /// <param name="model">The model.</param>
    /// <param name="coders">Transcoders or a cross-layer transcoder replacing the MLPs.</param>
    /// <param name="tokens">The prompt's token ids.</param>
    public FeatureInterventions(LanguageModel model, IEnumerable<SparseCoder> coders, IReadOnlyList<int> tokens)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(coders);
        ArgumentNullException.ThrowIfNull(tokens);
        local = LocalReplacementCore.create(model.Core, Interop.List(coders.Select(c => c.Core)), Interop.Array(tokens));
    }

    /// <summary>The logits [positions, vocab] of the prompt without interventions (equal to the model's).</summary>
    public torch.Tensor Clean() => LocalReplacementCore.forward(local);

    /// <summary>The logits [positions, vocab] with the interventions, attention and normalisation frozen.</summary>
    /// <param name="interventions">The interventions (at single positions of the prompt).</param>
    public torch.Tensor Constrained(IEnumerable<FeatureIntervention> interventions) =>
        InterventionsCore.constrained(local, FeatureIntervention.ToCore(interventions));

    /// <summary>The logits [positions, vocab] with the interventions through the real model, coders spliced in.</summary>
    /// <param name="interventions">The interventions.</param>
    public torch.Tensor Free(IEnumerable<FeatureIntervention> interventions) =>
        InterventionsCore.free(local.Model, local.Coders, local.Tokens, FeatureIntervention.ToCore(interventions));

    /// <summary>For each logit the graph explains: the graph's predicted change next to the constrained and free
    /// changes. The intervened features must be feature nodes of <paramref name="graph"/>, built on this prompt.</summary>
    /// <param name="graph">The prompt's attribution graph.</param>
    /// <param name="interventions">The interventions (at single positions).</param>
    public IReadOnlyList<InterventionEffect> CompareWithGraph(AttributionGraph graph, IEnumerable<FeatureIntervention> interventions)
    {
        ArgumentNullException.ThrowIfNull(graph);
        return InterventionsCore.compareWithGraph(local, graph.Core, FeatureIntervention.ToCore(interventions))
            .Select(e => new InterventionEffect(e.Token, e.Predicted, e.Constrained, e.Free)).ToList();
    }

    /// <summary>Continues <paramref name="prompt"/> with the interventions applied (coders spliced in with error terms;
    /// an intervention <see cref="FeatureIntervention.FromPosition"/> steers every later token too).</summary>
    /// <param name="model">The model.</param>
    /// <param name="coders">The coders whose features are intervened on.</param>
    /// <param name="prompt">The prompt's token ids.</param>
    /// <param name="interventions">The interventions.</param>
    /// <param name="settings">How to generate; null for greedy 32 tokens.</param>
    public static GenerationResult Generate(LanguageModel model, IEnumerable<SparseCoder> coders, IReadOnlyList<int> prompt,
                                            IEnumerable<FeatureIntervention> interventions, GenerationSettings? settings = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(coders);
        ArgumentNullException.ThrowIfNull(prompt);
        return new GenerationResult(InterventionsCore.generate(model.Core, Interop.List(coders.Select(c => c.Core)),
            (settings ?? new GenerationSettings()).ToCore(), Interop.Array(prompt), FeatureIntervention.ToCore(interventions)));
    }

    /// <summary>Frees the local replacement model.</summary>
    public void Dispose() => ((IDisposable)local).Dispose();
}
