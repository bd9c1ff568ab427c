/// Hugging Face GPT-NeoX checkpoints (`GPTNeoXForCausalLM`, `GPTNeoXModel`; EleutherAI's Pythia suite): the
/// configuration read from config.json, the tensors such a folder must hold, and their conversion to our parameters.
/// `HuggingFace` opens the folder, checks every header against `expectedTensors` before allocating, and copies.
///
/// The architecture (as `modeling_gpt_neox.py` computes it): LayerNorm with bias before attention (`input_layernorm`)
/// and before the MLP (`post_attention_layernorm`); with `use_parallel_residual` (Pythia) both read the block's
/// input, x + attn(ln1 x) + mlp(ln2 x), otherwise the MLP reads x + attn(ln1 x); one fused `query_key_value` map
/// whose output is laid out head by head, each head's [q | k | v] together; rotary embeddings (half-split layout) on
/// the first ⌊rotary_pct · d_head⌋ coordinates of each head, angles p·base^(−2i/rotary_dims); exact GELU; an
/// untied unembedding `embed_out` after `final_layer_norm`.
module Transcoders.Models.GptNeoX

open System.Text.RegularExpressions
open TorchSharp

/// Architecture names of config.json's "architectures" this module reads.
let architectures = [ "GPTNeoXForCausalLM"; "GPTNeoXModel" ]

/// config.json's "model_type".
let modelType = "gpt_neox"

/// Buffers some GPT-NeoX files carry that are not parameters: the causal mask and its fill value, and the
/// rotary frequencies (recomputed from the configuration).
let ignorable = Regex(@"\.attention\.(bias|masked_bias)$|\.rotary_emb\.inv_freq$")

let private activation (f: JsonFields) (name: string) =
    match name with
    | "gelu" -> Gelu
    | "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" -> GeluNew
    | "relu" -> Relu
    | "silu" | "swish" -> Silu
    | other -> f.Fail("hidden_act", sprintf "is '%s', an activation this loader does not support (gelu, gelu_new, gelu_pytorch_tanh, relu, silu)" other)

/// Our configuration of a GPT-NeoX config.json. Options this loader cannot compute faithfully are refused by name.
let config (f: JsonFields) : TransformerConfig =
    let rope = f.ObjectOpt "rope_parameters"
    match f.ObjectOpt "rope_scaling" with
    | Some _ -> f.Fail("rope_scaling", "is set: only plain rotary embeddings are supported (rope_scaling null)")
    | None -> ()
    match rope |> Option.bind (fun r -> r.StringOpt "rope_type") with
    | Some "default" | None -> ()
    | Some t -> f.Fail("rope_parameters", sprintf "has rope_type '%s': only plain rotary embeddings ('default') are supported" t)
    let d = f.Int "hidden_size"
    let heads = f.Int "num_attention_heads"
    if heads <= 0 || d % heads <> 0 then
        f.Fail("num_attention_heads", sprintf "is %d, which does not divide hidden_size %d into heads" heads d)
    let dHead = d / heads
    // a value under its GPT-NeoX name, else under its newer name at the top level or in rope_parameters, else the default
    let ropeFloat (neox: string) (newer: string) (fallback: float) =
        f.FloatOpt neox
        |> Option.orElse (f.FloatOpt newer)
        |> Option.orElse (rope |> Option.bind (fun r -> r.FloatOpt newer))
        |> Option.defaultValue fallback
    let pct = ropeFloat "rotary_pct" "partial_rotary_factor" 0.25
    if not (pct > 0.0 && pct <= 1.0) then f.Fail("rotary_pct", sprintf "is %g; this loader needs a fraction in (0, 1]" pct)
    // HF: rotary_ndims = int(head_size * rotary_pct)
    let rotaryDims = int (float dHead * pct)
    if rotaryDims < 2 || rotaryDims % 2 <> 0 then
        f.Fail("rotary_pct", sprintf "is %g, which rotates %d of the %d coordinates of a head; an even count of at least 2 is needed" pct rotaryDims dHead)
    let theta = ropeFloat "rotary_emb_base" "rope_theta" 10000.0
    let attnBias = f.BoolOr("attention_bias", true)
    { DModel = d; NLayers = f.Int "num_hidden_layers"; NHeads = heads; NKvHeads = heads; DHead = None
      DMlp = f.Int "intermediate_size"; NCtx = f.Int "max_position_embeddings"; VocabSize = f.Int "vocab_size"
      Norm = LayerNorm; NormEps = f.FloatOr("layer_norm_eps", 1e-5); FinalNorm = true
      Positions = Rotary (HalfSplit, theta)
      Mlp = Plain (activation f (f.StringOpt "hidden_act" |> Option.defaultValue "gelu"))
      Biases = { Qkv = attnBias; AttnOut = attnBias; MlpIn = true; MlpOut = true; Unembed = false }
      TiedUnembed = f.BoolOr("tie_word_embeddings", false); InitRange = f.FloatOr("initializer_range", 0.02)
      Dropout = 0.0; ParallelResidual = f.BoolOr("use_parallel_residual", true); RotaryDim = Some rotaryDims }

/// The name prefix of a file's tensors: "gpt_neox." for `GPTNeoXForCausalLM` files, "" for `GPTNeoXModel` ones.
let prefix (has: string -> bool) = if has "gpt_neox.embed_in.weight" then "gpt_neox." else ""

/// The unembedding's tensor name (`GPTNeoXForCausalLM`'s head, outside the `gpt_neox.` prefix).
let headName = "embed_out.weight"

/// The HF tensors a configuration needs, with their shapes as HF stores them (nn.Linear: [out, in]).
let expectedTensors (c: TransformerConfig) (prefix: string) : (string * int64[]) list =
    let d, m, v = int64 c.DModel, int64 c.DMlp, int64 c.VocabSize
    let hf name = prefix + name
    let linear name outputs inputs bias = [ yield hf (name + ".weight"), [| outputs; inputs |]; if bias then yield hf (name + ".bias"), [| outputs |] ]
    let norm name = [ hf (name + ".weight"), [| d |]; hf (name + ".bias"), [| d |] ]
    [ yield hf "embed_in.weight", [| v; d |]
      for l in 0 .. c.NLayers - 1 do
          let p = sprintf "layers.%d." l
          yield! norm (p + "input_layernorm")
          yield! linear (p + "attention.query_key_value") (3L * d) d c.Biases.Qkv
          yield! linear (p + "attention.dense") d d c.Biases.AttnOut
          yield! norm (p + "post_attention_layernorm")
          yield! linear (p + "mlp.dense_h_to_4h") m d c.Biases.MlpIn
          yield! linear (p + "mlp.dense_4h_to_h") d m c.Biases.MlpOut
      yield! norm "final_layer_norm"
      if not c.TiedUnembed then yield headName, [| v; d |] ]

/// (our name, tensor) pairs from HF tensors. `get` loads an HF tensor; every returned tensor is consumed (and
/// disposed) by the copy. The fused query_key_value map's output rows run head by head, [q | k | v] within a head
/// (HF views its output as [.., heads, 3·d_head] and splits the last axis), so rows h·3e + j·e + i go to
/// q (j = 0), k (j = 1) or v (j = 2), row h·e + i.
let convert (c: TransformerConfig) (prefix: string) (get: string -> torch.Tensor) : seq<string * torch.Tensor> =
    let h, e, d = int64 c.NHeads, int64 (TransformerConfig.dHead c), int64 c.DModel
    let hf name = prefix + name
    seq {
        yield "embed.weight", get (hf "embed_in.weight")
        for l in 0 .. c.NLayers - 1 do
            let p = hf (sprintf "layers.%d." l)
            let ours = sprintf "blocks.%d." l
            let pairs hfName ourName bias =
                seq {
                    yield ours + ourName + ".weight", get (p + hfName + ".weight")
                    if bias then yield ours + ourName + ".bias", get (p + hfName + ".bias") }
            let split (t: torch.Tensor) (trailing: int64[]) =
                use _ = torch.NewDisposeScope()
                let byHead = t.view(Array.append [| h; 3L; e |] trailing)
                [ for j in 0L .. 2L -> byHead.select(1, j).reshape(Array.append [| h * e |] trailing).contiguous().MoveToOuterDisposeScope() ]
            yield ours + "ln1.weight", get (p + "input_layernorm.weight")
            yield ours + "ln1.bias", get (p + "input_layernorm.bias")
            let qkvWeights =
                use w = get (p + "attention.query_key_value.weight")
                split w [| d |]
            for name, t in List.zip [ "attn.q"; "attn.k"; "attn.v" ] qkvWeights do yield ours + name + ".weight", t
            if c.Biases.Qkv then
                let qkvBiases =
                    use b = get (p + "attention.query_key_value.bias")
                    split b [||]
                for name, t in List.zip [ "attn.q"; "attn.k"; "attn.v" ] qkvBiases do yield ours + name + ".bias", t
            yield! pairs "attention.dense" "attn.o" c.Biases.AttnOut
            yield ours + "ln2.weight", get (p + "post_attention_layernorm.weight")
            yield ours + "ln2.bias", get (p + "post_attention_layernorm.bias")
            yield! pairs "mlp.dense_h_to_4h" "mlp.fc_in" c.Biases.MlpIn
            yield! pairs "mlp.dense_4h_to_h" "mlp.fc_out" c.Biases.MlpOut
        yield "ln_final.weight", get (hf "final_layer_norm.weight")
        yield "ln_final.bias", get (hf "final_layer_norm.bias")
        if not c.TiedUnembed then yield "unembed.weight", get headName
    }
