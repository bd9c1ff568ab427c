using System;
using System.Collections.Generic;
using TorchSharp;
using GenerationCore = Transcoders.Models.Generation;

namespace Transcoders;

/// <summary>What to do when a sequence would outgrow the context length n_ctx.</summary>
public enum ContextOverflow
{
    /// <summary>Refuse up front when prompt + MaxNewTokens exceeds n_ctx (a clear error).</summary>
    Fail,
    /// <summary>Keep going on the last n_ctx tokens (nanoGPT's crop), re-running each window without the KV cache.</summary>
    SlidingWindow,
}

/// <summary>How to generate. The defaults are greedy decoding of 32 tokens with the KV cache.</summary>
public sealed class GenerationSettings
{
    private static readonly GenerationCore.GenerateOptions Defaults = GenerationCore.GenerateOptions.Greedy;

    /// <summary>Tokens to add at most.</summary>
    public int MaxNewTokens { get; set; } = Defaults.MaxNewTokens;

    /// <summary>0 picks the most likely token (greedy); otherwise logits are divided by it before sampling.</summary>
    public double Temperature { get; set; } = Defaults.Temperature;

    /// <summary>Sample only among the k most likely tokens; null for all.</summary>
    public int? TopK { get; set; }

    /// <summary>Seed of a private generator (reproducible on the CPU); null draws from torch's global generator.</summary>
    public long? Seed { get; set; }

    /// <summary>Generation stops after emitting one of these (it is included in the output).</summary>
    public ICollection<int> StopTokens { get; set; } = new List<int>();

    /// <summary>Reuse earlier positions' keys and values (one position of work per step); the logits are the same either way.</summary>
    public bool UseKvCache { get; set; } = Defaults.UseKvCache;

    /// <summary>What to do when the sequence would outgrow n_ctx.</summary>
    public ContextOverflow Overflow { get; set; } = Defaults.Overflow.IsSlidingWindow ? ContextOverflow.SlidingWindow : ContextOverflow.Fail;

    /// <summary>
    /// Hooks run at every step (exact names or globs; see <see cref="Transcoders.Hooks"/>), for steering or ablation while
    /// generating. With the KV cache a hook sees only the step's new positions.
    /// </summary>
    public IDictionary<string, Func<torch.Tensor, torch.Tensor>> Hooks { get; set; } = new Dictionary<string, Func<torch.Tensor, torch.Tensor>>();

    /// <summary>Greedy decoding of up to <paramref name="maxNewTokens"/> tokens.</summary>
    /// <param name="maxNewTokens">Tokens to add at most.</param>
    public static GenerationSettings Greedy(int maxNewTokens) => new() { MaxNewTokens = maxNewTokens };

    /// <summary>Sampling at <paramref name="temperature"/>, optionally among the top k, with a seed for reproducibility.</summary>
    /// <param name="maxNewTokens">Tokens to add at most.</param>
    /// <param name="temperature">Temperature (above 0).</param>
    /// <param name="topK">Sample among the k most likely tokens; null for all.</param>
    /// <param name="seed">Seed of a private generator; null for torch's global one.</param>
    public static GenerationSettings Sampling(int maxNewTokens, double temperature, int? topK = null, long? seed = null) =>
        new() { MaxNewTokens = maxNewTokens, Temperature = temperature, TopK = topK, Seed = seed };

    internal GenerationCore.GenerateOptions ToCore() =>
        new(MaxNewTokens, Temperature, Interop.Some(TopK), Interop.Some(Seed), Interop.Set(StopTokens ?? []), UseKvCache,
            Overflow switch
            {
                ContextOverflow.Fail => GenerationCore.ContextOverflow.Fail,
                ContextOverflow.SlidingWindow => GenerationCore.ContextOverflow.SlidingWindow,
                _ => throw new ArgumentOutOfRangeException(nameof(Overflow), Overflow, "unknown overflow policy"),
            },
            Interop.Hooks(Hooks));
}

/// <summary>A generated sequence.</summary>
public sealed class GenerationResult
{
    internal GenerationResult(GenerationCore.Generated core)
    {
        Tokens = core.Tokens;
        PromptLength = core.PromptLength;
        StopToken = core.Stop is GenerationCore.StopReason.StopToken stop ? stop.Item : null;
    }

    /// <summary>The prompt followed by the new tokens.</summary>
    public int[] Tokens { get; }

    /// <summary>Number of prompt tokens at the start of <see cref="Tokens"/>.</summary>
    public int PromptLength { get; }

    /// <summary>The generated tokens (after the prompt).</summary>
    public int[] NewTokens => Tokens[PromptLength..];

    /// <summary>The stop token that ended generation, or null when MaxNewTokens tokens were added.</summary>
    public int? StopToken { get; }
}
