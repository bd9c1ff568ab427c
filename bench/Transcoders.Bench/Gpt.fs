/// A GPT-2-style language model for the training benchmark, written here until `Transcoders.Models`
/// lands: pre-LN blocks, learned positions, gelu_new (tanh), scaled_dot_product_attention, tied
/// embedding. The benchmark only uses `LmUnderTest`; swapping in the library's model means building
/// that record from it (see `LmBench.model`).
module Transcoders.Bench.Gpt

open TorchSharp
open TorchSharp.Modules

type Tensor = torch.Tensor

/// The model's shape.
type GptConfig =
    { Layers: int
      DModel: int
      Heads: int
      Context: int
      Vocab: int }
    member c.HeadDim = c.DModel / c.Heads

/// One pre-LN transformer block: x + attn(ln_1 x), then + mlp(ln_2 x). With `scoped`, the block's
/// temporaries are released when it returns (autograd keeps what backward needs), which lowers peak memory.
type Block(cfg: GptConfig, scoped: bool) as this =
    inherit torch.nn.Module<Tensor, Tensor>("block")
    let d = int64 cfg.DModel
    let ln_1 = torch.nn.LayerNorm([| d |])
    let c_attn = torch.nn.Linear(d, 3L * d)
    let attn_proj = torch.nn.Linear(d, d)
    let ln_2 = torch.nn.LayerNorm([| d |])
    let c_fc = torch.nn.Linear(d, 4L * d)
    let mlp_proj = torch.nn.Linear(4L * d, d)
    do this.RegisterComponents()

    /// The residual-out projections (GPT-2 scales their init by 1/sqrt(2·layers)).
    member _.OutProjections = [ attn_proj; mlp_proj ]

    override _.forward(x: Tensor) =
        use scope = if scoped then torch.NewDisposeScope() else null
        let b, t = x.shape[0], x.shape[1]
        let h = int64 cfg.Heads
        let hd = int64 cfg.HeadDim
        let qkv = c_attn.forward (ln_1.forward x)
        let heads (i: int64) = qkv.narrow(2L, i * d, d).view(b, t, h, hd).transpose(1L, 2L)
        let y = torch.nn.functional.scaled_dot_product_attention(heads 0L, heads 1L, heads 2L, null, 0.0, true)
        let x = x + attn_proj.forward (y.transpose(1L, 2L).reshape(b, t, d))
        let m = torch.nn.functional.gelu(c_fc.forward (ln_2.forward x), GELU.Approximate.tanh, false)
        let out = x + mlp_proj.forward m
        if scoped then out.MoveToOuterDisposeScope() else out

/// The whole model: token and position embeddings, blocks, final LayerNorm, logits through the
/// (tied) token embedding.
type Gpt(cfg: GptConfig, scoped: bool) as this =
    inherit torch.nn.Module<Tensor, Tensor>("gpt")
    let wte = torch.nn.Embedding(int64 cfg.Vocab, int64 cfg.DModel)
    let wpe = torch.nn.Embedding(int64 cfg.Context, int64 cfg.DModel)
    let blocks = torch.nn.ModuleList<Block>([| for _ in 1 .. cfg.Layers -> new Block(cfg, scoped) |])
    let ln_f = torch.nn.LayerNorm([| int64 cfg.DModel |])
    do
        this.RegisterComponents()
        // GPT-2 initialisation: N(0, 0.02), residual projections N(0, 0.02/sqrt(2L)), zero biases
        use _ = torch.no_grad ()
        for struct (name, p) in this.named_parameters () do
            if name.EndsWith "bias" then p.zero_() |> ignore
            elif name.Contains "ln" then ()
            else p.normal_(0.0, 0.02) |> ignore
        for blk in blocks do
            for proj in blk.OutProjections do
                proj.weight.normal_(0.0, 0.02 / sqrt (2.0 * float cfg.Layers)) |> ignore

    member _.Config = cfg

    /// Logits [batch, pos, vocab] of token ids [batch, pos].
    override _.forward(tokens: Tensor) =
        let t = tokens.shape[1]
        use pos = torch.arange(t, dtype = torch.int64, device = tokens.device)
        let mutable x = wte.forward tokens + wpe.forward pos
        for blk in blocks do
            x <- blk.forward x
        ln_f.forward(x).matmul(wte.weight.t())

    /// Mean next-token cross-entropy of a [batch, context+1] window.
    member this.Loss(window: Tensor) =
        let t = window.shape[1] - 1L
        let input = window.narrow(1L, 0L, t)
        let target = window.narrow(1L, 1L, t)
        let logits = this.forward input
        torch.nn.functional.cross_entropy(logits.reshape(-1L, int64 cfg.Vocab), target.reshape(-1L))
