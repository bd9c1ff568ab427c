using System;
using System.Collections.Generic;
using System.Linq;
using Microsoft.FSharp.Core;
using TorchSharp;
using Parameter = TorchSharp.Modules.Parameter;
using Transcoders.Coders;
using CoderCore = Transcoders.Coders.Coder;
using CoderModule = Transcoders.Coders.CoderModule;
using CoderActivation = Transcoders.Coders.CoderActivation;

namespace Transcoders;

/// <summary>What a sparse coder reads and predicts.</summary>
public enum SparseCoderKind
{
    /// <summary>Sparse autoencoder: reconstructs the hook point it reads.</summary>
    Sae,
    /// <summary>Per-layer transcoder: reads the MLP input, predicts the MLP output.</summary>
    Transcoder,
    /// <summary>Transcoder with an affine skip path W_skip·x.</summary>
    SkipTranscoder,
    /// <summary>Cross-layer transcoder: an encoder per layer, decoders to every later layer's MLP output.</summary>
    CrossLayerTranscoder,
}

/// <summary>The activation function that turns a coder's pre-activations into feature activations.</summary>
public enum SparseCoderActivation
{
    /// <summary>ReLU (trained with an L1 penalty).</summary>
    ReLU,
    /// <summary>JumpReLU: a learned per-feature threshold (Anthropic's recipe).</summary>
    JumpReLU,
    /// <summary>Keep the k largest pre-activations of each token.</summary>
    TopK,
    /// <summary>Keep the k·B largest pre-activations of a batch of B tokens (k per token on average).</summary>
    BatchTopK,
    /// <summary>k contiguous groups of features; each token keeps the largest of every group.</summary>
    GroupMax,
}

/// <summary>
/// A trained (or fresh) sparse coder: an SAE, a transcoder, a skip transcoder or a cross-layer transcoder, in the
/// model's units. Files are safetensors + JSON with SAELens-style keys (see docs/formats.md). Dispose it to free
/// its weights; tensors it returns belong to the caller.
/// </summary>
public sealed class SparseCoder : IDisposable
{
    internal CoderCore Core { get; }

    internal SparseCoder(CoderCore core) => Core = core;

    /// <summary>
    /// Loads a coder saved by <see cref="Save"/>, <c>train-coder</c> or <see cref="CoderTrainer"/>: a folder with
    /// coder.safetensors + coder.json, or either file. Fails with a <c>CoderFileError</c> naming the file and key.
    /// </summary>
    /// <param name="path">The coder's folder or file.</param>
    /// <param name="device">Where to put the weights; null for the CPU.</param>
    public static SparseCoder Load(string path, torch.Device? device = null)
    {
        ArgumentNullException.ThrowIfNull(path);
        return new SparseCoder(CoderFile.load(path, device ?? torch.CPU));
    }

    /// <summary>
    /// A freshly initialised per-layer transcoder of layer <paramref name="layer"/> (reads
    /// <c>blocks.{layer}.ln2.hook_normalized</c>, predicts <c>blocks.{layer}.hook_mlp_out</c>) with TopK
    /// activation. <see cref="Torch.Seed"/> makes it reproducible.
    /// </summary>
    /// <param name="model">The model's name, recorded in the config.</param>
    /// <param name="layer">The layer.</param>
    /// <param name="dModel">The model's width.</param>
    /// <param name="features">Features (d_sae).</param>
    /// <param name="k">Features kept per token.</param>
    /// <param name="device">Where to put the weights; null for the CPU.</param>
    public static SparseCoder CreateTranscoder(string model, int layer, int dModel, int features, int k, torch.Device? device = null) =>
        Create(SparseCoderKind.Transcoder, model, [layer], dModel, features, SparseCoderActivation.TopK, k, null, device);

    /// <summary>
    /// A freshly initialised coder of any kind with any activation: an SAE on <paramref name="hook"/> (default the
    /// layer's <c>hook_mlp_out</c>), a transcoder or skip transcoder of the layer's MLP (one layer), or a cross-layer
    /// transcoder over <paramref name="layers"/> (an encoder per layer, decoders to its own and every later MLP output;
    /// free decoder norms with JumpReLU, unit norms otherwise). <see cref="Torch.Seed"/> makes it reproducible.
    /// Invalid settings (a k larger than the width, a GroupMax k that does not divide it, several layers for a
    /// per-layer kind) fail with a message naming the field.
    /// </summary>
    /// <param name="kind">The kind of coder.</param>
    /// <param name="model">The model's name, recorded in the config.</param>
    /// <param name="layers">The layer (one) or, for a cross-layer transcoder, the ascending layers.</param>
    /// <param name="dModel">The width of the hook points read and predicted.</param>
    /// <param name="features">Features per layer (d_sae).</param>
    /// <param name="activation">The activation function.</param>
    /// <param name="k">Features kept per token for TopK, BatchTopK and GroupMax (ignored otherwise).</param>
    /// <param name="hook">The hook point an SAE reads and reconstructs; null for the layer's MLP output.</param>
    /// <param name="device">Where to put the weights; null for the CPU.</param>
    public static SparseCoder Create(SparseCoderKind kind, string model, IReadOnlyList<int> layers, int dModel, int features,
                                     SparseCoderActivation activation = SparseCoderActivation.TopK, int k = 32, string? hook = null,
                                     torch.Device? device = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(layers);
        var coreKind = kind switch
        {
            SparseCoderKind.Sae => CoderKind.Sae,
            SparseCoderKind.Transcoder => CoderKind.Transcoder,
            SparseCoderKind.SkipTranscoder => CoderKind.SkipTranscoder,
            SparseCoderKind.CrossLayerTranscoder => CoderKind.CrossLayerTranscoder,
            _ => throw new ArgumentOutOfRangeException(nameof(kind), kind, "not a coder kind"),
        };
        var config = CoderRun.coderConfig(coreKind, model, Interop.Array(layers), hook is null ? FSharpOption<string>.None : FSharpOption<string>.Some(hook),
            dModel, features, CoderRun.activation(activation.ToString(), k));
        return new SparseCoder(CoderModule.create(config, device ?? torch.CPU));
    }

    /// <summary>Saves the coder (activation scales folded into the weights) as coder.safetensors + coder.json in
    /// <paramref name="folder"/>, each written atomically.</summary>
    /// <param name="folder">The folder to write.</param>
    public void Save(string folder)
    {
        ArgumentNullException.ThrowIfNull(folder);
        CoderFile.save(folder, Core);
    }

    /// <summary>The kind of coder.</summary>
    public SparseCoderKind Kind => Core.Config.Kind switch
    {
        var k when k.IsSae => SparseCoderKind.Sae,
        var k when k.IsTranscoder => SparseCoderKind.Transcoder,
        var k when k.IsSkipTranscoder => SparseCoderKind.SkipTranscoder,
        _ => SparseCoderKind.CrossLayerTranscoder,
    };

    /// <summary>The model layers it belongs to (one, except for a cross-layer transcoder).</summary>
    public IReadOnlyList<int> Layers => Core.Config.Layers;

    /// <summary>The hook point read at each layer (TransformerLens names).</summary>
    public IReadOnlyList<string> HookIn => Core.Config.HookIn;

    /// <summary>The hook point predicted at each layer.</summary>
    public IReadOnlyList<string> HookOut => Core.Config.HookOut;

    /// <summary>Input width.</summary>
    public int DIn => Core.Config.DIn;

    /// <summary>Output width.</summary>
    public int DOut => Core.Config.DOut;

    /// <summary>Features per layer (d_sae).</summary>
    public int Features => Core.Config.DSae;

    /// <summary>The activation function, e.g. <c>TopK 16</c>, <c>ReLU</c>, <c>JumpReLU</c>.</summary>
    public string Activation => Core.Config.Activation switch
    {
        CoderActivation.TopK t => $"TopK {t.k}",
        CoderActivation.BatchTopK b => $"BatchTopK {b.k}",
        CoderActivation.GroupMax g => $"GroupMax {g.k}",
        var a when a.IsReLU => "ReLU",
        _ => "JumpReLU",
    };

    /// <summary>The configuration as coder.json holds it.</summary>
    public string ConfigJson => CoderConfigModule.toJson(Core.Config);

    /// <summary>The device of the weights.</summary>
    public torch.Device Device => Core.Device;

    /// <summary>Trainable parameters with their (layer-major) names, e.g. <c>W_enc</c>, <c>W_dec_0</c>, <c>b_dec</c>.</summary>
    public IReadOnlyList<KeyValuePair<string, Parameter>> NamedParameters =>
        Core.NamedParameters.Select(p => KeyValuePair.Create(p.Item1, p.Item2)).ToList();

    /// <summary>Feature activations [..., features] of inputs [..., d_in] (for a cross-layer transcoder
    /// [..., layers, features] of [..., layers, d_in]), in the model's units.</summary>
    /// <param name="x">Inputs at the coder's input hook.</param>
    public torch.Tensor Encode(torch.Tensor x) => Core.Encode(x);

    /// <summary>Predictions [..., d_out] from feature activations; a skip transcoder also needs its input.</summary>
    /// <param name="activations">Feature activations.</param>
    /// <param name="x">The input (skip transcoders only).</param>
    public torch.Tensor Decode(torch.Tensor activations, torch.Tensor? x = null) =>
        Core.Decode(activations, x is null ? FSharpOption<torch.Tensor>.None : FSharpOption<torch.Tensor>.Some(x));

    /// <summary>The prediction [..., d_out] of inputs [..., d_in].</summary>
    /// <param name="x">Inputs at the coder's input hook.</param>
    public torch.Tensor Forward(torch.Tensor x) => Core.Forward(x);

    /// <summary>Frees the weights.</summary>
    public void Dispose() => ((IDisposable)Core).Dispose();
}
