using System;
using System.Collections.Generic;
using System.Linq;
using Transcoders.Models;
using ConfigCore = Transcoders.Models.TransformerConfigModule;

namespace Transcoders;

/// <summary>How the residual stream is normalised before each sublayer and before the unembedding.</summary>
public enum NormKind
{
    /// <summary>(x − mean) / √(var + ε) · w + b, as in GPT-2.</summary>
    LayerNorm,
    /// <summary>x / √(mean(x²) + ε) · w, as in Llama.</summary>
    RmsNorm,
    /// <summary>No normalisation (tinymodel).</summary>
    None,
}

/// <summary>How token positions enter the model.</summary>
public enum PositionKind
{
    /// <summary>A learned embedding [n_ctx, d_model] added to the token embedding (GPT-2, tinymodel).</summary>
    Learned,
    /// <summary>Rotary embeddings on queries and keys (RoPE); see <see cref="ModelConfig.RotaryLayout"/> and <see cref="ModelConfig.RotaryTheta"/>.</summary>
    Rotary,
}

/// <summary>Which coordinates a rotary embedding rotates together inside a head of size d.</summary>
public enum RotaryLayoutKind
{
    /// <summary>Hugging Face's <c>rotate_half</c>: coordinate i pairs with i + d/2.</summary>
    HalfSplit,
    /// <summary>llama2.c and Meta's original code: adjacent coordinates (2i, 2i+1) pair up.</summary>
    Interleaved,
}

/// <summary>The MLP's non-linearity.</summary>
public enum ActivationKind
{
    /// <summary>GPT-2's tanh approximation of GELU (HF <c>gelu_new</c>).</summary>
    GeluNew,
    /// <summary>The exact GELU, x·Φ(x).</summary>
    Gelu,
    /// <summary>max(0, x).</summary>
    Relu,
    /// <summary>x·σ(x), the gate of SwiGLU.</summary>
    Silu,
}

/// <summary>
/// Everything needed to build a decoder-only transformer. Start from a preset (<see cref="Gpt2"/>,
/// <see cref="Llama"/>, <see cref="TinyModel"/>), set properties, then <see cref="Validate"/> (creating a model
/// validates too). Each preset call returns a new, independent object.
/// </summary>
public sealed class ModelConfig
{
    /// <summary>Width of the residual stream.</summary>
    public int DModel { get; set; }

    /// <summary>Number of transformer blocks.</summary>
    public int NLayers { get; set; }

    /// <summary>Number of query heads.</summary>
    public int NHeads { get; set; }

    /// <summary>Number of key/value heads (grouped-query attention); equal to <see cref="NHeads"/> for ordinary attention.</summary>
    public int NKvHeads { get; set; }

    /// <summary>Size of one head; null means DModel / NHeads (which must then divide evenly).</summary>
    public int? DHead { get; set; }

    /// <summary>Hidden size of the MLP.</summary>
    public int DMlp { get; set; }

    /// <summary>Context length: the longest sequence the model accepts.</summary>
    public int NCtx { get; set; }

    /// <summary>Number of token ids.</summary>
    public int VocabSize { get; set; }

    /// <summary>Normalisation before each sublayer (and before the unembedding when <see cref="FinalNorm"/>).</summary>
    public NormKind Norm { get; set; }

    /// <summary>ε inside the normalisation's square root.</summary>
    public double NormEps { get; set; }

    /// <summary>Whether the stream is normalised before the unembedding.</summary>
    public bool FinalNorm { get; set; }

    /// <summary>Learned position embeddings or rotary embeddings.</summary>
    public PositionKind Positions { get; set; }

    /// <summary>The rotary pairing of coordinates (used when <see cref="Positions"/> is <see cref="PositionKind.Rotary"/>).</summary>
    public RotaryLayoutKind RotaryLayout { get; set; }

    /// <summary>The rotary base θ (used when <see cref="Positions"/> is <see cref="PositionKind.Rotary"/>).</summary>
    public double RotaryTheta { get; set; } = 10000.0;

    /// <summary>The MLP's non-linearity.</summary>
    public ActivationKind Activation { get; set; }

    /// <summary>A gated MLP, fc_out(act(fc_gate x) ⊙ fc_in x) (SwiGLU with <see cref="ActivationKind.Silu"/>), instead of fc_out(act(fc_in x)).</summary>
    public bool GatedMlp { get; set; }

    /// <summary>Biases on the query, key and value projections.</summary>
    public bool QkvBias { get; set; }

    /// <summary>A bias on the attention output projection.</summary>
    public bool AttnOutBias { get; set; }

    /// <summary>Biases on the MLP's input projections.</summary>
    public bool MlpInBias { get; set; }

    /// <summary>A bias on the MLP's output projection.</summary>
    public bool MlpOutBias { get; set; }

    /// <summary>A bias on the unembedding.</summary>
    public bool UnembedBias { get; set; }

    /// <summary>The unembedding reuses the token embedding matrix (W_U = W_Eᵀ).</summary>
    public bool TiedUnembed { get; set; }

    /// <summary>Standard deviation of the initial weights (output projections get InitRange / √(2·NLayers)).</summary>
    public double InitRange { get; set; }

    /// <summary>Dropout probability in training mode (embeddings, attention probabilities, sublayer outputs).</summary>
    public double Dropout { get; set; }

    /// <summary>Attention and MLP both read the block's input, x + attn(ln1 x) + mlp(ln2 x) (GPT-NeoX, Pythia).</summary>
    public bool ParallelResidual { get; set; }

    /// <summary>How many leading coordinates of each head rotate (partial rotary, GPT-NeoX); null: the whole head.</summary>
    public int? RotaryDim { get; set; }

    /// <summary>GPT-2 small: pre-LayerNorm, learned positions, gelu_new, biases, tied unembedding.</summary>
    public static ModelConfig Gpt2() => FromCore(ConfigCore.gpt2);

    /// <summary>Llama's kind at the size of llama2.c's stories260K: RMSNorm, rotary (half-split), SwiGLU, grouped-query attention, no biases.</summary>
    public static ModelConfig Llama() => FromCore(ConfigCore.llama);

    /// <summary>tinymodel's kind: no normalisation, learned positions, ReLU MLP with biases, untied unembedding with a bias.</summary>
    public static ModelConfig TinyModel() => FromCore(ConfigCore.tinymodel);

    /// <summary>A copy of this configuration.</summary>
    public ModelConfig Clone() => (ModelConfig)MemberwiseClone();

    /// <summary>Every problem with this configuration, in words; empty when a model can be built from it.</summary>
    public IReadOnlyList<string> Problems() => ConfigCore.problems(ToCore()).ToList();

    /// <summary>Returns this configuration when it is valid; otherwise throws an <see cref="ArgumentException"/> listing every problem.</summary>
    public ModelConfig Validate()
    {
        ConfigCore.validate(ToCore());
        return this;
    }

    /// <summary>The head size in use (<see cref="DHead"/>, else DModel / NHeads).</summary>
    public int HeadSize => ConfigCore.dHead(ToCore());

    /// <summary>Number of parameters a model of this configuration has (tied matrices counted once).</summary>
    public long ParameterCount => ConfigCore.parameterCount(ToCore());

    /// <summary>Every hook point of a model of this configuration, in the order the forward pass reaches them.</summary>
    public IReadOnlyList<string> HookNames => Models.HookNames.all(ToCore()).ToList();

    /// <summary>A one-line summary, e.g. "d_model 64, 5 layers, 8 heads (4 kv), d_mlp 172, n_ctx 512, vocab 512".</summary>
    public override string ToString() =>
        $"d_model {DModel}, {NLayers} layers, {NHeads} heads ({NKvHeads} kv), d_mlp {DMlp}, n_ctx {NCtx}, vocab {VocabSize}";

    internal TransformerConfig ToCore()
    {
        var norm = Norm switch
        {
            NormKind.LayerNorm => Normalization.LayerNorm,
            NormKind.RmsNorm => Normalization.RMSNorm,
            NormKind.None => Normalization.NoNorm,
            _ => throw new ArgumentOutOfRangeException(nameof(Norm), Norm, "unknown normalisation"),
        };
        var positions = Positions switch
        {
            PositionKind.Learned => Models.Positions.Learned,
            PositionKind.Rotary => Models.Positions.NewRotary(RotaryLayout switch
            {
                RotaryLayoutKind.HalfSplit => Models.RotaryLayout.HalfSplit,
                RotaryLayoutKind.Interleaved => Models.RotaryLayout.Interleaved,
                _ => throw new ArgumentOutOfRangeException(nameof(RotaryLayout), RotaryLayout, "unknown rotary layout"),
            }, RotaryTheta),
            _ => throw new ArgumentOutOfRangeException(nameof(Positions), Positions, "unknown position kind"),
        };
        var activation = Activation switch
        {
            ActivationKind.GeluNew => Models.MlpActivation.GeluNew,
            ActivationKind.Gelu => Models.MlpActivation.Gelu,
            ActivationKind.Relu => Models.MlpActivation.Relu,
            ActivationKind.Silu => Models.MlpActivation.Silu,
            _ => throw new ArgumentOutOfRangeException(nameof(Activation), Activation, "unknown activation"),
        };
        var mlp = GatedMlp ? MlpKind.NewGated(activation) : MlpKind.NewPlain(activation);
        var biases = new Biases(QkvBias, AttnOutBias, MlpInBias, MlpOutBias, UnembedBias);
        return new TransformerConfig(DModel, NLayers, NHeads, NKvHeads, Interop.Some(DHead), DMlp, NCtx, VocabSize,
                                     norm, NormEps, FinalNorm, positions, mlp, biases, TiedUnembed, InitRange, Dropout,
                                     ParallelResidual, Interop.Some(RotaryDim));
    }

    internal static ModelConfig FromCore(TransformerConfig c)
    {
        var (gated, activation) = c.Mlp switch
        {
            MlpKind.Plain p => (false, p.Item),
            MlpKind.Gated g => (true, g.Item),
            _ => throw new ArgumentOutOfRangeException(nameof(c), "unknown MLP kind"),
        };
        var config = new ModelConfig
        {
            DModel = c.DModel, NLayers = c.NLayers, NHeads = c.NHeads, NKvHeads = c.NKvHeads, DHead = Interop.Nullable(c.DHead),
            DMlp = c.DMlp, NCtx = c.NCtx, VocabSize = c.VocabSize,
            Norm = c.Norm.IsLayerNorm ? NormKind.LayerNorm : c.Norm.IsRMSNorm ? NormKind.RmsNorm : NormKind.None,
            NormEps = c.NormEps, FinalNorm = c.FinalNorm,
            Positions = c.Positions.IsRotary ? PositionKind.Rotary : PositionKind.Learned,
            Activation = activation.IsGeluNew ? ActivationKind.GeluNew
                       : activation.IsGelu ? ActivationKind.Gelu
                       : activation.IsRelu ? ActivationKind.Relu
                       : ActivationKind.Silu,
            GatedMlp = gated,
            QkvBias = c.Biases.Qkv, AttnOutBias = c.Biases.AttnOut, MlpInBias = c.Biases.MlpIn, MlpOutBias = c.Biases.MlpOut,
            UnembedBias = c.Biases.Unembed,
            TiedUnembed = c.TiedUnembed, InitRange = c.InitRange, Dropout = c.Dropout,
            ParallelResidual = c.ParallelResidual, RotaryDim = Interop.Nullable(c.RotaryDim),
        };
        if (c.Positions is Models.Positions.Rotary rotary)
        {
            config.RotaryLayout = rotary.layout.IsHalfSplit ? RotaryLayoutKind.HalfSplit : RotaryLayoutKind.Interleaved;
            config.RotaryTheta = rotary.theta;
        }
        return config;
    }
}
