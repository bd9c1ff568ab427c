using System.Collections.Generic;
using System.Linq;
using Names = Transcoders.Models.HookNames;

namespace Transcoders;

/// <summary>
/// Hook point names, as in TransformerLens (<c>Hooks.ResidPre(2)</c> is <c>"blocks.2.hook_resid_pre"</c>). Wherever
/// a hook name is taken, a glob with <c>*</c> also works (<c>"blocks.*.hook_resid_pre"</c>). Shapes (b = batch,
/// p = positions, h = query heads, k = key/value heads, d = d_model, e = d_head, m = d_mlp): embeddings, residual
/// streams and sublayer outputs [b,p,d]; norm scales [b,p,1]; q [b,p,h,e]; k, v [b,p,k,e]; attention scores and
/// pattern [b,h,p,p]; z [b,p,h,e]; MLP pre/post activations [b,p,m].
/// </summary>
public static class Hooks
{
    /// <summary><c>hook_embed</c>: the token embedding [b,p,d].</summary>
    public static string Embed => Names.embed;

    /// <summary><c>hook_pos_embed</c>: the learned position embedding [b,p,d] (learned positions only).</summary>
    public static string PosEmbed => Names.posEmbed;

    /// <summary><c>blocks.{layer}.hook_resid_pre</c>: the residual stream entering the block [b,p,d].</summary>
    /// <param name="layer">The block.</param>
    public static string ResidPre(int layer) => Names.residPre(layer);

    /// <summary><c>blocks.{layer}.ln1.hook_scale</c>: the first norm's divisor [b,p,1] (LayerNorm or RMSNorm only).</summary>
    /// <param name="layer">The block.</param>
    public static string Ln1Scale(int layer) => Names.ln1Scale(layer);

    /// <summary><c>blocks.{layer}.ln1.hook_normalized</c>: the attention's input [b,p,d].</summary>
    /// <param name="layer">The block.</param>
    public static string Ln1Normalized(int layer) => Names.ln1Normalized(layer);

    /// <summary><c>blocks.{layer}.attn.hook_q</c>: queries [b,p,h,e] (before rotation).</summary>
    /// <param name="layer">The block.</param>
    public static string AttnQ(int layer) => Names.attnQ(layer);

    /// <summary><c>blocks.{layer}.attn.hook_k</c>: keys [b,p,k,e] (before rotation).</summary>
    /// <param name="layer">The block.</param>
    public static string AttnK(int layer) => Names.attnK(layer);

    /// <summary><c>blocks.{layer}.attn.hook_v</c>: values [b,p,k,e].</summary>
    /// <param name="layer">The block.</param>
    public static string AttnV(int layer) => Names.attnV(layer);

    /// <summary><c>blocks.{layer}.attn.hook_rot_q</c>: rotated queries [b,p,h,e] (rotary only).</summary>
    /// <param name="layer">The block.</param>
    public static string AttnRotQ(int layer) => Names.attnRotQ(layer);

    /// <summary><c>blocks.{layer}.attn.hook_rot_k</c>: rotated keys [b,p,k,e] (rotary only).</summary>
    /// <param name="layer">The block.</param>
    public static string AttnRotK(int layer) => Names.attnRotK(layer);

    /// <summary><c>blocks.{layer}.attn.hook_attn_scores</c>: scaled, masked attention scores [b,h,p,P].</summary>
    /// <param name="layer">The block.</param>
    public static string AttnScores(int layer) => Names.attnScores(layer);

    /// <summary><c>blocks.{layer}.attn.hook_pattern</c>: attention probabilities [b,h,p,P].</summary>
    /// <param name="layer">The block.</param>
    public static string Pattern(int layer) => Names.pattern(layer);

    /// <summary><c>blocks.{layer}.attn.hook_z</c>: the heads' outputs before W_O [b,p,h,e].</summary>
    /// <param name="layer">The block.</param>
    public static string Z(int layer) => Names.z(layer);

    /// <summary><c>blocks.{layer}.hook_attn_out</c>: the attention's output [b,p,d].</summary>
    /// <param name="layer">The block.</param>
    public static string AttnOut(int layer) => Names.attnOut(layer);

    /// <summary><c>blocks.{layer}.hook_resid_mid</c>: the residual stream between attention and MLP [b,p,d].</summary>
    /// <param name="layer">The block.</param>
    public static string ResidMid(int layer) => Names.residMid(layer);

    /// <summary><c>blocks.{layer}.ln2.hook_scale</c>: the second norm's divisor [b,p,1] (LayerNorm or RMSNorm only).</summary>
    /// <param name="layer">The block.</param>
    public static string Ln2Scale(int layer) => Names.ln2Scale(layer);

    /// <summary><c>blocks.{layer}.ln2.hook_normalized</c>: the MLP's input [b,p,d].</summary>
    /// <param name="layer">The block.</param>
    public static string Ln2Normalized(int layer) => Names.ln2Normalized(layer);

    /// <summary>The MLP's input, <c>blocks.{layer}.ln2.hook_normalized</c> [b,p,d] (what a transcoder reads).</summary>
    /// <param name="layer">The block.</param>
    public static string MlpIn(int layer) => Names.mlpIn(layer);

    /// <summary><c>blocks.{layer}.mlp.hook_pre</c>: the MLP's pre-activation [b,p,m] (the gate's when gated).</summary>
    /// <param name="layer">The block.</param>
    public static string MlpPre(int layer) => Names.mlpPre(layer);

    /// <summary><c>blocks.{layer}.mlp.hook_pre_linear</c>: the linear branch of a gated MLP [b,p,m].</summary>
    /// <param name="layer">The block.</param>
    public static string MlpPreLinear(int layer) => Names.mlpPreLinear(layer);

    /// <summary><c>blocks.{layer}.mlp.hook_post</c>: the MLP's hidden activation [b,p,m].</summary>
    /// <param name="layer">The block.</param>
    public static string MlpPost(int layer) => Names.mlpPost(layer);

    /// <summary><c>blocks.{layer}.hook_mlp_out</c>: the MLP's output [b,p,d] (what a transcoder predicts).</summary>
    /// <param name="layer">The block.</param>
    public static string MlpOut(int layer) => Names.mlpOut(layer);

    /// <summary><c>blocks.{layer}.hook_resid_post</c>: the residual stream leaving the block [b,p,d].</summary>
    /// <param name="layer">The block.</param>
    public static string ResidPost(int layer) => Names.residPost(layer);

    /// <summary><c>ln_final.hook_scale</c>: the final norm's divisor [b,p,1].</summary>
    public static string LnFinalScale => Names.lnFinalScale;

    /// <summary><c>ln_final.hook_normalized</c>: the unembedding's input [b,p,d].</summary>
    public static string LnFinalNormalized => Names.lnFinalNormalized;

    /// <summary>Whether <paramref name="name"/> is a glob (holds <c>*</c>) rather than one hook point's name.</summary>
    /// <param name="name">A hook name or glob.</param>
    public static bool IsPattern(string name) => Names.isPattern(name);

    /// <summary>Every hook point of a model of <paramref name="config"/>, in the order the forward pass reaches them.</summary>
    /// <param name="config">The model's configuration.</param>
    public static IReadOnlyList<string> All(ModelConfig config) => Names.all(config.ToCore()).ToList();

    /// <summary>
    /// The hook points of a model of <paramref name="config"/> that <paramref name="pattern"/> (a name or a glob)
    /// selects; an <see cref="System.ArgumentException"/> naming the closest names when it selects none.
    /// </summary>
    /// <param name="config">The model's configuration.</param>
    /// <param name="pattern">A hook name or glob.</param>
    public static IReadOnlyList<string> Resolve(ModelConfig config, string pattern) => Names.resolve(config.ToCore(), pattern).ToList();
}
