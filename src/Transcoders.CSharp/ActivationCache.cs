using System;
using System.Collections;
using System.Collections.Generic;
using System.Diagnostics.CodeAnalysis;
using System.Linq;
using TorchSharp;
using Transcoders.Models;

namespace Transcoders;

/// <summary>
/// What a hooked run returns: the logits (or the residual stream where the run stopped) and the cached
/// activations by hook name, as TransformerLens' <c>ActivationCache</c>. It owns every tensor: dispose it to
/// free them all (take a tensor out with <c>.clone()</c> or <c>.alias()</c> to keep it longer).
/// </summary>
public sealed class ActivationCache : IReadOnlyDictionary<string, torch.Tensor>, IDisposable
{
    private readonly RunResult result;

    internal ActivationCache(RunResult result) => this.result = result;

    /// <summary>Logits [batch, pos, vocab]; null when the run stopped early (<see cref="RunSettings.StopAtLayer"/>).</summary>
    public torch.Tensor? Logits => Interop.OrNull(result.Logits);

    /// <summary>The residual stream [batch, pos, d_model] where the run stopped; null unless <see cref="RunSettings.StopAtLayer"/> was set.</summary>
    public torch.Tensor? Residual => Interop.OrNull(result.Residual);

    /// <summary>A cached activation; an <see cref="ArgumentException"/> listing the cached names when it was not cached.</summary>
    /// <param name="name">A hook point's name.</param>
    public torch.Tensor this[string name] => result[name];

    /// <summary>The cached hook names.</summary>
    public IEnumerable<string> Keys => result.Cache.Keys;

    /// <summary>The cached activations.</summary>
    public IEnumerable<torch.Tensor> Values => result.Cache.Values;

    /// <summary>Number of cached activations.</summary>
    public int Count => result.Cache.Count;

    /// <summary>Whether <paramref name="key"/> was cached.</summary>
    /// <param name="key">A hook point's name.</param>
    public bool ContainsKey(string key) => result.Cache.ContainsKey(key);

    /// <summary>The activation cached at <paramref name="key"/>, if any.</summary>
    /// <param name="key">A hook point's name.</param>
    /// <param name="value">The activation, or null.</param>
    public bool TryGetValue(string key, [MaybeNullWhen(false)] out torch.Tensor value) => result.Cache.TryGetValue(key, out value);

    /// <summary>The cached (name, activation) pairs, by name.</summary>
    public IEnumerator<KeyValuePair<string, torch.Tensor>> GetEnumerator() =>
        ((IEnumerable<KeyValuePair<string, torch.Tensor>>)result.Cache).GetEnumerator();

    IEnumerator IEnumerable.GetEnumerator() => GetEnumerator();

    /// <summary>Frees the logits, the residual and every cached activation.</summary>
    public void Dispose() => ((IDisposable)result).Dispose();
}

/// <summary>What a hooked run caches, which hooks it runs, and where it stops.</summary>
public sealed class RunSettings
{
    /// <summary>Hook points to cache: exact names or globs with <c>*</c> (e.g. <c>"blocks.*.hook_resid_pre"</c>).</summary>
    public ICollection<string> Cache { get; set; } = new List<string>();

    /// <summary>
    /// Functions run at hook points (exact names or globs): each gets the activation and returns it, or a
    /// replacement of the same shape. Tensors a hook sees are disposed when the run ends.
    /// </summary>
    public IDictionary<string, Func<torch.Tensor, torch.Tensor>> Hooks { get; set; } = new Dictionary<string, Func<torch.Tensor, torch.Tensor>>();

    /// <summary>Return the residual stream entering this layer (after its hook_resid_pre) and compute no logits; n_layers gives the stream after the last block.</summary>
    public int? StopAtLayer { get; set; }

    /// <summary>Cache values detached from autograd (true, as TransformerLens) or still in the graph (false).</summary>
    public bool DetachCache { get; set; } = RunOptions.Default.DetachCache;

    internal RunOptions ToCore() =>
        new(Interop.Set(Cache ?? []), Interop.Hooks(Hooks), Interop.Some(StopAtLayer), DetachCache);
}

/// <summary>
/// Keys and values of the positions a model has already processed, so that each new token costs one position
/// of work (<see cref="LanguageModel.LogitsCached"/>). Dispose it when done.
/// </summary>
public sealed class KeyValueCache : IDisposable
{
    internal KvCache Core { get; }

    internal KeyValueCache(KvCache core) => Core = core;

    /// <summary>Positions stored so far (the position of the next token).</summary>
    public int Length => Core.Length;

    /// <summary>The most positions it can hold.</summary>
    public int Capacity => Core.Capacity;

    /// <summary>Number of sequences.</summary>
    public int Batch => Core.Batch;

    /// <summary>Forgets every position (the buffers are reused).</summary>
    public void Reset() => Core.Reset();

    /// <summary>Frees the buffers.</summary>
    public void Dispose() => ((IDisposable)Core).Dispose();
}
