using System;
using System.Collections.Generic;
using System.Linq;
using System.Text.Json;
using Microsoft.FSharp.Core;
using TorchSharp;
using Parameter = TorchSharp.Modules.Parameter;
using Transformer = Transcoders.Models.Transformer;
using Transcoders.Models;
using GenerationCore = Transcoders.Models.Generation;
using TokenizerCore = Transcoders.Text.TokenizerModule;
using TransformerCore = Transcoders.Models.TransformerModule;

namespace Transcoders;

/// <summary>The kinds of checkpoint <see cref="LanguageModel.Load"/> reads.</summary>
public enum CheckpointFormat
{
    /// <summary>Our folder format (config.json + model.safetensors), written by <see cref="LanguageModel.Save"/>.</summary>
    Native,
    /// <summary>A Hugging Face folder (GPT-2 or Llama).</summary>
    HuggingFace,
    /// <summary>A llama2.c <c>.bin</c> file.</summary>
    Llama2c,
}

/// <summary>What a checkpoint holds, read from its configuration or header only (see <see cref="LanguageModel.Inspect"/>).</summary>
/// <param name="Path">The checkpoint's path.</param>
/// <param name="Format">Its format.</param>
/// <param name="Architecture">The Hugging Face architecture name (e.g. "GPT2LMHeadModel"); null for other formats.</param>
/// <param name="Config">The model's configuration.</param>
/// <param name="ParameterCount">Number of parameters (tied matrices counted once).</param>
/// <param name="TokenizerJson">The tokenizer description saved with our format, or null.</param>
/// <param name="TrainingJson">The training description saved with our format, or null.</param>
public sealed record ModelInfo(string Path, CheckpointFormat Format, string? Architecture, ModelConfig Config, long ParameterCount,
                               string? TokenizerJson, string? TrainingJson);

/// <summary>
/// A decoder-only transformer language model (GPT-2, Llama, tinymodel and mixtures) with TransformerLens-style
/// hook points: logits, runs with an activation cache or with hooks, KV-cached decoding, generation, and our
/// checkpoint format. Loads our folders, Hugging Face folders and llama2.c files. Dispose it to free its weights.
/// Tensors it returns belong to the caller.
/// </summary>
public sealed class LanguageModel : IDisposable
{
    private readonly FSharpOption<JsonElement> training;

    internal Transformer Core { get; }

    internal LanguageModel(Transformer core, TextTokenizer? tokenizer, FSharpOption<JsonElement>? training)
    {
        Core = core;
        Tokenizer = tokenizer;
        this.training = training ?? FSharpOption<JsonElement>.None;
    }

    // ------------------------------------------------------------------------------------------ loading

    /// <summary>
    /// Loads any supported checkpoint onto <paramref name="device"/> (default CPU), in eval mode: a folder of our
    /// format (with its tokenizer, when one was saved), a Hugging Face folder, or a llama2.c <c>.bin</c> file.
    /// Fails with a <c>CheckpointError</c> naming the file and the problem.
    /// </summary>
    /// <param name="path">A model folder or a llama2.c file.</param>
    /// <param name="device">Where to put the weights; null for the CPU.</param>
    /// <param name="transformerLensProcessing">Apply TransformerLens' weight processing after loading (LayerNorms
    /// folded, writing weights and unembedding centred; same log-probabilities), as the transcoder paper's GPT-2
    /// transcoders expect. LayerNorm models only.</param>
    public static LanguageModel Load(string path, torch.Device? device = null, bool transformerLensProcessing = false)
    {
        var options = new LoadOptions(false, transformerLensProcessing ? ProcessWeights.TransformerLens : ProcessWeights.AsStored);
        var (model, metadata) = ModelFiles.loadWith(options, path, device ?? torch.CPU);
        try
        {
            TextTokenizer? tokenizer = null;
            if (FSharpOption<JsonElement>.get_IsSome(metadata.Tokenizer))
                tokenizer = new TextTokenizer(TokenizerCore.ofJsonElement(Checkpoint.configPath(path), metadata.Tokenizer.Value));
            return new LanguageModel(model, tokenizer, metadata.Training);
        }
        catch
        {
            model.Dispose();
            throw;
        }
    }

    /// <summary>
    /// A model with freshly initialised weights (GPT-2's scheme) on <paramref name="device"/> (default CPU), in
    /// training mode as PyTorch modules start. <see cref="Torch.Seed"/> makes it reproducible. Validates the configuration.
    /// </summary>
    /// <param name="config">The configuration.</param>
    /// <param name="device">Where to put the weights; null for the CPU.</param>
    public static LanguageModel Create(ModelConfig config, torch.Device? device = null)
    {
        ArgumentNullException.ThrowIfNull(config);
        return new LanguageModel(TransformerCore.create(config.ToCore(), device ?? torch.CPU), null, null);
    }

    /// <summary>Describes a checkpoint from its config.json or header, without reading the weights.</summary>
    /// <param name="path">A model folder or a llama2.c file.</param>
    public static ModelInfo Inspect(string path)
    {
        var i = ModelFiles.inspect(path);
        var (format, architecture) = i.Kind switch
        {
            ModelFiles.CheckpointKind.HuggingFace hf => (CheckpointFormat.HuggingFace, hf.architecture),
            _ when i.Kind.IsLlama2c => (CheckpointFormat.Llama2c, (string?)null),
            _ => (CheckpointFormat.Native, null),
        };
        static string? Raw(FSharpOption<JsonElement>? e) => FSharpOption<JsonElement>.get_IsSome(e) ? e!.Value.GetRawText() : null;
        return new ModelInfo(i.Path, format, architecture, ModelConfig.FromCore(i.Config), i.ParameterCount, Raw(i.Tokenizer), Raw(i.Training));
    }

    /// <summary>
    /// Saves the model in our format into <paramref name="folder"/> (created if needed): model.safetensors and
    /// config.json, each written atomically, with <see cref="Tokenizer"/> (when set) so that <see cref="Load"/>
    /// brings it back.
    /// </summary>
    /// <param name="folder">The folder to write.</param>
    public void Save(string folder)
    {
        var tokenizer = Tokenizer is null
            ? FSharpOption<JsonElement>.None
            : FSharpOption<JsonElement>.Some(JsonSerializer.SerializeToElement(TokenizerCore.toJson(Tokenizer.Core)));
        Checkpoint.save(folder, new Checkpoint.Metadata(tokenizer, training), Core);
    }

    // ------------------------------------------------------------------------------------------ description

    /// <summary>The tokenizer saved with the model (our format), or the one you set; null when unknown.</summary>
    public TextTokenizer? Tokenizer { get; set; }

    /// <summary>A copy of the model's configuration.</summary>
    public ModelConfig Config => ModelConfig.FromCore(Core.Config);

    /// <summary>The device of the weights.</summary>
    public torch.Device Device => Core.Device;

    /// <summary>Number of parameters (tied matrices counted once).</summary>
    public long ParameterCount => TransformerCore.parameterCount(Core);

    /// <summary>Every hook point of this model, in the order the forward pass reaches them.</summary>
    public IReadOnlyList<string> HookNames => Models.HookNames.all(Core.Config).ToList();

    /// <summary>Named parameters in registration order (the names our checkpoints use, e.g. <c>blocks.0.attn.q.weight</c>).</summary>
    public IReadOnlyList<KeyValuePair<string, Parameter>> NamedParameters =>
        TransformerCore.parameters(Core).Select(p => KeyValuePair.Create(p.Item1, p.Item2)).ToList();

    /// <summary>The underlying TorchSharp module (for optimizers, <c>train()</c>/<c>eval()</c>, moving, state dicts).</summary>
    public torch.nn.Module<torch.Tensor, torch.Tensor> Module => Core;

    /// <summary>Hook points that <paramref name="pattern"/> (a name or a glob with <c>*</c>) selects; a clear error when none.</summary>
    /// <param name="pattern">A hook name or glob.</param>
    public IReadOnlyList<string> ResolveHooks(string pattern) => Models.HookNames.resolve(Core.Config, pattern).ToList();

    // ------------------------------------------------------------------------------------------ forward passes

    /// <summary>Logits [batch, pos, vocab] of token ids [batch, pos] or [pos] (any integer dtype, on the model's device).</summary>
    /// <param name="tokens">Token ids.</param>
    public torch.Tensor Logits(torch.Tensor tokens) => TransformerCore.forward(Core, tokens);

    /// <summary>Logits [1, pos, vocab] of one sequence of token ids.</summary>
    /// <param name="tokens">Token ids.</param>
    public torch.Tensor Logits(long[] tokens)
    {
        using var t = Interop.Tokens(tokens, Device);
        return Logits(t);
    }

    /// <summary>Logits [1, pos, vocab] of one sequence of token ids.</summary>
    /// <param name="tokens">Token ids.</param>
    public torch.Tensor Logits(int[] tokens)
    {
        using var t = Interop.Tokens(tokens, Device);
        return Logits(t);
    }

    /// <summary>Logits and the activations at <paramref name="hookNames"/> (names or globs), as TransformerLens' <c>run_with_cache</c>.</summary>
    /// <param name="tokens">Token ids [batch, pos] or [pos].</param>
    /// <param name="hookNames">Hook points to cache (see <see cref="Hooks"/>).</param>
    public ActivationCache RunWithCache(torch.Tensor tokens, IEnumerable<string> hookNames) =>
        new(TransformerCore.runWithCache(Core, hookNames, tokens));

    /// <summary>Logits and the activations at <paramref name="hookNames"/> for one sequence.</summary>
    /// <param name="tokens">Token ids.</param>
    /// <param name="hookNames">Hook points to cache (see <see cref="Hooks"/>).</param>
    public ActivationCache RunWithCache(int[] tokens, IEnumerable<string> hookNames)
    {
        using var t = Interop.Tokens(tokens, Device);
        return RunWithCache(t, hookNames);
    }

    /// <summary>Logits and the activations at <paramref name="hookNames"/> for one sequence.</summary>
    /// <param name="tokens">Token ids.</param>
    /// <param name="hookNames">Hook points to cache (see <see cref="Hooks"/>).</param>
    public ActivationCache RunWithCache(long[] tokens, IEnumerable<string> hookNames)
    {
        using var t = Interop.Tokens(tokens, Device);
        return RunWithCache(t, hookNames);
    }

    /// <summary>
    /// Logits of a run with functions at hook points (names or globs), as TransformerLens' <c>run_with_hooks</c>:
    /// each function gets the activation and returns it or a same-shaped replacement (patching, ablation, steering).
    /// </summary>
    /// <param name="tokens">Token ids [batch, pos] or [pos].</param>
    /// <param name="hooks">Hook point → function (a dictionary, or pairs in order).</param>
    public torch.Tensor RunWithHooks(torch.Tensor tokens, IEnumerable<KeyValuePair<string, Func<torch.Tensor, torch.Tensor>>> hooks) =>
        TransformerCore.runWithHooks(Core, Interop.Hooks(hooks), tokens);

    /// <summary>Logits of one sequence run with functions at hook points.</summary>
    /// <param name="tokens">Token ids.</param>
    /// <param name="hooks">Hook point → function (a dictionary, or pairs in order).</param>
    public torch.Tensor RunWithHooks(int[] tokens, IEnumerable<KeyValuePair<string, Func<torch.Tensor, torch.Tensor>>> hooks)
    {
        using var t = Interop.Tokens(tokens, Device);
        return RunWithHooks(t, hooks);
    }

    /// <summary>Logits of one sequence run with functions at hook points.</summary>
    /// <param name="tokens">Token ids.</param>
    /// <param name="hooks">Hook point → function (a dictionary, or pairs in order).</param>
    public torch.Tensor RunWithHooks(long[] tokens, IEnumerable<KeyValuePair<string, Func<torch.Tensor, torch.Tensor>>> hooks)
    {
        using var t = Interop.Tokens(tokens, Device);
        return RunWithHooks(t, hooks);
    }

    /// <summary>A forward pass with caching, hooks and early stopping together (see <see cref="RunSettings"/>).</summary>
    /// <param name="tokens">Token ids [batch, pos] or [pos].</param>
    /// <param name="settings">What to cache, which hooks to run, where to stop.</param>
    public ActivationCache Run(torch.Tensor tokens, RunSettings settings) =>
        new(TransformerCore.run(Core, (settings ?? throw new ArgumentNullException(nameof(settings))).ToCore(), tokens));

    /// <summary>A forward pass of one sequence with caching, hooks and early stopping together.</summary>
    /// <param name="tokens">Token ids.</param>
    /// <param name="settings">What to cache, which hooks to run, where to stop.</param>
    public ActivationCache Run(int[] tokens, RunSettings settings)
    {
        using var t = Interop.Tokens(tokens, Device);
        return Run(t, settings);
    }

    /// <summary>Mean cross-entropy (nats) of predicting tokens[:, 1:] from logits[:, :-1].</summary>
    /// <param name="logits">Logits [batch, pos, vocab].</param>
    /// <param name="tokens">The token ids [batch, pos] (or [pos]) the logits were computed from.</param>
    public static torch.Tensor NextTokenLoss(torch.Tensor logits, torch.Tensor tokens) => TransformerCore.nextTokenLoss(logits, tokens);

    // ------------------------------------------------------------------------------------------ KV cache

    /// <summary>An empty KV cache for <paramref name="batch"/> sequences of up to <paramref name="capacity"/> positions (at most n_ctx).</summary>
    /// <param name="batch">Number of sequences.</param>
    /// <param name="capacity">Most positions (≤ n_ctx).</param>
    public KeyValueCache CreateKvCache(int batch, int capacity) => new(TransformerCore.kvCache(Core, batch, capacity));

    /// <summary>
    /// Logits [batch, new, vocab] of new tokens [batch, new] continuing the cached positions; the cache then holds
    /// them too. Same logits as a full forward pass over the whole sequence. Use under <c>torch.no_grad()</c>.
    /// </summary>
    /// <param name="cache">The KV cache (from <see cref="CreateKvCache"/>).</param>
    /// <param name="tokens">The new token ids.</param>
    public torch.Tensor LogitsCached(KeyValueCache cache, torch.Tensor tokens) => TransformerCore.forwardCached(Core, cache.Core, tokens);

    /// <summary>As <see cref="LogitsCached"/>, with hooks and caching (hooks see only the new positions).</summary>
    /// <param name="cache">The KV cache (from <see cref="CreateKvCache"/>).</param>
    /// <param name="tokens">The new token ids.</param>
    /// <param name="settings">What to cache and which hooks to run (StopAtLayer is refused with a KV cache).</param>
    public ActivationCache RunCached(KeyValueCache cache, torch.Tensor tokens, RunSettings settings) =>
        new(TransformerCore.runCached(Core, cache.Core, (settings ?? throw new ArgumentNullException(nameof(settings))).ToCore(), tokens));

    // ------------------------------------------------------------------------------------------ generation

    /// <summary>Continues <paramref name="prompt"/> (token ids; at least one, e.g. BOS). Greedy 32 tokens by default.</summary>
    /// <param name="prompt">The prompt's token ids.</param>
    /// <param name="settings">How to generate; null for the defaults.</param>
    public GenerationResult Generate(IReadOnlyList<int> prompt, GenerationSettings? settings = null)
    {
        ArgumentNullException.ThrowIfNull(prompt);
        return new GenerationResult(GenerationCore.generate(Core, (settings ?? new GenerationSettings()).ToCore(), Interop.Array(prompt)));
    }

    /// <summary>
    /// Continues a text prompt: encodes it as a document starting with BOS (when the tokenizer has one),
    /// generates, and returns the decoded text of the whole sequence, prompt included (as TransformerLens does).
    /// </summary>
    /// <param name="prompt">The prompt text (may be empty when the tokenizer has a BOS).</param>
    /// <param name="tokenizer">The model's tokenizer.</param>
    /// <param name="settings">How to generate; null for the defaults.</param>
    public string Generate(string prompt, TextTokenizer tokenizer, GenerationSettings? settings = null)
    {
        ArgumentNullException.ThrowIfNull(tokenizer);
        var result = Generate(tokenizer.EncodeDocument(prompt, addBos: true, addEos: false), settings);
        return tokenizer.Decode(result.Tokens);
    }

    /// <summary>Frees the model's weights.</summary>
    public void Dispose() => Core.Dispose();
}
