namespace Transcoders.Models

/// How the residual stream is normalised before each sublayer (pre-norm) and before the unembedding.
type Normalization =
    /// (x − mean) / √(var + ε) · w + b, as in GPT-2.
    | LayerNorm
    /// x / √(mean(x²) + ε) · w, as in Llama.
    | RMSNorm
    /// No normalisation at all (tinymodel): the sublayers read the residual stream as it is.
    | NoNorm

/// Which coordinates a rotary embedding rotates together inside a head of size d.
type RotaryLayout =
    /// Hugging Face's `rotate_half`: coordinate i pairs with i + d/2.
    | HalfSplit
    /// llama2.c and Meta's original code: adjacent coordinates (2i, 2i+1) form a pair.
    | Interleaved

/// How token positions enter the model.
type Positions =
    /// A learned embedding [n_ctx, d_model] added to the token embedding (GPT-2, tinymodel).
    | Learned
    /// Rotary embeddings on queries and keys (RoPE), pair i turning by angle p·θ^(−2i/d_head).
    | Rotary of layout: RotaryLayout * theta: float

/// Elementwise non-linearities of the MLP.
type MlpActivation =
    /// GPT-2's tanh approximation of GELU (HF `gelu_new`, `gelu_pytorch_tanh`).
    | GeluNew
    /// The exact GELU, x·Φ(x).
    | Gelu
    | Relu
    /// x·σ(x), the gate of SwiGLU.
    | Silu

/// The MLP of a block.
type MlpKind =
    /// fc_out(act(fc_in x)).
    | Plain of MlpActivation
    /// fc_out(act(fc_gate x) ⊙ fc_in x): SwiGLU with `Gated Silu`, as in Llama.
    | Gated of MlpActivation

/// Which linear maps carry a bias.
type Biases =
    { /// Query, key and value projections.
      Qkv: bool
      /// The attention output projection (W_O).
      AttnOut: bool
      /// The MLP's input projections (fc_in, and fc_gate when gated).
      MlpIn: bool
      /// The MLP's output projection.
      MlpOut: bool
      /// The unembedding.
      Unembed: bool }

    static member All = { Qkv = true; AttnOut = true; MlpIn = true; MlpOut = true; Unembed = false }
    static member None = { Qkv = false; AttnOut = false; MlpIn = false; MlpOut = false; Unembed = false }

/// Everything needed to build a decoder-only transformer. Build one from a preset
/// (`TransformerConfig.gpt2`, `.llama`, `.tinymodel`) with `{ preset with ... }`, then `validate` it.
type TransformerConfig =
    { DModel: int
      NLayers: int
      /// Query heads.
      NHeads: int
      /// Key/value heads (grouped-query attention); equal to NHeads for ordinary multi-head attention.
      NKvHeads: int
      /// Size of one head; None means DModel / NHeads (which must then divide evenly).
      DHead: int option
      /// Hidden size of the MLP.
      DMlp: int
      /// Context length: the longest sequence the model accepts.
      NCtx: int
      VocabSize: int
      Norm: Normalization
      /// ε inside the normalisation's square root.
      NormEps: float
      /// Whether the stream is normalised before the unembedding (with `Norm`'s kind).
      FinalNorm: bool
      Positions: Positions
      Mlp: MlpKind
      Biases: Biases
      /// The unembedding reuses the token embedding matrix (W_U = W_Eᵀ).
      TiedUnembed: bool
      /// Standard deviation of the normal initialisation of weights (output projections get
      /// InitRange / √(2·NLayers), as in GPT-2).
      InitRange: float
      /// Dropout probability in training mode (`model.train()`), as in nanoGPT: on the embeddings, the
      /// attention probabilities, and the attention and MLP outputs. Ignored in eval mode.
      Dropout: float
      /// Attention and MLP both read the block's input: x + attn(ln1 x) + mlp(ln2 x) (GPT-NeoX, Pythia; there is
      /// no hook_resid_mid). False: the MLP reads x + attn(ln1 x) (GPT-2, Llama).
      ParallelResidual: bool
      /// Rotary models: how many leading coordinates of each head rotate (GPT-NeoX's rotary_pct · d_head); the
      /// rest pass unrotated, and the angles are p·θ^(−2i/RotaryDim). None: the whole head.
      RotaryDim: int option }

[<RequireQualifiedAccess>]
module TransformerConfig =

    /// The head size in use (DHead, else DModel / NHeads).
    let dHead (c: TransformerConfig) =
        match c.DHead with
        | Some d -> d
        | None -> if c.NHeads > 0 then c.DModel / c.NHeads else 0

    /// The coordinates of each head that rotary embeddings turn (RotaryDim, else the whole head).
    let rotaryDim (c: TransformerConfig) = defaultArg c.RotaryDim (dHead c)

    /// Every problem with a configuration, in words; empty when it can be built.
    let problems (c: TransformerConfig) : string list =
        [ let positive name v = if v <= 0 then Some (sprintf "%s must be positive, got %d" name v) else None
          yield! [ positive "d_model" c.DModel; positive "n_layers" c.NLayers; positive "n_heads" c.NHeads
                   positive "n_kv_heads" c.NKvHeads; positive "d_mlp" c.DMlp; positive "n_ctx" c.NCtx
                   positive "vocab_size" c.VocabSize ] |> List.choose id
          match c.DHead with
          | Some d when d <= 0 -> yield sprintf "d_head must be positive, got %d" d
          | Some _ -> ()
          | None ->
              if c.NHeads > 0 && c.DModel > 0 && c.DModel % c.NHeads <> 0 then
                  yield sprintf "d_model %d is not divisible by n_heads %d (set d_head explicitly for heads of another size)" c.DModel c.NHeads
          if c.NHeads > 0 && c.NKvHeads > 0 && c.NHeads % c.NKvHeads <> 0 then
              yield sprintf "n_heads %d is not divisible by n_kv_heads %d (each key/value head serves a whole group of query heads)" c.NHeads c.NKvHeads
          if c.NKvHeads > c.NHeads && c.NHeads > 0 then
              yield sprintf "n_kv_heads %d exceeds n_heads %d" c.NKvHeads c.NHeads
          match c.Positions with
          | Rotary (_, theta) ->
              let d = rotaryDim c
              match c.RotaryDim with
              | Some r when r <= 0 || r > dHead c ->
                  yield sprintf "rotary_dim must be in 1..d_head (%d), got %d" (dHead c) r
              | Some r when r % 2 <> 0 -> yield sprintf "rotary embeddings need an even rotary_dim, got %d" r
              | _ -> if d > 0 && d % 2 <> 0 then yield sprintf "rotary embeddings need an even head size, got d_head %d" d
              if not (theta > 1.0) || System.Double.IsInfinity theta then
                  yield sprintf "rotary base theta must be a finite number above 1, got %g" theta
              if d > 0 && c.NCtx > 0 && int64 c.NCtx * int64 (d / 2) > int64 System.Int32.MaxValue then
                  yield sprintf "n_ctx %d × d_head/2 %d rotary angles exceed the 2^31 a table can hold" c.NCtx (d / 2)
          | Learned ->
              if c.RotaryDim.IsSome then yield "rotary_dim is set but the model has learned positions, not rotary ones"
          if c.Norm <> NoNorm && (not (c.NormEps > 0.0) || System.Double.IsInfinity c.NormEps) then
              yield sprintf "norm_eps must be a small positive number, got %g" c.NormEps
          if not (c.InitRange > 0.0) || System.Double.IsInfinity c.InitRange then
              yield sprintf "init_range must be positive, got %g" c.InitRange
          if not (c.Dropout >= 0.0 && c.Dropout < 1.0) then
              yield sprintf "dropout must be in [0, 1), got %g" c.Dropout
        ]

    /// The configuration itself when valid; otherwise an ArgumentException listing every problem.
    let validate (c: TransformerConfig) =
        match problems c with
        | [] -> c
        | ps -> invalidArg "config" ("invalid transformer configuration: " + String.concat "; " ps)

    /// GPT-2 small: pre-LayerNorm, learned positions, gelu_new, biases everywhere, tied unembedding.
    let gpt2 =
        { DModel = 768; NLayers = 12; NHeads = 12; NKvHeads = 12; DHead = None; DMlp = 3072; NCtx = 1024
          VocabSize = 50257; Norm = LayerNorm; NormEps = 1e-5; FinalNorm = true; Positions = Learned
          Mlp = Plain GeluNew; Biases = Biases.All; TiedUnembed = true; InitRange = 0.02; Dropout = 0.0
          ParallelResidual = false; RotaryDim = None }

    /// Llama's kind at the size of llama2.c's stories260K: RMSNorm, rotary (HF half-split layout,
    /// θ = 10000), SwiGLU, grouped-query attention, no biases, untied unembedding.
    let llama =
        { DModel = 64; NLayers = 5; NHeads = 8; NKvHeads = 4; DHead = None; DMlp = 172; NCtx = 512
          VocabSize = 512; Norm = RMSNorm; NormEps = 1e-5; FinalNorm = true; Positions = Rotary (HalfSplit, 10000.0)
          Mlp = Gated Silu; Biases = Biases.None; TiedUnembed = false; InitRange = 0.02; Dropout = 0.0
          ParallelResidual = false; RotaryDim = None }

    /// tinymodel's kind (Nabeshima): no normalisation anywhere, learned positions, ReLU MLP with biases,
    /// no query/key/value bias but an output bias, untied unembedding with a bias.
    let tinymodel =
        { DModel = 768; NLayers = 4; NHeads = 16; NKvHeads = 16; DHead = None; DMlp = 3072; NCtx = 256
          VocabSize = 10000; Norm = NoNorm; NormEps = 1e-5; FinalNorm = false; Positions = Learned
          Mlp = Plain Relu; Biases = { Qkv = false; AttnOut = true; MlpIn = true; MlpOut = true; Unembed = true }
          TiedUnembed = false; InitRange = 0.02; Dropout = 0.0
          ParallelResidual = false; RotaryDim = None }

    /// The parameters a model of this configuration has, as (name, shape) in the order `Transformer.parameters`
    /// lists them, computed without building the model: loaders check a file's shapes against it before they
    /// allocate anything.
    let parameterShapes (c: TransformerConfig) : (string * int64[]) list =
        let d, e = int64 c.DModel, int64 (dHead c)
        let h, kv, m, v = int64 c.NHeads, int64 c.NKvHeads, int64 c.DMlp, int64 c.VocabSize
        let norm (kind: Normalization) prefix =
            [ if kind <> NoNorm then yield prefix + ".weight", [| d |]
              if kind = LayerNorm then yield prefix + ".bias", [| d |] ]
        let linear name (outputs: int64) (inputs: int64) bias =
            [ yield name + ".weight", [| outputs; inputs |]
              if bias then yield name + ".bias", [| outputs |] ]
        [ yield "embed.weight", [| v; d |]
          match c.Positions with
          | Learned -> yield "pos_embed.weight", [| int64 c.NCtx; d |]
          | Rotary _ -> ()
          for l in 0 .. c.NLayers - 1 do
              let b = sprintf "blocks.%d." l
              yield! norm c.Norm (b + "ln1")
              yield! linear (b + "attn.q") (h * e) d c.Biases.Qkv
              yield! linear (b + "attn.k") (kv * e) d c.Biases.Qkv
              yield! linear (b + "attn.v") (kv * e) d c.Biases.Qkv
              yield! linear (b + "attn.o") d (h * e) c.Biases.AttnOut
              yield! norm c.Norm (b + "ln2")
              yield! linear (b + "mlp.fc_in") m d c.Biases.MlpIn
              match c.Mlp with
              | Gated _ -> yield! linear (b + "mlp.fc_gate") m d c.Biases.MlpIn
              | Plain _ -> ()
              yield! linear (b + "mlp.fc_out") d m c.Biases.MlpOut
          yield! norm (if c.FinalNorm then c.Norm else NoNorm) "ln_final"
          if not c.TiedUnembed then yield "unembed.weight", [| v; d |]
          if c.Biases.Unembed then yield "unembed.bias", [| v |] ]

    /// Bytes of the rotary cos and sin tables a model of this configuration builds (0 with learned positions):
    /// 2 × n_ctx × d_head/2 float32 values.
    let rotaryTableBytes (c: TransformerConfig) : int64 =
        match c.Positions with
        | Rotary _ -> 2L * 4L * int64 c.NCtx * int64 (rotaryDim c / 2)
        | Learned -> 0L

    /// Number of parameters a model of this configuration has (tied matrices counted once).
    let parameterCount (c: TransformerConfig) : int64 =
        let d, dh, l = int64 c.DModel, int64 (dHead c), int64 c.NLayers
        let b flag n = if flag then n else 0L
        let norm = match c.Norm with LayerNorm -> 2L * d | RMSNorm -> d | NoNorm -> 0L
        let attn =
            let q = int64 c.NHeads * dh
            let kv = int64 c.NKvHeads * dh
            d * q + 2L * d * kv + b c.Biases.Qkv (q + 2L * kv) + q * d + b c.Biases.AttnOut d
        let mlp =
            let m = int64 c.DMlp
            let inputs = match c.Mlp with Plain _ -> 1L | Gated _ -> 2L
            inputs * (d * m + b c.Biases.MlpIn m) + m * d + b c.Biases.MlpOut d
        let embed = int64 c.VocabSize * d
        let pos = match c.Positions with Learned -> int64 c.NCtx * d | Rotary _ -> 0L
        let finalNorm = if c.FinalNorm then norm else 0L
        let unembed = (if c.TiedUnembed then 0L else int64 c.VocabSize * d) + b c.Biases.Unembed (int64 c.VocabSize)
        embed + pos + l * (2L * norm + attn + mlp) + finalNorm + unembed
