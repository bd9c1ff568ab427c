/// TransformerLens' weight processing (`HookedTransformer.from_pretrained`'s default `process_weights_`:
/// `fold_layer_norm`, `center_writing_weights`, `center_unembed`, `fold_value_biases`), as a loading option
/// (`LoadOptions.Processing = TransformerLens`). The transcoder paper's published GPT-2 transcoders were trained on
/// activations of a model processed this way, so they fit only such a model.
///
/// For a LayerNorm model (weights as nn.Linear's [out, in]; w, β a LayerNorm's weight and bias):
///  - fold each LayerNorm into the linear maps that read it: W ← W·diag(w), b ← b + W·β (ln1 → q, k, v; ln2 → fc_in
///    (and fc_gate); ln_final → the unembedding, which gains a bias), then remove from each such W its mean over the
///    d_model (input) axis — exact, since a LayerNorm's normalised output has zero mean over d_model; the LayerNorms
///    are left with weight 1 and bias 0;
///  - centre the writing weights: W_E, W_pos, W_O (with b_O) and W_out (with b_out) lose their mean over d_model (the
///    output axis) — exact, since everything that reads the residual stream is a LayerNorm, which removes that mean;
///  - centre the unembedding: W_U and b_U lose their mean over the vocabulary, which shifts every position's logits by
///    one constant (log-probabilities are unchanged);
///  - fold the value biases into b_O (b_O ← b_O + W_O·b_V, b_V ← 0) — exact, since attention patterns sum to 1.
/// The processed model computes the same log-probabilities. Hook activations that change: `hook_embed`,
/// `hook_pos_embed`, `hook_resid_pre|mid|post`, `hook_attn_out`, `hook_mlp_out` (centred over d_model);
/// `ln1|ln2|ln_final.hook_normalized` (now the normalised stream without the LayerNorm's affine map, TransformerLens'
/// `LayerNormPre`); `attn.hook_v` and `hook_z` (without b_V); the logits (shifted per position). Unchanged:
/// `hook_scale`, `attn.hook_q|hook_k`, attention scores and patterns, `mlp.hook_pre|hook_post`.
/// RMSNorm models (Llama) are refused: TransformerLens folds only their weight and does not centre them.
module Transcoders.Models.WeightProcessing

open System.Collections.Generic
open TorchSharp

/// Why a model cannot be processed (empty when it can).
let problems (c: TransformerConfig) : string list =
    [ if c.Norm <> LayerNorm then yield sprintf "TransformerLens processing needs LayerNorm models (this one uses %A)" c.Norm
      if not c.FinalNorm then yield "TransformerLens processing needs a final LayerNorm before the unembedding (centring the residual stream relies on it)" ]

/// The configuration of the processed model: every linear map has a bias (the folded LayerNorm biases land there)
/// and the unembedding is untied (folding ln_final changes it but not W_E).
let processedConfig (c: TransformerConfig) : TransformerConfig =
    { c with TiedUnembed = false; Biases = { Qkv = true; AttnOut = true; MlpIn = true; MlpOut = true; Unembed = true } }

/// The processed parameters (our names, see `processedConfig`) from a model's parameters. New tensors; the inputs are
/// not changed.
let processTensors (c: TransformerConfig) (parameters: IDictionary<string, torch.Tensor>) : (string * torch.Tensor) list =
    match problems c with
    | [] -> ()
    | ps -> invalidArg "config" (String.concat "; " ps)
    use _ = torch.no_grad ()
    // every intermediate lives in this scope (no inner scopes: `put` registers new handles); the results are moved out at the end
    use outer = torch.NewDisposeScope()
    let pc = processedConfig c
    let get (name: string) = parameters[name]
    let tryGet (name: string) = match parameters.TryGetValue name with | true, t -> Some t | _ -> None
    let result = Dictionary<string, torch.Tensor>()
    let put name (t: torch.Tensor) = result[name] <- t.detach().contiguous()
    // y = (n⊙w + β)·Wᵀ + b = n·(W·diag w)ᵀ + (W·β + b), then W minus its mean over the input axis
    let fold (ln: string) (linears: string list) =
        let w, beta = get (ln + ".weight"), get (ln + ".bias")
        for lin in linears do
            let weight = get (lin + ".weight")
            let outputs = weight.shape[0]
            let bias = match tryGet (lin + ".bias") with Some b -> b.alias() | None -> torch.zeros(outputs, dtype = weight.dtype, device = weight.device)
            let scaled = weight * w.unsqueeze 0
            let centred = scaled - scaled.mean([| 1L |], true)
            let newBias = bias + weight.matmul(beta)
            put (lin + ".weight") centred
            put (lin + ".bias") newBias
        put (ln + ".weight") (torch.ones_like w)
        put (ln + ".bias") (torch.zeros_like beta)
    // a writing matrix [d_model, ·] (nn.Linear's out axis first) or an embedding [·, d_model]
    let centreRows (t: torch.Tensor) = (use m = t.mean([| 0L |], true) in t - m)
    let centreColumns (t: torch.Tensor) = (use m = t.mean([| 1L |], true) in t - m)
    for l in 0 .. c.NLayers - 1 do
        let b = sprintf "blocks.%d." l
        fold (b + "ln1") [ b + "attn.q"; b + "attn.k"; b + "attn.v" ]
        fold (b + "ln2") [ yield b + "mlp.fc_in"; match c.Mlp with Gated _ -> yield b + "mlp.fc_gate" | Plain _ -> () ]
    let unembedWeight = if c.TiedUnembed then get "embed.weight" else get "unembed.weight"
    let unembedBias =
        match tryGet "unembed.bias" with
        | Some t -> t.alias()
        | None -> torch.zeros(int64 c.VocabSize, dtype = unembedWeight.dtype, device = unembedWeight.device)
    // fold ln_final into the unembedding (the same formula as `fold`, done by hand for the tied case)
    (
        let w, beta = get "ln_final.weight", get "ln_final.bias"
        let scaled = unembedWeight * w.unsqueeze 0
        let wU = scaled - scaled.mean([| 1L |], true)
        let bU = unembedBias + unembedWeight.matmul(beta)
        // centre the unembedding over the vocabulary: logits shift by a constant per position
        let wU = wU - wU.mean([| 0L |], true)
        let bU = bU - bU.mean()
        put "unembed.weight" wU
        put "unembed.bias" bU
        put "ln_final.weight" (torch.ones_like w)
        put "ln_final.bias" (torch.zeros_like beta))
    // centre the writing weights
    put "embed.weight" (centreColumns (get "embed.weight"))
    match tryGet "pos_embed.weight" with Some p -> put "pos_embed.weight" (centreColumns p) | None -> ()
    let h, kv, e = int64 c.NHeads, int64 c.NKvHeads, int64 (TransformerConfig.dHead c)
    for l in 0 .. c.NLayers - 1 do
        let b = sprintf "blocks.%d." l
        let wO = get (b + "attn.o.weight")
        let bO = match tryGet (b + "attn.o.bias") with Some t -> t.alias() | None -> torch.zeros(wO.shape[0], dtype = wO.dtype, device = wO.device)
        let wOut = get (b + "mlp.fc_out.weight")
        let bOut = match tryGet (b + "mlp.fc_out.bias") with Some t -> t.alias() | None -> torch.zeros(wOut.shape[0], dtype = wOut.dtype, device = wOut.device)
        // value biases: every query head h reads key/value head ⌊h / (h/kv)⌋, and its pattern sums to 1
        let bV = result[b + "attn.v.bias"]
        let bVHeads = if h = kv then bV else bV.view(kv, e).repeat_interleave(h / kv, dim = 0L).reshape(h * e)
        let bO = bO + wO.matmul(bVHeads)
        put (b + "attn.v.bias") (torch.zeros_like bV)
        put (b + "attn.o.weight") (centreRows wO)
        put (b + "attn.o.bias") (bO - bO.mean())
        put (b + "mlp.fc_out.weight") (centreRows wOut)
        put (b + "mlp.fc_out.bias") (bOut - bOut.mean())
    // every other parameter as it is
    let expected = TransformerConfig.parameterShapes pc
    [ for name, _ in expected ->
        match result.TryGetValue name with
        | true, t -> name, t.MoveToOuterDisposeScope()
        | _ -> name, (get name).detach().clone().MoveToOuterDisposeScope() ]

/// The model processed as TransformerLens processes it (see the module doc): a new model on the same device; `m` is
/// left as it is (the caller disposes it).
let transformerLens (m: Transformer) : Transformer =
    let c = m.Config
    match problems c with
    | [] -> ()
    | ps -> raise (CheckpointError("TransformerLens weight processing", String.concat "; " ps))
    let parameters = Transformer.parameters m |> List.map (fun (n, p) -> n, (p :> torch.Tensor)) |> dict
    let tensors = processTensors c parameters
    let processed = Transformer.create (processedConfig c) m.Device
    try
        CheckpointFile.copyInto None "TransformerLens weight processing" processed tensors
        processed
    with _ ->
        processed.Dispose()
        reraise ()

/// Applies the processing that `options` asks for, disposing `m` when it is replaced.
let apply (options: LoadOptions) (m: Transformer) : Transformer =
    match options.Processing with
    | AsStored -> m
    | TransformerLens ->
        try transformerLens m
        finally m.Dispose()
