/// Our own checkpoint format: a folder with `model.safetensors` (parameters under our names, e.g.
/// `blocks.0.attn.q.weight`) and `config.json`, which records everything needed to rebuild the model:
///
///     { "format": "transcoders.transformer", "format_version": 1,
///       "config": { "architecture": "transformer", "d_model": 64, "n_layers": 2, "n_heads": 4,
///                   "n_kv_heads": 4, "d_head": null, "d_mlp": 256, "n_ctx": 64, "vocab_size": 512,
///                   "normalization": "layernorm" | "rmsnorm" | "none", "norm_eps": 1e-05, "final_norm": true,
///                   "positions": { "kind": "learned" } | { "kind": "rotary", "layout": "half_split" | "interleaved", "theta": 10000 },
///                   "mlp": { "kind": "plain" | "gated", "activation": "gelu_new" | "gelu" | "relu" | "silu" },
///                   "biases": { "qkv": true, "attn_out": true, "mlp_in": true, "mlp_out": true, "unembed": false },
///                   "tied_unembed": true, "init_range": 0.02, "dropout": 0.0 },
///       "tokenizer": { ... }, "training": { ... } }
///
/// `tokenizer` and `training` are opaque JSON objects chosen by the caller (absent when not given).
/// Both files are written atomically; loading validates every field and every tensor's name and shape.
module Transcoders.Models.Checkpoint

open System.IO
open System.Text.Json
open TorchSharp
open Transcoders.Files

/// The `format` value of our config.json.
[<Literal>]
let FormatName = "transcoders.transformer"

/// The newest format version this code writes and reads.
[<Literal>]
let FormatVersion = 1

/// Caller-supplied descriptions kept beside the weights.
type Metadata =
    { /// How to rebuild the tokenizer (opaque to this module).
      Tokenizer: JsonElement option
      /// Training run facts: steps, data, loss, seed... (opaque to this module).
      Training: JsonElement option }

    static member Empty = { Tokenizer = None; Training = None }

let configPath (dir: string) = Path.Combine(dir, "config.json")
let weightsPath (dir: string) = Path.Combine(dir, "model.safetensors")

/// TransformerConfig ⇄ the JSON object under "config".
module ConfigJson =
    let private normalizations = [ LayerNorm, "layernorm"; RMSNorm, "rmsnorm"; NoNorm, "none" ]
    let private activations = [ GeluNew, "gelu_new"; Gelu, "gelu"; Relu, "relu"; Silu, "silu" ]
    let private layouts = [ HalfSplit, "half_split"; Interleaved, "interleaved" ]

    let private nameOf table v = table |> List.find (fst >> (=) v) |> snd

    let private parse (f: JsonFields) field table =
        let s = f.String field
        match table |> List.tryFind (snd >> (=) s) with
        | Some (v, _) -> v
        | None -> f.Fail(field, sprintf "is '%s', expected one of %s" s (table |> List.map (snd >> sprintf "'%s'") |> String.concat ", "))

    /// Writes the configuration as a JSON object.
    let write (w: Utf8JsonWriter) (c: TransformerConfig) =
        w.WriteStartObject()
        w.WriteString("architecture", "transformer")
        w.WriteNumber("d_model", c.DModel)
        w.WriteNumber("n_layers", c.NLayers)
        w.WriteNumber("n_heads", c.NHeads)
        w.WriteNumber("n_kv_heads", c.NKvHeads)
        match c.DHead with
        | Some d -> w.WriteNumber("d_head", d)
        | None -> w.WriteNull("d_head")
        w.WriteNumber("d_mlp", c.DMlp)
        w.WriteNumber("n_ctx", c.NCtx)
        w.WriteNumber("vocab_size", c.VocabSize)
        w.WriteString("normalization", nameOf normalizations c.Norm)
        w.WriteNumber("norm_eps", c.NormEps)
        w.WriteBoolean("final_norm", c.FinalNorm)
        w.WriteStartObject("positions")
        match c.Positions with
        | Learned -> w.WriteString("kind", "learned")
        | Rotary (layout, theta) ->
            w.WriteString("kind", "rotary")
            w.WriteString("layout", nameOf layouts layout)
            w.WriteNumber("theta", theta)
            c.RotaryDim |> Option.iter (fun r -> w.WriteNumber("rotary_dim", r))
        w.WriteEndObject()
        w.WriteStartObject("mlp")
        let kind, act = match c.Mlp with Plain a -> "plain", a | Gated a -> "gated", a
        w.WriteString("kind", kind)
        w.WriteString("activation", nameOf activations act)
        w.WriteEndObject()
        w.WriteStartObject("biases")
        w.WriteBoolean("qkv", c.Biases.Qkv)
        w.WriteBoolean("attn_out", c.Biases.AttnOut)
        w.WriteBoolean("mlp_in", c.Biases.MlpIn)
        w.WriteBoolean("mlp_out", c.Biases.MlpOut)
        w.WriteBoolean("unembed", c.Biases.Unembed)
        w.WriteEndObject()
        w.WriteBoolean("tied_unembed", c.TiedUnembed)
        w.WriteNumber("init_range", c.InitRange)
        w.WriteNumber("dropout", c.Dropout)
        if c.ParallelResidual then w.WriteBoolean("parallel_residual", true)
        w.WriteEndObject()

    /// Reads and validates a configuration object; every field is required except the later additions
    /// `parallel_residual` (default false) and `positions.rotary_dim` (default: the whole head).
    let read (f: JsonFields) : TransformerConfig =
        match f.String "architecture" with
        | "transformer" -> ()
        | other -> f.Fail("architecture", sprintf "is '%s', an architecture this version does not know (expected 'transformer')" other)
        let rotaryDim = (f.Object "positions").IntOpt "rotary_dim"
        let positions =
            let p = f.Object "positions"
            match p.String "kind" with
            | "learned" -> Learned
            | "rotary" -> Rotary (parse p "layout" layouts, p.Float "theta")
            | other -> p.Fail("kind", sprintf "is '%s', expected 'learned' or 'rotary'" other)
        let mlp =
            let m = f.Object "mlp"
            let act = parse m "activation" activations
            match m.String "kind" with
            | "plain" -> Plain act
            | "gated" -> Gated act
            | other -> m.Fail("kind", sprintf "is '%s', expected 'plain' or 'gated'" other)
        let b = f.Object "biases"
        let config =
            { DModel = f.Int "d_model"; NLayers = f.Int "n_layers"; NHeads = f.Int "n_heads"; NKvHeads = f.Int "n_kv_heads"
              DHead = (if f.Element.TryGetProperty("d_head") |> fst then f.IntOpt "d_head" else f.Fail("d_head", "is missing (null means d_model / n_heads)"))
              DMlp = f.Int "d_mlp"; NCtx = f.Int "n_ctx"; VocabSize = f.Int "vocab_size"
              Norm = parse f "normalization" normalizations; NormEps = f.Float "norm_eps"; FinalNorm = f.Bool "final_norm"
              Positions = positions; Mlp = mlp
              Biases = { Qkv = b.Bool "qkv"; AttnOut = b.Bool "attn_out"; MlpIn = b.Bool "mlp_in"; MlpOut = b.Bool "mlp_out"; Unembed = b.Bool "unembed" }
              TiedUnembed = f.Bool "tied_unembed"; InitRange = f.Float "init_range"; Dropout = f.Float "dropout"
              ParallelResidual = f.BoolOr("parallel_residual", false); RotaryDim = rotaryDim }
        match TransformerConfig.problems config with
        | [] -> config
        | ps -> raise (CheckpointError(f.Path, "invalid model configuration: " + String.concat "; " ps))

/// The config.json text for a model and its metadata.
let configJson (c: TransformerConfig) (meta: Metadata) : byte[] =
    use stream = new MemoryStream()
    (use w = new Utf8JsonWriter(stream, JsonWriterOptions(Indented = true))
     w.WriteStartObject()
     w.WriteString("format", FormatName)
     w.WriteNumber("format_version", FormatVersion)
     w.WritePropertyName("config")
     ConfigJson.write w c
     let opaque (name: string) (e: JsonElement option) =
         e |> Option.iter (fun e ->
             if e.ValueKind <> JsonValueKind.Object then invalidArg name (sprintf "%s metadata must be a JSON object, got %A" name e.ValueKind)
             w.WritePropertyName name
             e.WriteTo w)
     opaque "tokenizer" meta.Tokenizer
     opaque "training" meta.Training
     w.WriteEndObject())
    stream.ToArray()

/// Saves a model into folder `dir` (created if needed): model.safetensors, then config.json, each atomically.
let save (dir: string) (meta: Metadata) (m: Transformer) : unit =
    let json = configJson m.Config meta
    Directory.CreateDirectory dir |> ignore
    let tensors = Transformer.parameters m |> List.map (fun (n, p) -> n, (p :> torch.Tensor))
    Safetensors.save (weightsPath dir) (Map [ "format", FormatName; "format_version", string FormatVersion ]) tensors
    AtomicFile.writeAllBytes (configPath dir) json

/// Reads a folder's config.json: the model configuration and the metadata. Fails clearly when the file
/// is missing, belongs to another format, comes from a newer version, or has a missing or invalid field.
let readConfig (dir: string) : TransformerConfig * Metadata =
    let path = configPath dir
    let f = JsonFields.Read path
    match f.StringOpt "format" with
    | Some FormatName -> ()
    | Some other -> raise (CheckpointError(path, sprintf "format '%s' is not a Transcoders transformer checkpoint ('%s')" other FormatName))
    | None ->
        let hint = if f.Has "architectures" || f.Has "model_type" then " (it looks like a Hugging Face config: load it with HuggingFace.load or ModelFiles.load)" else ""
        raise (CheckpointError(path, sprintf "not a Transcoders transformer checkpoint: no \"format\" field%s" hint))
    let version = f.Int "format_version"
    if version < 1 || version > FormatVersion then
        raise (CheckpointError(path, sprintf "format_version %d is not supported (this version reads 1..%d)" version FormatVersion))
    let config = ConfigJson.read (f.Object "config")
    let opaque name =
        f.RawOpt name |> Option.map (fun e ->
            if e.ValueKind <> JsonValueKind.Object then f.Fail(name, "must be a JSON object")
            e)
    config, { Tokenizer = opaque "tokenizer"; Training = opaque "training" }

/// Whether `dir` holds a config.json of our format (without validating the rest).
let isCheckpoint (dir: string) =
    let path = configPath dir
    File.Exists path
    && (try
            use doc = JsonDocument.Parse(File.ReadAllBytes path)
            match doc.RootElement.ValueKind, doc.RootElement.TryGetProperty "format" with
            | JsonValueKind.Object, (true, v) -> v.ValueKind = JsonValueKind.String && v.GetString() = FormatName
            | _ -> false
        with _ -> false)

/// A short description of the dimensions a configuration asks for, for errors that compare it with a file.
let internal describeConfig (path: string) (c: TransformerConfig) =
    sprintf "%s (d_model %d, n_layers %d, n_heads %d, n_kv_heads %d, d_mlp %d, n_ctx %d, vocab_size %d)"
        path c.DModel c.NLayers c.NHeads c.NKvHeads c.DMlp c.NCtx c.VocabSize

/// Loads a folder written by `save` onto `device`: the model, with parameters bit-identical to the
/// saved ones, and the metadata. Every tensor's name, shape and dtype is checked against config.json
/// before the model is allocated; weights holding NaN or ±∞ are refused unless `options` allows them.
let loadWith (options: LoadOptions) (dir: string) (device: torch.Device) : Transformer * Metadata =
    let config, meta = readConfig dir
    let path = weightsPath dir
    if not (File.Exists path) then raise (CheckpointError(path, "file not found (a checkpoint folder holds config.json and model.safetensors)"))
    use reader = Safetensors.Reader.Open path
    match reader.Metadata.TryFind "format" with
    | Some f when f <> FormatName -> raise (CheckpointError(path, sprintf "safetensors metadata says format '%s', expected '%s'" f FormatName))
    | _ -> ()
    CheckpointFile.checkLayerCount path (describeConfig (configPath dir) config) config reader.Entries.Length
    let expected = TransformerConfig.parameterShapes config
    let names = expected |> List.map fst |> set
    match reader.Entries |> List.filter (fun e -> not (names.Contains e.Name)) with
    | [] -> ()
    | extra ->
        raise (CheckpointError(path, sprintf "unexpected tensor %s: a model of %s has no such parameter"
                                         (extra |> List.truncate 8 |> List.map (fun e -> sprintf "'%s' %s" e.Name (Shape.show e.Shape)) |> String.concat ", ")
                                         (describeConfig (configPath dir) config)))
    CheckpointFile.checkEntries path (describeConfig (configPath dir) config) expected reader.Entries
    CheckpointFile.checkRotaryBudget (configPath dir) "config.n_ctx" config (reader.Entries |> List.sumBy (fun e -> e.ByteLength))
    let m = Transformer.create config device
    try CheckpointFile.copyInto (Some options) path m (seq { for e in reader.Entries -> e.Name, reader.Tensor(e.Name, device) })
    with _ ->
        m.Dispose()
        reraise ()
    WeightProcessing.apply options m, meta

/// `loadWith LoadOptions.Default`: finite weights only.
let load (dir: string) (device: torch.Device) : Transformer * Metadata = loadWith LoadOptions.Default dir device
