/// Hugging Face transformers checkpoints: a folder with config.json and model.safetensors (or shards
/// listed in model.safetensors.index.json). Supported: `GPT2LMHeadModel` / `GPT2Model` (Conv1D weights
/// stored [in, out], fused c_attn split into q, k, v) and `LlamaForCausalLM` / `LlamaModel` (HF's
/// half-split rotary layout, grouped-query attention, optional attention/MLP biases) and `GPTNeoXForCausalLM` /
/// `GPTNeoXModel` (Pythia; see `GptNeoX`).
module Transcoders.Models.HuggingFace

open System
open System.IO
open System.Text.RegularExpressions
open TorchSharp
open Transcoders.Files

/// The supported model families.
type Family =
    | Gpt2
    | Llama
    | GptNeoX

let private families =
    [ "GPT2LMHeadModel", Gpt2; "GPT2Model", Gpt2; "LlamaForCausalLM", Llama; "LlamaModel", Llama ]
    @ (GptNeoX.architectures |> List.map (fun a -> a, Family.GptNeoX))

let private modelTypes = [ "gpt2", Gpt2; "llama", Llama; GptNeoX.modelType, Family.GptNeoX ]

let private activation (f: JsonFields) field (name: string) =
    match name with
    | "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" -> GeluNew
    | "gelu" -> Gelu
    | "relu" -> Relu
    | "silu" | "swish" -> Silu
    | other -> f.Fail(field, sprintf "is '%s', an activation this loader does not support (gelu_new, gelu_pytorch_tanh, gelu, relu, silu)" other)

/// The family of a config.json (from "architectures", else "model_type"); a clear error for others.
let family (f: JsonFields) : Family * string =
    let supported = families |> List.map fst |> String.concat ", "
    match f.StringArrayOpt "architectures" with
    | Some (_ :: _ as archs) ->
        match archs |> List.tryPick (fun a -> families |> List.tryFind (fst >> (=) a)) with
        | Some (name, fam) -> fam, name
        | None -> raise (CheckpointError(f.Path, sprintf "unsupported architecture %s (this loader reads %s)" (archs |> List.map (sprintf "'%s'") |> String.concat ", ") supported))
    | _ ->
        match f.StringOpt "model_type" with
        | Some t ->
            match modelTypes |> List.tryFind (fst >> (=) t) with
            | Some (_, fam) -> fam, t
            | None -> raise (CheckpointError(f.Path, sprintf "unsupported model_type '%s' (this loader reads %s)" t supported))
        | None -> raise (CheckpointError(f.Path, "not a Hugging Face model config: neither \"architectures\" nor \"model_type\" is set"))

let private gpt2Config (f: JsonFields) : TransformerConfig =
    if f.BoolOr("scale_attn_by_inverse_layer_idx", false) then f.Fail("scale_attn_by_inverse_layer_idx", "is true, which this loader does not support")
    if not (f.BoolOr("scale_attn_weights", true)) then f.Fail("scale_attn_weights", "is false, which this loader does not support")
    if f.BoolOr("add_cross_attention", false) then f.Fail("add_cross_attention", "is true: cross-attention is not supported")
    let d = f.Int "n_embd"
    { DModel = d; NLayers = f.Int "n_layer"; NHeads = f.Int "n_head"; NKvHeads = f.Int "n_head"; DHead = None
      DMlp = f.IntOpt "n_inner" |> Option.defaultValue (4 * d)
      NCtx = (match f.IntOpt "n_positions" with Some n -> n | None -> f.Int "n_ctx")
      VocabSize = f.Int "vocab_size"; Norm = LayerNorm; NormEps = f.FloatOr("layer_norm_epsilon", 1e-5); FinalNorm = true
      Positions = Learned; Mlp = Plain (activation f "activation_function" (f.StringOpt "activation_function" |> Option.defaultValue "gelu_new"))
      Biases = Biases.All; TiedUnembed = f.BoolOr("tie_word_embeddings", true); InitRange = f.FloatOr("initializer_range", 0.02)
      Dropout = 0.0; ParallelResidual = false; RotaryDim = None }

let private llamaConfig (f: JsonFields) : TransformerConfig =
    let rope = f.ObjectOpt "rope_parameters"
    let theta =
        match rope |> Option.bind (fun r -> r.FloatOpt "rope_theta") with
        | Some t -> t
        | None -> f.FloatOr("rope_theta", 10000.0)
    let ropeType =
        match rope |> Option.bind (fun r -> r.StringOpt "rope_type") with
        | Some t -> Some ("rope_parameters.rope_type", t)
        | None -> f.ObjectOpt "rope_scaling" |> Option.bind (fun s -> s.StringOpt "rope_type" |> Option.orElse (s.StringOpt "type")) |> Option.map (fun t -> "rope_scaling", t)
    match ropeType with
    | Some (_, "default") | None -> ()
    | Some (field, t) -> f.Fail(field, sprintf "is '%s': only plain rotary embeddings ('default') are supported" t)
    let heads = f.Int "num_attention_heads"
    let attnBias = f.BoolOr("attention_bias", false)
    let mlpBias = f.BoolOr("mlp_bias", false)
    { DModel = f.Int "hidden_size"; NLayers = f.Int "num_hidden_layers"; NHeads = heads
      NKvHeads = f.IntOpt "num_key_value_heads" |> Option.defaultValue heads; DHead = f.IntOpt "head_dim"
      DMlp = f.Int "intermediate_size"; NCtx = f.Int "max_position_embeddings"; VocabSize = f.Int "vocab_size"
      Norm = RMSNorm; NormEps = f.FloatOr("rms_norm_eps", 1e-6); FinalNorm = true
      Positions = Rotary (HalfSplit, theta)
      Mlp = Gated (activation f "hidden_act" (f.StringOpt "hidden_act" |> Option.defaultValue "silu"))
      Biases = { Qkv = attnBias; AttnOut = attnBias; MlpIn = mlpBias; MlpOut = mlpBias; Unembed = false }
      TiedUnembed = f.BoolOr("tie_word_embeddings", false); InitRange = f.FloatOr("initializer_range", 0.02)
      Dropout = 0.0; ParallelResidual = false; RotaryDim = None }

/// The model family, the architecture name and our configuration for a Hugging Face folder's config.json.
let readConfig (dir: string) : Family * string * TransformerConfig =
    let f = JsonFields.Read(Path.Combine(dir, "config.json"))
    let fam, name = family f
    let config = match fam with Gpt2 -> gpt2Config f | Llama -> llamaConfig f | Family.GptNeoX -> GptNeoX.config f
    match TransformerConfig.problems config with
    | [] -> fam, name, config
    | ps -> raise (CheckpointError(f.Path, "invalid model configuration: " + String.concat "; " ps))

/// The safetensors files of a folder: name → reader holding it. Dispose the readers when done.
let private openWeights (dir: string) : Map<string, Safetensors.Reader> * Safetensors.Reader list =
    let single = Path.Combine(dir, "model.safetensors")
    let index = Path.Combine(dir, "model.safetensors.index.json")
    if File.Exists single then
        let r = Safetensors.Reader.Open single
        (r.Entries |> List.map (fun e -> e.Name, r) |> Map.ofList), [ r ]
    elif File.Exists index then
        let f = JsonFields.Read index
        let map = f.Object "weight_map"
        let files =
            [ for p in map.Element.EnumerateObject() ->
                if p.Value.ValueKind <> Text.Json.JsonValueKind.String then map.Fail(p.Name, "must be a file name")
                p.Name, p.Value.GetString() ]
        let opened = Collections.Generic.List<string * Safetensors.Reader>()
        try
            for file in files |> List.map snd |> List.distinct do
                opened.Add((file, Safetensors.Reader.Open(Path.Combine(dir, file))))
        with _ ->
            for _, r in opened do (r :> IDisposable).Dispose()
            reraise ()
        let readers = opened |> Map.ofSeq
        let table =
            try
                files |> List.map (fun (name, file) ->
                    let r = readers.[file]
                    if not (r.Contains name) then raise (CheckpointError(index, sprintf "'%s' is listed in %s but that file does not hold it" name file))
                    name, r)
            with _ ->
                for r in readers.Values do (r :> IDisposable).Dispose()
                reraise ()
        Map.ofList table, List.ofSeq readers.Values
    elif File.Exists(Path.Combine(dir, "pytorch_model.bin")) then
        raise (CheckpointError(dir, "only pytorch_model.bin is present: this loader reads safetensors weights (model.safetensors); convert the checkpoint first"))
    else raise (CheckpointError(dir, "no model.safetensors or model.safetensors.index.json in this folder"))

/// Buffers some HF checkpoints carry that are not parameters.
let private ignorable = Regex(@"(\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq)$")

/// The HF tensors a configuration needs, with their shapes as HF stores them (GPT-2's Conv1D as [in, out]).
/// `gpt2Prefix` is "transformer." for `GPT2LMHeadModel` files, "" for `GPT2Model` ones.
let private expectedTensors (fam: Family) (c: TransformerConfig) (gpt2Prefix: string) (neoxPrefix: string) : (string * int64[]) list =
    let d, e = int64 c.DModel, int64 (TransformerConfig.dHead c)
    let h, kv, m, v = int64 c.NHeads, int64 c.NKvHeads, int64 c.DMlp, int64 c.VocabSize
    match fam with
    | Gpt2 ->
        let hf name = gpt2Prefix + name
        let conv1d name (inputs: int64) (outputs: int64) = [ hf (name + ".weight"), [| inputs; outputs |]; hf (name + ".bias"), [| outputs |] ]
        [ yield hf "wte.weight", [| v; d |]
          yield hf "wpe.weight", [| int64 c.NCtx; d |]
          for l in 0 .. c.NLayers - 1 do
              let p = sprintf "h.%d." l
              yield hf (p + "ln_1.weight"), [| d |]
              yield hf (p + "ln_1.bias"), [| d |]
              yield! conv1d (p + "attn.c_attn") d (3L * d)
              yield! conv1d (p + "attn.c_proj") d d
              yield hf (p + "ln_2.weight"), [| d |]
              yield hf (p + "ln_2.bias"), [| d |]
              yield! conv1d (p + "mlp.c_fc") d m
              yield! conv1d (p + "mlp.c_proj") m d
          yield hf "ln_f.weight", [| d |]
          yield hf "ln_f.bias", [| d |]
          if not c.TiedUnembed then yield "lm_head.weight", [| v; d |] ]
    | Llama ->
        let linear name outputs inputs bias = [ yield name + ".weight", [| outputs; inputs |]; if bias then yield name + ".bias", [| outputs |] ]
        [ yield "model.embed_tokens.weight", [| v; d |]
          for l in 0 .. c.NLayers - 1 do
              let p = sprintf "model.layers.%d." l
              yield p + "input_layernorm.weight", [| d |]
              yield! linear (p + "self_attn.q_proj") (h * e) d c.Biases.Qkv
              yield! linear (p + "self_attn.k_proj") (kv * e) d c.Biases.Qkv
              yield! linear (p + "self_attn.v_proj") (kv * e) d c.Biases.Qkv
              yield! linear (p + "self_attn.o_proj") d (h * e) c.Biases.AttnOut
              yield p + "post_attention_layernorm.weight", [| d |]
              yield! linear (p + "mlp.gate_proj") m d c.Biases.MlpIn
              yield! linear (p + "mlp.up_proj") m d c.Biases.MlpIn
              yield! linear (p + "mlp.down_proj") d m c.Biases.MlpOut
          yield "model.norm.weight", [| d |]
          if not c.TiedUnembed then yield "lm_head.weight", [| v; d |] ]
    | Family.GptNeoX -> GptNeoX.expectedTensors c neoxPrefix

/// (our name, tensor) pairs from HF tensors, for one family. `get` loads an HF tensor (the caller
/// disposes nothing: every returned tensor is consumed by the copy).
let private convert (fam: Family) (c: TransformerConfig) (has: string -> bool) (get: string -> torch.Tensor) (path: string) =
    let d = int64 c.DModel
    seq {
        match fam with
        | Gpt2 ->
            let prefix = if has "transformer.wte.weight" then "transformer." else ""
            let hf name = prefix + name
            let conv1d name (outputs: (string * int64) list) =
                // Conv1D stores [in, out]; nn.Linear wants [out, in]
                use w = get (hf (name + ".weight"))
                use b = get (hf (name + ".bias"))
                let total = outputs |> List.sumBy snd
                if w.dim () <> 2L || w.shape.[1] <> total then
                    raise (CheckpointError(path, sprintf "'%s' has shape %s, expected [in, %d]" (hf (name + ".weight")) (Shape.show w.shape) total))
                let mutable start = 0L
                [ for ours, size in outputs do
                    yield ours + ".weight", w.narrow(1, start, size).t().contiguous()
                    yield ours + ".bias", b.narrow(0, start, size).contiguous()
                    start <- start + size ]
            yield "embed.weight", get (hf "wte.weight")
            yield "pos_embed.weight", get (hf "wpe.weight")
            for l in 0 .. c.NLayers - 1 do
                let h = sprintf "h.%d." l
                let ours = sprintf "blocks.%d." l
                yield ours + "ln1.weight", get (hf (h + "ln_1.weight"))
                yield ours + "ln1.bias", get (hf (h + "ln_1.bias"))
                yield! conv1d (h + "attn.c_attn") [ ours + "attn.q", d; ours + "attn.k", d; ours + "attn.v", d ]
                yield! conv1d (h + "attn.c_proj") [ ours + "attn.o", d ]
                yield ours + "ln2.weight", get (hf (h + "ln_2.weight"))
                yield ours + "ln2.bias", get (hf (h + "ln_2.bias"))
                yield! conv1d (h + "mlp.c_fc") [ ours + "mlp.fc_in", int64 c.DMlp ]
                yield! conv1d (h + "mlp.c_proj") [ ours + "mlp.fc_out", d ]
            yield "ln_final.weight", get (hf "ln_f.weight")
            yield "ln_final.bias", get (hf "ln_f.bias")
            if not c.TiedUnembed then yield "unembed.weight", get "lm_head.weight"
        | Llama ->
            yield "embed.weight", get "model.embed_tokens.weight"
            for l in 0 .. c.NLayers - 1 do
                let h = sprintf "model.layers.%d." l
                let ours = sprintf "blocks.%d." l
                let linear hfName ourName withBias =
                    seq {
                        yield ours + ourName + ".weight", get (h + hfName + ".weight")
                        if withBias then yield ours + ourName + ".bias", get (h + hfName + ".bias") }
                yield ours + "ln1.weight", get (h + "input_layernorm.weight")
                yield! linear "self_attn.q_proj" "attn.q" c.Biases.Qkv
                yield! linear "self_attn.k_proj" "attn.k" c.Biases.Qkv
                yield! linear "self_attn.v_proj" "attn.v" c.Biases.Qkv
                yield! linear "self_attn.o_proj" "attn.o" c.Biases.AttnOut
                yield ours + "ln2.weight", get (h + "post_attention_layernorm.weight")
                yield! linear "mlp.gate_proj" "mlp.fc_gate" c.Biases.MlpIn
                yield! linear "mlp.up_proj" "mlp.fc_in" c.Biases.MlpIn
                yield! linear "mlp.down_proj" "mlp.fc_out" c.Biases.MlpOut
            yield "ln_final.weight", get "model.norm.weight"
            if not c.TiedUnembed then yield "unembed.weight", get "lm_head.weight"
        | Family.GptNeoX -> yield! GptNeoX.convert c (GptNeoX.prefix has) get
    }

/// Loads a Hugging Face checkpoint folder as a Transformer on `device`. Fails clearly on an unsupported
/// architecture or option, a missing or unexpected tensor, a shape that disagrees with config.json, a dtype
/// that cannot hold a weight, or (unless `options` allows them) a weight holding NaN or ±∞. Every tensor is
/// checked against the configuration from the files' headers before the model is allocated.
let loadWith (options: LoadOptions) (dir: string) (device: torch.Device) : Transformer =
    let fam, _, config = readConfig dir
    let configFile = Path.Combine(dir, "config.json")
    let table, readers = openWeights dir
    try
        let describe = Checkpoint.describeConfig configFile config
        let weightFiles = readers |> List.map (fun r -> r.Path) |> String.concat ", "
        CheckpointFile.checkLayerCount weightFiles describe config table.Count
        let gpt2Prefix = if table.ContainsKey "transformer.wte.weight" then "transformer." else ""
        let neoxPrefix = GptNeoX.prefix table.ContainsKey
        let expected = expectedTensors fam config gpt2Prefix neoxPrefix
        let headName = match fam with Family.GptNeoX -> GptNeoX.headName | Gpt2 | Llama -> "lm_head.weight"
        let tiedHead = config.TiedUnembed && table.ContainsKey headName
        let checkedNames = (expected |> List.map fst) @ (if tiedHead then [ headName ] else [])
        let shapes = dict (expected @ [ headName, [| int64 config.VocabSize; int64 config.DModel |] ])
        let shapeOf name = shapes.[name]
        // every header checked against the configuration before anything is allocated
        for name in checkedNames do
            match table.TryFind name with
            | None ->
                raise (CheckpointError(weightFiles, sprintf "tensor '%s' is missing from the weights (shape %s, needed by %s)" name (Shape.show (shapeOf name)) describe))
            | Some r -> CheckpointFile.checkEntries r.Path describe [ name, shapeOf name ] [ r.Info name ]
        let known = set checkedNames
        let ignored (k: string) = ignorable.IsMatch k || (fam = Family.GptNeoX && GptNeoX.ignorable.IsMatch k)
        let unexpected = table |> Map.toList |> List.filter (fun (k, _) -> not (known.Contains k) && not (ignored k))
        if not unexpected.IsEmpty then
            let r = snd unexpected.Head
            raise (CheckpointError(r.Path, sprintf "unexpected tensors for a %s model of %s: %s" (match fam with Gpt2 -> "GPT-2" | Llama -> "Llama" | Family.GptNeoX -> "GPT-NeoX") describe
                                               (unexpected |> List.truncate 8 |> List.map fst |> String.concat ", ")))
        // a tied model whose file also holds a head of its own: it must be the embedding (else tying would discard it)
        if tiedHead then
            let embedName = match fam with Gpt2 -> gpt2Prefix + "wte.weight" | Llama -> "model.embed_tokens.weight" | Family.GptNeoX -> neoxPrefix + "embed_in.weight"
            let headReader = table.[headName]
            use head = headReader.TensorAs(headName, torch.float32)
            use embed = table.[embedName].TensorAs(embedName, torch.float32)
            use same = head.eq(embed).all()
            if not (same.item<bool> ()) then
                raise (CheckpointError(headReader.Path, sprintf "'%s' differs from '%s', but %s ties them (tie_word_embeddings): which one is meant?" headName embedName configFile))
        let weightBytes = readers |> List.sumBy (fun r -> r.Entries |> List.sumBy (fun e -> e.ByteLength))
        CheckpointFile.checkRotaryBudget configFile "max_position_embeddings" config weightBytes
        let get name =
            let r = table.[name]
            let t = r.Tensor(name, torch.CPU)
            match CheckpointFile.nonFinite options name t with
            | Some problem ->
                t.Dispose()
                raise (CheckpointError(r.Path, problem))
            | None -> t
        let m = Transformer.create config device
        try
            CheckpointFile.copyInto None dir m (convert fam config table.ContainsKey get dir)
        with _ ->
            m.Dispose()
            reraise ()
        WeightProcessing.apply options m
    finally
        for r in readers do (r :> IDisposable).Dispose()

/// `loadWith LoadOptions.Default`: finite weights only.
let load (dir: string) (device: torch.Device) : Transformer = loadWith LoadOptions.Default dir device
