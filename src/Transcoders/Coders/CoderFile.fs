/// Saving and loading coders: safetensors weights with SAELens-style keys plus a JSON config.
///
/// A path ending in `.safetensors` or `.json` names a pair `name.safetensors` + `name.json`; any other path is a folder
/// holding `coder.safetensors` + `coder.json`. The JSON config (also copied into the safetensors metadata under
/// `transcoders.coder`) is `CoderConfig.toJson`.
///
/// Keys for an SAE, transcoder or skip transcoder (SAELens layout):
///   `W_enc` [d_in, d_sae], `b_enc` [d_sae], `W_dec` [d_sae, d_out], `b_dec` [d_out], `threshold` [d_sae] (JumpReLU),
///   `W_skip` [d_out, d_in] (skip transcoder; ŷ += W_skip·x), `batchtopk_threshold` [1] (BatchTopK running estimate).
/// Keys for a cross-layer transcoder over L layers (index ℓ counts the coder's layers from 0):
///   `W_enc` [L, d_in, d_sae], `b_enc` [L, d_sae], `threshold` [L, d_sae], `b_dec` [L, d_out],
///   `W_dec_{ℓ}` [d_sae, L−ℓ, d_out] (decoder of layer ℓ's features to layers ℓ, ℓ+1, …, L−1), `batchtopk_threshold` [L].
/// Saved weights are in the model's units: activation scales are folded in (scale 1; the folded values are kept in
/// `folded_scale`) and a transcoder's input bias is folded into `b_enc`. An SAE keeps SAELens semantics: with
/// `apply_b_dec_to_input` its `b_dec` is subtracted from the input before encoding.
module Transcoders.Coders.CoderFile

open System
open System.IO
open TorchSharp
open Transcoders.Files

/// Problems with a coder file: the message names the file and the key or field at fault.
exception CoderFileError of string with
    override this.Message = this.Data0

let private fail fmt = Printf.kprintf (fun s -> raise (CoderFileError s)) fmt

/// Metadata key holding the JSON config inside the safetensors file.
[<Literal>]
let MetadataKey = "transcoders.coder"

/// The (weights, config) file paths for a folder or a `name.safetensors`/`name.json` path.
let paths (path: string) : string * string =
    match Path.GetExtension(path).ToLowerInvariant() with
    | ".safetensors" | ".json" ->
        let b = Path.Combine(Path.GetDirectoryName path, Path.GetFileNameWithoutExtension path)
        b + ".safetensors", b + ".json"
    | _ -> Path.Combine(path, "coder.safetensors"), Path.Combine(path, "coder.json")

/// The file's tensors (file keys and shapes) for a config: what `save` writes and `load` requires.
let fileShapes (c: CoderConfig) : (string * int64[]) list =
    let nL, dIn, dOut, dSae = int64 c.NLayers, int64 c.DIn, int64 c.DOut, int64 c.DSae
    let jump = match c.Activation with JumpReLU _ -> true | _ -> false
    let btk = match c.Activation with BatchTopK _ -> true | _ -> false
    if c.Kind = CrossLayerTranscoder then
        [ yield "W_enc", [| nL; dIn; dSae |]
          yield "b_enc", [| nL; dSae |]
          if jump then yield "threshold", [| nL; dSae |]
          for l in 0 .. c.NLayers - 1 do yield sprintf "W_dec_%d" l, [| dSae; nL - int64 l; dOut |]
          yield "b_dec", [| nL; dOut |]
          if btk then yield "batchtopk_threshold", [| nL |] ]
    else
        [ yield "W_enc", [| dIn; dSae |]
          yield "b_enc", [| dSae |]
          if jump then yield "threshold", [| dSae |]
          yield "W_dec", [| dSae; dOut |]
          yield "b_dec", [| dOut |]
          if c.Kind = SkipTranscoder then yield "W_skip", [| dOut; dIn |]
          if btk then yield "batchtopk_threshold", [| 1L |] ]

/// File tensors (in the model's units) of a coder whose scale and input bias are already folded.
let private toFileTensors (c: Coder) : (string * torch.Tensor) list =
    let cfg = c.Config
    let sd = c.StateDict() |> dict
    let clt = cfg.Kind = CrossLayerTranscoder
    let squeeze (t: torch.Tensor) = if clt then t else t.squeeze 0
    [ yield "W_enc", squeeze sd["W_enc"]
      yield "b_enc", squeeze sd["b_enc"]
      match cfg.Activation with
      | JumpReLU _ -> yield "threshold", squeeze (sd["log_threshold"].exp())
      | _ -> ()
      if clt then
          for l in 0 .. cfg.NLayers - 1 do yield sprintf "W_dec_%d" l, sd[sprintf "W_dec_%d" l]
      else yield "W_dec", sd["W_dec_0"].squeeze 1
      yield "b_dec", squeeze sd["b_dec"]
      if cfg.Kind = SkipTranscoder then yield "W_skip", sd["W_skip"].squeeze 0
      match cfg.Activation with
      | BatchTopK _ -> yield "batchtopk_threshold", sd["batchtopk_threshold"]
      | _ -> () ]

/// The coder as it is saved: input bias and activation scales folded into the weights (outputs unchanged).
let folded (c: Coder) : Coder =
    use c1 = Coder.foldInputBias c
    Coder.foldScale c1

/// Saves a coder with its tensors stored as `dtype` (float32, or float16/bfloat16 to halve a shipped file; loading
/// converts back to float32), writing both files atomically.
let saveAs (dtype: torch.ScalarType) (path: string) (coder: Coder) =
    match dtype with
    | torch.ScalarType.Float32 | torch.ScalarType.Float16 | torch.ScalarType.BFloat16 -> ()
    | d -> invalidArg "dtype" (sprintf "coders are saved as float32, float16 or bfloat16, not %A" d)
    use scope = torch.NewDisposeScope()
    let stPath, jsonPath = paths path
    use f = folded coder
    let json = CoderConfig.toJson f.Config
    let tensors = toFileTensors f |> List.map (fun (n, t) -> n, t.to_type(dtype).contiguous())
    Safetensors.save stPath (Map [ "format", "pt"; MetadataKey, json ]) tensors
    AtomicFile.writeAllText jsonPath json

/// Saves a coder (see the module doc for the layout) in float32, writing both files atomically.
let save (path: string) (coder: Coder) = saveAs torch.ScalarType.Float32 path coder

/// Reads and validates a coder config file.
let loadConfig (path: string) : CoderConfig =
    let _, jsonPath = paths path
    if not (File.Exists jsonPath) then
        fail "%s: coder config not found (a coder is saved as %s + %s)" jsonPath (Path.GetFileName(fst (paths path))) (Path.GetFileName jsonPath)
    try CoderConfig.ofJson jsonPath (File.ReadAllText jsonPath)
    with CoderConfigError msg -> fail "%s" msg

/// Loads a coder onto `device`. Missing or unexpected keys, shapes that disagree with the config, non-float dtypes and
/// (unless `options` allows them) weights holding NaN or ±∞ raise `CoderFileError` naming the file and key.
let loadWith (options: Transcoders.Models.LoadOptions) (path: string) (device: torch.Device) : Coder =
    let stPath, jsonPath = paths path
    let cfg = loadConfig path
    if not (File.Exists stPath) then fail "%s: coder weights not found" stPath
    if cfg.InputBias && cfg.Kind <> Sae then
        fail "%s: input_bias is set for a %s, but saved transcoders have their input bias folded into b_enc" stPath (CoderConfig.kindName cfg.Kind)
    use scope = torch.NewDisposeScope()
    use reader =
        try Safetensors.Reader.Open stPath
        with
        | :? CoderFileError -> reraise ()
        | e -> fail "%s: cannot read safetensors file (%s)" stPath e.Message
    let expected = fileShapes cfg
    let entries = reader.Entries |> List.map (fun e -> e.Name, e) |> dict
    // every header checked against the config (named, since either file may be the one at fault) before any read
    let config = sprintf "the config in %s (%s, d_in %d, d_out %d, d_sae %d, %d layer(s))" jsonPath (CoderConfig.kindName cfg.Kind) cfg.DIn cfg.DOut cfg.DSae cfg.NLayers
    for name, shape in expected do
        match entries.TryGetValue name with
        | true, e ->
            if e.Shape <> shape then
                fail "%s: tensor '%s' has shape %A, but %s needs %A" stPath name e.Shape config shape
            match e.DType with
            | Safetensors.F32 | Safetensors.F16 | Safetensors.BF16 | Safetensors.F64 -> ()
            | d -> fail "%s: tensor '%s' has dtype %A; a floating-point dtype is needed" stPath name d
        | _ -> fail "%s: tensor '%s' (shape %A) is missing for a %s with %A activation (%s)" stPath name shape (CoderConfig.kindName cfg.Kind) cfg.Activation config
    let expectedNames = expected |> List.map fst |> set
    for KeyValue(name, _) in entries do
        if not (expectedNames.Contains name) then
            fail "%s: unexpected tensor '%s' for a %s with %A activation (expected %s, from %s)" stPath name (CoderConfig.kindName cfg.Kind) cfg.Activation (String.Join(", ", expectedNames)) jsonPath
    let read name =
        let t = reader.Tensor(name, device).to_type(torch.float32)
        // a BatchTopK threshold of NaN means "not estimated yet" (what a new coder holds); infinities are refused
        let checkedValues = if name = "batchtopk_threshold" then t.masked_fill(t.isnan(), Scalars.sc 0.0) else t
        match Transcoders.Models.CheckpointFile.nonFinite options name checkedValues with
        | Some problem -> fail "%s: %s" stPath problem
        | None -> t
    let clt = cfg.Kind = CrossLayerTranscoder
    let unsq (t: torch.Tensor) = if clt then t else t.unsqueeze 0
    let internalTensors =
        [ yield "W_enc", unsq (read "W_enc")
          yield "b_enc", unsq (read "b_enc")
          match cfg.Activation with
          | JumpReLU _ -> yield "log_threshold", unsq ((read "threshold").clamp_min(Scalars.sc 1e-30).log())
          | _ -> ()
          if clt then
              for l in 0 .. cfg.NLayers - 1 do yield sprintf "W_dec_%d" l, read (sprintf "W_dec_%d" l)
          else yield "W_dec_0", (read "W_dec").unsqueeze 1
          yield "b_dec", unsq (read "b_dec")
          if cfg.Kind = SkipTranscoder then yield "W_skip", (read "W_skip").unsqueeze 0
          match cfg.Activation with
          | BatchTopK _ -> yield "batchtopk_threshold", read "batchtopk_threshold"
          | _ -> () ]
    Coder.ofTensors cfg device internalTensors

/// `loadWith LoadOptions.Default`: finite weights only.
let load (path: string) (device: torch.Device) : Coder = loadWith Transcoders.Models.LoadOptions.Default path device

/// A transcoder from the tensors of the transcoder paper's checkpoints (Dunefsky, Chlenski & Nanda 2024; e.g. the GPT-2
/// small transcoders `final_sparse_autoencoder_gpt2-small_blocks.{L}.ln2.hook_normalized_24576.pt`, once their
/// `state_dict` is written to safetensors unchanged): `W_enc` [d_in, d_sae], `b_enc` [d_sae], `W_dec` [d_sae, d_out],
/// `b_dec` [d_in] (subtracted from the input), `b_dec_out` [d_out] (the output bias). Their forward pass
/// ReLU((x − b_dec)·W_enc + b_enc)·W_dec + b_dec_out becomes ours with b_enc ← b_enc − b_dec·W_enc and b_dec ← b_dec_out;
/// no transposes. The model must produce TransformerLens-processed activations (LayerNorm folded, writing weights
/// centred) for these weights to fit (reference notes §1, §9.7).
let ofPaperTensors (model: string) (layer: int) (device: torch.Device) (tensors: (string * torch.Tensor) seq) : Coder =
    use scope = torch.NewDisposeScope()
    use _ = torch.no_grad ()
    let t = dict tensors
    let get name =
        match t.TryGetValue name with
        | true, v -> v.``to``(torch.float32, device)
        | _ -> fail "transcoder-paper tensors: '%s' is missing (expected W_enc, b_enc, W_dec, b_dec, b_dec_out)" name
    let wEnc, bEnc, wDec, bIn, bOut = get "W_enc", get "b_enc", get "W_dec", get "b_dec", get "b_dec_out"
    if wEnc.dim() <> 2L || wDec.dim() <> 2L then fail "transcoder-paper tensors: W_enc and W_dec must be matrices (got %A and %A)" wEnc.shape wDec.shape
    let dIn, dSae, dOut = int wEnc.shape[0], int wEnc.shape[1], int wDec.shape[1]
    let check (name: string) (x: torch.Tensor) (shape: int64[]) =
        if x.shape <> shape then fail "transcoder-paper tensors: '%s' has shape %A, expected %A" name x.shape shape
    check "b_enc" bEnc [| int64 dSae |]
    check "W_dec" wDec [| int64 dSae; int64 dOut |]
    check "b_dec" bIn [| int64 dIn |]
    check "b_dec_out" bOut [| int64 dOut |]
    // The paper trained with unit-norm decoder rows, but a checkpoint need not have them (and a later
    // renormalisation would change what the coder computes): record what the rows are.
    let unitRows =
        use norms = wDec.square().sum(1L).sqrt()
        use deviation = norms.sub(Scalars.sc 1.0).abs().max()
        deviation.item<float32> () <= 1e-3f
    let decoder = if unitRows then UnitNorm else Free
    let cfg = { CoderConfig.transcoder model layer dIn dSae with DOut = dOut; InputBias = false; Decoder = decoder }
    let bEnc' = bEnc - bIn.unsqueeze(0).matmul(wEnc).squeeze 0
    Coder.ofTensors cfg device
        [ "W_enc", wEnc.unsqueeze 0; "b_enc", bEnc'.unsqueeze 0; "W_dec_0", wDec.unsqueeze 1; "b_dec", bOut.unsqueeze 0 ]

/// `ofPaperTensors` over a safetensors file holding the paper's state-dict keys.
let importPaper (path: string) (model: string) (layer: int) (device: torch.Device) : Coder =
    let tensors = Safetensors.load path device
    try ofPaperTensors model layer device tensors
    finally for _, t in tensors do t.Dispose()
