/// The pieces of a transformer block as TorchSharp modules. Each takes the run's `HookPoints` and passes
/// every activation through its named hook point. Parameter names (state-dict keys) are the module paths:
/// `blocks.{l}.ln1.weight`, `blocks.{l}.attn.q.weight`, `blocks.{l}.mlp.fc_in.weight`, ...
namespace Transcoders.Models

open TorchSharp

type internal F = torch.nn.functional

module internal Init =
    /// N(0, std) weights and zero biases for a linear map, in place.
    let linear (std: float) (l: TorchSharp.Modules.Linear) =
        use _ = torch.no_grad ()
        torch.nn.init.normal_(l.weight, 0.0, std, Transcoders.Tensors.Rng.generator l.weight.device) |> ignore
        if not (isNull l.bias) then l.bias.zero_() |> ignore

    /// Dropout with probability p in training mode (inverted: kept values scaled by 1/(1−p)); the identity otherwise
    /// (and when p = 0). The mask is drawn from the seeded flow's generator (`Rng`), not torch's global one.
    let dropout (training: bool) (p: float) (x: torch.Tensor) =
        if training && p > 0.0 then
            use u = torch.rand(x.shape, dtype = x.dtype, device = x.device, generator = Transcoders.Tensors.Rng.generator x.device)
            use keep = u.ge(Scalar.op_Implicit p)
            use kept = x.mul keep
            kept.div(Scalar.op_Implicit (1.0 - p))
        else x

    let activation (a: MlpActivation) : torch.Tensor -> torch.Tensor =
        match a with
        | GeluNew -> fun x -> F.gelu(x, TorchSharp.Modules.GELU.Approximate.tanh)
        | Gelu -> fun x -> F.gelu(x)
        | Relu -> fun x -> F.relu(x)
        | Silu -> fun x -> F.silu(x)

/// A normalisation layer with hook points `{prefix}.hook_scale` (the per-token divisor, [b,p,1]) and
/// `{prefix}.hook_normalized` (its output). Replacing hook_scale by a constant freezes the normalisation,
/// making the layer linear in its input.
type Norm(kind: Normalization, dModel: int, eps: float, prefix: string) as this =
    inherit torch.nn.Module("Norm")
    let scaleName = prefix + ".hook_scale"
    let normalizedName = prefix + ".hook_normalized"
    do
        if kind <> NoNorm then this.register_parameter("weight", torch.nn.Parameter(torch.ones(int64 dModel), true))
        if kind = LayerNorm then this.register_parameter("bias", torch.nn.Parameter(torch.zeros(int64 dModel), true))

    member _.Kind = kind

    member this.Run(x: torch.Tensor, hp: HookPoints) : torch.Tensor =
        let meanSquare (t: torch.Tensor) = t.square().mean([| -1L |], true)
        match kind with
        | NoNorm -> hp.Point(normalizedName, x)
        | LayerNorm when not (hp.Wants scaleName) ->
            let w, b = this.get_parameter "weight", this.get_parameter "bias"
            hp.Point(normalizedName, F.layer_norm(x, [| int64 dModel |], w, b, eps))
        | LayerNorm ->
            let w, b = this.get_parameter "weight", this.get_parameter "bias"
            let centered = x - x.mean([| -1L |], true)
            let scale = hp.Point(scaleName, (meanSquare centered + eps).sqrt())
            hp.Point(normalizedName, centered / scale * w + b)
        | RMSNorm ->
            let scale = hp.Point(scaleName, (meanSquare x + eps).sqrt())
            hp.Point(normalizedName, x / scale * this.get_parameter "weight")

/// How a call places its tokens: the position of its first token, and the rotation of queries and keys.
type PositionInfo =
    { /// Absolute position of the call's first token (the KV cache's length, else 0).
      Start: int
      /// Rotates [b, p, heads, e] from position Start (rotary models only).
      Rotate: (torch.Tensor -> torch.Tensor) option }

/// Causal self-attention with grouped-query heads: query head i reads key/value head ⌊i / (h/k)⌋.
type Attention(c: TransformerConfig, layer: int) as this =
    inherit torch.nn.Module("Attention")
    let d, e, h, kv = int64 c.DModel, int64 (TransformerConfig.dHead c), int64 c.NHeads, int64 c.NKvHeads
    let q = torch.nn.Linear(d, h * e, hasBias = c.Biases.Qkv)
    let k = torch.nn.Linear(d, kv * e, hasBias = c.Biases.Qkv)
    let v = torch.nn.Linear(d, kv * e, hasBias = c.Biases.Qkv)
    let o = torch.nn.Linear(h * e, d, hasBias = c.Biases.AttnOut)
    let names = {| Q = HookNames.attnQ layer; K = HookNames.attnK layer; V = HookNames.attnV layer
                   RotQ = HookNames.attnRotQ layer; RotK = HookNames.attnRotK layer
                   Scores = HookNames.attnScores layer; Pattern = HookNames.pattern layer; Z = HookNames.z layer |}
    do
        for l in [ q; k; v ] do Init.linear c.InitRange l
        Init.linear (c.InitRange / sqrt (2.0 * float c.NLayers)) o
        this.register_module("q", q)
        this.register_module("k", k)
        this.register_module("v", v)
        this.register_module("o", o)

    /// x [b,p,d] → attention output [b,p,d] (before hook_attn_out). With a KV cache, keys and values of
    /// earlier positions come from it and this call's are added to it.
    member this.Run(x: torch.Tensor, hp: HookPoints, pos: PositionInfo, cache: KvCache option) : torch.Tensor =
        let b, p = x.shape.[0], x.shape.[1]
        let heads (lin: TorchSharp.Modules.Linear) n = lin.forward(x).view(b, p, n, e)
        let qh = hp.Point(names.Q, heads q h)
        let kh = hp.Point(names.K, heads k kv)
        let vh = hp.Point(names.V, heads v kv)
        let qh, kh =
            match pos.Rotate with
            | Some rotate -> hp.Point(names.RotQ, rotate qh), hp.Point(names.RotK, rotate kh)
            | None -> qh, kh
        // [b, heads, positions, e] from here on
        let qt, kt, vt = qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2)
        let kAll, vAll =
            match cache with
            | Some cache -> cache.Append(layer, kt, vt)
            | None -> kt, vt
        let kAll, vAll =
            if h = kv then kAll, vAll
            else kAll.repeat_interleave(h / kv, dim = 1L), vAll.repeat_interleave(h / kv, dim = 1L)
        let keys = kAll.shape.[2]
        let past = keys - p
        // query i (absolute position past+i) may read key j when j <= past + i
        let allowed () =
            let device = x.device
            torch.arange(keys, device = device).unsqueeze(0).le((torch.arange(p, device = device) + past).unsqueeze(1))
        let z =
            let dropout = if this.training then c.Dropout else 0.0
            // dropout on the pattern needs the explicit softmax (scaled_dot_product_attention draws from the global generator)
            if hp.Wants names.Scores || hp.Wants names.Pattern || dropout > 0.0 then
                // [b, h, p, P] each: in a scope of their own, each freed as soon as the next is made (unless a hook saw
                // it), so that at most two are alive at once
                hp.InScope(fun s ->
                    let free (t: torch.Tensor) = if s.Contains t then t.Dispose()
                    let raw = qt.matmul(kAll.transpose(-2, -1))
                    let scaled = raw / sqrt (float e)
                    free raw
                    let scores =
                        if p > 1L then
                            use allowedHere = allowed ()
                            use notAllowed = allowedHere.logical_not()
                            let masked = scaled.masked_fill(notAllowed, System.Double.NegativeInfinity)
                            free scaled
                            masked
                        else scaled
                    let scores = hp.Point(names.Scores, scores)
                    let pattern = hp.Point(names.Pattern, F.softmax(scores, -1L))
                    free scores
                    let dropped = Init.dropout this.training dropout pattern
                    if not (obj.ReferenceEquals(dropped, pattern)) then free pattern
                    dropped.matmul(vAll))
            elif past = 0L then F.scaled_dot_product_attention(qt, kAll, vAll, p = dropout, is_casual = (p > 1L))
            elif p = 1L then F.scaled_dot_product_attention(qt, kAll, vAll, p = dropout)
            else F.scaled_dot_product_attention(qt, kAll, vAll, attn_mask = allowed (), p = dropout)
        let z = hp.Point(names.Z, z.transpose(1, 2))
        Init.dropout this.training c.Dropout (o.forward(z.reshape(b, p, h * e)))

/// The MLP: fc_out(act(fc_in x)), or fc_out(act(fc_gate x) ⊙ fc_in x) when gated.
type Mlp(c: TransformerConfig, layer: int) as this =
    inherit torch.nn.Module("Mlp")
    let d, m = int64 c.DModel, int64 c.DMlp
    let fcIn = torch.nn.Linear(d, m, hasBias = c.Biases.MlpIn)
    let fcGate = match c.Mlp with Gated _ -> torch.nn.Linear(d, m, hasBias = c.Biases.MlpIn) | Plain _ -> null
    let fcOut = torch.nn.Linear(m, d, hasBias = c.Biases.MlpOut)
    let pre, preLinear, post = HookNames.mlpPre layer, HookNames.mlpPreLinear layer, HookNames.mlpPost layer
    do
        Init.linear c.InitRange fcIn
        Init.linear (c.InitRange / sqrt (2.0 * float c.NLayers)) fcOut
        this.register_module("fc_in", fcIn)
        if not (isNull fcGate) then
            Init.linear c.InitRange fcGate
            this.register_module("fc_gate", fcGate)
        this.register_module("fc_out", fcOut)

    member this.Run(x: torch.Tensor, hp: HookPoints) : torch.Tensor =
        let hidden =
            match c.Mlp with
            | Plain act -> hp.Point(post, Init.activation act (hp.Point(pre, fcIn.forward x)))
            | Gated act ->
                let gate = hp.Point(pre, fcGate.forward x)
                let linear = hp.Point(preLinear, fcIn.forward x)
                hp.Point(post, Init.activation act gate * linear)
        Init.dropout this.training c.Dropout (fcOut.forward hidden)

/// A pre-norm residual block: x + attn(ln1 x), then + mlp(ln2 ·); with `ParallelResidual`, x + attn(ln1 x) + mlp(ln2 x).
type Block(c: TransformerConfig, layer: int) as this =
    inherit torch.nn.Module("Block")
    let ln1 = new Norm(c.Norm, c.DModel, c.NormEps, HookNames.inBlock layer "ln1")
    let attn = new Attention(c, layer)
    let ln2 = new Norm(c.Norm, c.DModel, c.NormEps, HookNames.inBlock layer "ln2")
    let mlp = new Mlp(c, layer)
    let attnOut, residMid = HookNames.attnOut layer, HookNames.residMid layer
    let mlpOut, residPost = HookNames.mlpOut layer, HookNames.residPost layer
    do
        this.register_module("ln1", ln1)
        this.register_module("attn", attn)
        this.register_module("ln2", ln2)
        this.register_module("mlp", mlp)

    /// resid_pre (after its hook) → resid_post.
    member _.Run(residPre: torch.Tensor, hp: HookPoints, pos: PositionInfo, cache: KvCache option) : torch.Tensor =
        let attnOut = hp.Point(attnOut, attn.Run(ln1.Run(residPre, hp), hp, pos, cache))
        if c.ParallelResidual then
            let mlpOut = hp.Point(mlpOut, mlp.Run(ln2.Run(residPre, hp), hp))
            hp.Point(residPost, residPre + attnOut + mlpOut)
        else
            let residMid = hp.Point(residMid, residPre + attnOut)
            let mlpOut = hp.Point(mlpOut, mlp.Run(ln2.Run(residMid, hp), hp))
            hp.Point(residPost, residMid + mlpOut)
