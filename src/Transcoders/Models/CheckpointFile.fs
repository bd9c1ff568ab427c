/// What the checkpoint readers share: the error they raise, validated access to JSON configuration
/// fields, and copying named tensors into a model's parameters with every name and shape checked.
namespace Transcoders.Models

open System.Text.Json
open TorchSharp

/// A checkpoint that cannot be read, naming the file and what is wrong with it.
exception CheckpointError of path: string * problem: string with
    override this.Message = sprintf "%s: %s" this.path this.problem

/// Typed, validated fields of one JSON object from a file; every error names the file and the field
/// path (e.g. `config.positions.theta`).
type JsonFields(path: string, element: JsonElement, prefix: string) =
    do
        if element.ValueKind <> JsonValueKind.Object then
            raise (CheckpointError(path, sprintf "%s must be a JSON object, got %A" (if prefix = "" then "the document" else "'" + prefix + "'") element.ValueKind))

    let full name = if prefix = "" then name else prefix + "." + name
    let fail name problem = raise (CheckpointError(path, sprintf "field '%s' %s" (full name) problem))

    let tryGet (name: string) =
        match element.TryGetProperty name with
        | true, v when v.ValueKind <> JsonValueKind.Null -> Some v
        | _ -> None

    let get name =
        match tryGet name with
        | Some v -> v
        | None -> fail name "is missing"

    let asInt name (v: JsonElement) =
        match v.ValueKind, (if v.ValueKind = JsonValueKind.Number then v.TryGetInt32() else (false, 0)) with
        | JsonValueKind.Number, (true, i) -> i
        | _ -> fail name (sprintf "must be an integer, got %s" (v.GetRawText()))

    let asFloat name (v: JsonElement) =
        if v.ValueKind = JsonValueKind.Number then v.GetDouble() else fail name (sprintf "must be a number, got %s" (v.GetRawText()))

    let asBool name (v: JsonElement) =
        match v.ValueKind with
        | JsonValueKind.True -> true
        | JsonValueKind.False -> false
        | _ -> fail name (sprintf "must be true or false, got %s" (v.GetRawText()))

    let asString name (v: JsonElement) =
        if v.ValueKind = JsonValueKind.String then v.GetString() else fail name (sprintf "must be a string, got %s" (v.GetRawText()))

    /// Reads the whole file as one JSON object.
    static member Read(path: string) : JsonFields =
        if not (System.IO.File.Exists path) then raise (CheckpointError(path, "file not found"))
        let doc =
            try JsonDocument.Parse(System.IO.File.ReadAllBytes path)
            with :? JsonException as e -> raise (CheckpointError(path, "not valid JSON: " + e.Message))
        JsonFields(path, doc.RootElement.Clone(), "")

    member _.Path = path
    member _.Element = element
    member _.Has(name: string) = (tryGet name).IsSome
    member _.Fail(name: string, problem: string) : 'a = fail name problem
    member _.Int(name) = get name |> asInt name
    member _.IntOr(name, fallback: int) = tryGet name |> Option.map (asInt name) |> Option.defaultValue fallback
    member _.IntOpt(name) = tryGet name |> Option.map (asInt name)
    member _.Float(name) = get name |> asFloat name
    member _.FloatOr(name, fallback: float) = tryGet name |> Option.map (asFloat name) |> Option.defaultValue fallback
    member _.FloatOpt(name) = tryGet name |> Option.map (asFloat name)
    member _.Bool(name) = get name |> asBool name
    member _.BoolOr(name, fallback: bool) = tryGet name |> Option.map (asBool name) |> Option.defaultValue fallback
    member _.String(name) = get name |> asString name
    member _.StringOpt(name) = tryGet name |> Option.map (asString name)
    member _.Object(name) = JsonFields(path, get name, full name)
    member _.ObjectOpt(name) = tryGet name |> Option.map (fun v -> JsonFields(path, v, full name))
    /// The raw element (cloned, independent of the document).
    member _.RawOpt(name) = tryGet name |> Option.map (fun v -> v.Clone())
    member _.StringArrayOpt(name) =
        tryGet name |> Option.map (fun v ->
            if v.ValueKind <> JsonValueKind.Array then fail name (sprintf "must be an array of strings, got %s" (v.GetRawText()))
            [ for x in v.EnumerateArray() -> asString name x ])

/// What a model loader does to the weights it read (see `WeightProcessing`).
type ProcessWeights =
    /// The weights as the file stores them.
    | AsStored
    /// TransformerLens' `process_weights_`: LayerNorms folded into the next linear maps, writing weights and the
    /// unembedding centred, value biases folded (same log-probabilities; some hook activations change).
    | TransformerLens

/// What the loaders of models and coders accept beyond well-formed files.
type LoadOptions =
    { /// Accept weights holding NaN or ±∞. Off by default: such a tensor is refused, naming the file and the tensor.
      AllowNonFinite: bool
      /// Model loaders: process the weights after loading (default `AsStored`; coder loaders ignore it).
      Processing: ProcessWeights }

    /// Finite weights only, as stored.
    static member Default = { AllowNonFinite = false; Processing = AsStored }

module internal CheckpointFile =

    /// Whether a stored dtype can hold a floating-point parameter (it is converted to the parameter's dtype).
    let isFloat (d: Transcoders.Files.Safetensors.DType) =
        match d with
        | Transcoders.Files.Safetensors.F32 | Transcoders.Files.Safetensors.F16
        | Transcoders.Files.Safetensors.BF16 | Transcoders.Files.Safetensors.F64 -> true
        | _ -> false

    /// The problem with a non-finite tensor, or None when every value is finite (or `options` allows them).
    let nonFinite (options: LoadOptions) (name: string) (t: torch.Tensor) : string option =
        if options.AllowNonFinite || not (t.is_floating_point ()) then None
        else
            use finite = torch.isfinite t
            use all = finite.all ()
            if all.item<bool> () then None
            else
                use bad = finite.logical_not().sum()
                Some (sprintf "tensor '%s' holds %d non-finite value(s) (NaN or ±∞); LoadOptions.AllowNonFinite loads it anyway" name (bad.item<int64> ()))

    /// Raises CheckpointError naming `path` and the tensor when `t` holds NaN or ±∞ (unless `options` allows them).
    let checkFinite (options: LoadOptions) (path: string) (name: string) (t: torch.Tensor) =
        match nonFinite options name t with
        | Some problem -> raise (CheckpointError(path, problem))
        | None -> ()

    /// Checks a file's header entries (in file order) against the tensors a configuration needs, before anything is
    /// allocated: each expected tensor has the expected shape and a floating-point dtype, and none is missing.
    /// `describe` says which configuration asked for the shapes (e.g. "config.json (d_model 64, ...)"). Entries the
    /// configuration does not name are left to the caller.
    let checkEntries (path: string) (describe: string) (expected: (string * int64[]) list) (entries: Transcoders.Files.Safetensors.Entry list) =
        let shapes = dict expected
        for e in entries do
            match shapes.TryGetValue e.Name with
            | true, shape ->
                if e.Shape <> shape then
                    raise (CheckpointError(path, sprintf "tensor for '%s' has shape %s, the model expects %s (as %s asks)" e.Name (Shape.show e.Shape) (Shape.show shape) describe))
                if not (isFloat e.DType) then
                    raise (CheckpointError(path, sprintf "tensor '%s' is stored as %s, which cannot hold a floating-point parameter (F32, F16, BF16 or F64 expected)" e.Name e.DType.Name))
            | _ -> ()
        let present = entries |> List.map (fun e -> e.Name) |> set
        match expected |> List.filter (fun (n, _) -> not (present.Contains n)) with
        | [] -> ()
        | missing ->
            raise (CheckpointError(path, sprintf "no tensor for parameter(s) %s (needed by %s)"
                                             (missing |> List.map (fun (n, s) -> sprintf "%s %s" n (Shape.show s)) |> String.concat ", ") describe))

    /// Refuses a configuration with more layers than the files have tensors (each layer needs several), before the
    /// list of expected tensors is built: a config.json claiming a million layers fails at once.
    let checkLayerCount (path: string) (describe: string) (c: TransformerConfig) (tensorCount: int) =
        if c.NLayers > tensorCount then
            raise (CheckpointError(path, sprintf "%s asks for %d layers, but the weights hold only %d tensors" describe c.NLayers tensorCount))

    /// Refuses a configuration whose rotary tables would be larger than the weights themselves (plus 64 MiB):
    /// no tensor bounds the context length of a rotary model, so the file's size does.
    let checkRotaryBudget (path: string) (field: string) (c: TransformerConfig) (weightBytes: int64) =
        let tables = TransformerConfig.rotaryTableBytes c
        let budget = weightBytes + (64L <<< 20)
        if tables > budget then
            raise (CheckpointError(path, sprintf "%s %d asks for rotary tables of %d bytes (n_ctx × d_head %d × 4 bytes × cos and sin), more than the %d bytes of weights allow: a corrupt or implausible context length"
                                             field c.NCtx tables (TransformerConfig.dHead c) weightBytes))

    /// Copies `tensors` (name → tensor, any float dtype, any device) into the model's parameters of the
    /// same names, converting to the parameter's dtype and device. Fails naming `path` when a name is
    /// unknown, a parameter is left without a value, or a shape differs. Takes ownership of the tensors:
    /// each is disposed once copied (so a lazy sequence holds one at a time).
    /// With `options`, each tensor is also checked for non-finite values (naming it) before it is copied.
    let copyInto (options: LoadOptions option) (path: string) (m: Transformer) (tensors: seq<string * torch.Tensor>) =
        let parameters = Transformer.parameters m |> dict
        let assigned = System.Collections.Generic.HashSet<string>()
        use _ = torch.no_grad ()
        for name, t in tensors do
          use t = t
          match parameters.TryGetValue name with
          | false, _ -> raise (CheckpointError(path, sprintf "unexpected tensor '%s' %s: the model has no such parameter" name (Shape.show t.shape)))
          | true, p ->
              if p.shape <> t.shape then
                  raise (CheckpointError(path, sprintf "tensor for '%s' has shape %s, the model expects %s" name (Shape.show t.shape) (Shape.show p.shape)))
              if not (t.is_floating_point ()) then
                  raise (CheckpointError(path, sprintf "tensor for '%s' has dtype %A, which cannot hold a floating-point parameter" name t.dtype))
              options |> Option.iter (fun o -> checkFinite o path name t)
              if not (assigned.Add name) then raise (CheckpointError(path, sprintf "two tensors for parameter '%s'" name))
              p.copy_(t) |> ignore
        let missing = parameters.Keys |> Seq.filter (assigned.Contains >> not) |> List.ofSeq
        if not missing.IsEmpty then
            raise (CheckpointError(path, sprintf "no tensor for parameter(s) %s" (String.concat ", " missing)))
        // a loaded model is for use (dropout off), as with Hugging Face's from_pretrained
        m.eval ()
