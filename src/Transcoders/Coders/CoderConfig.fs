namespace Transcoders.Coders

open System
open System.Text.Json
open System.Text.Json.Nodes

/// Which kind of sparse coder: what it reads and what it predicts.
type CoderKind =
    /// Sparse autoencoder: reads one hook point and reconstructs the same activations.
    | Sae
    /// Per-layer transcoder: reads the MLP input `blocks.{l}.ln2.hook_normalized`, predicts `blocks.{l}.hook_mlp_out`.
    | Transcoder
    /// Transcoder with an affine skip path: ŷ = W_dec·a + W_skip·x + b_dec (Paulo et al.).
    | SkipTranscoder
    /// Cross-layer transcoder: an encoder per layer reading that layer's MLP input; a decoder from every layer ℓ
    /// to the MLP output of every layer ℓ' ≥ ℓ (Anthropic, "Circuit Tracing"). A per-layer transcoder set is the
    /// special case whose cross-layer decoders are zero.
    | CrossLayerTranscoder

/// JumpReLU settings: a = z·H(z − θ) with a learned per-feature θ (stored as log θ), trained with a
/// straight-through estimator whose rectangle kernel has width `Bandwidth` (ε).
type JumpReLUSpec =
    { InitialThreshold: float
      Bandwidth: float }

    /// Gemma Scope / SAELens defaults: θ₀ = 0.001, ε = 0.001 (in units of normalised activations).
    static member Default = { InitialThreshold = 0.001; Bandwidth = 0.001 }

/// The activation function that turns pre-activations into (sparse) feature activations.
type CoderActivation =
    | ReLU
    | JumpReLU of JumpReLUSpec
    /// Keep the k largest (ReLU'd) pre-activations of each token (per layer for a cross-layer transcoder).
    | TopK of k: int
    /// Keep the k·B largest (ReLU'd) pre-activations of a batch of B tokens: k per token on average.
    /// Batch-dependent; convert to JumpReLU with a calibrated threshold for inference (`Coder.toJumpReLU`).
    | BatchTopK of k: float
    /// GroupMax (sparsify): the d_sae features form k contiguous groups of d_sae/k; each token keeps the largest
    /// (ReLU'd) pre-activation of every group. Exactly k candidates per token, far cheaper than TopK on wide coders.
    | GroupMax of k: int

/// How decoder vectors are constrained during training.
type DecoderNorm =
    /// Every feature's decoder vector (for a cross-layer transcoder: the concatenation of all its decoders) has
    /// unit L2 norm: the gradient component parallel to it is removed before each step and it is renormalised after.
    | UnitNorm
    /// Free norms; sparsity penalties should then be weighted by the decoder norm.
    | Free

/// Per-layer activation scales: the coder works on `x·In[l]` and predicts `y·Out[l]`; outputs are divided by
/// `Out[l]` to return to the model's units. Chosen so that E‖x·s‖ = √d (see `Normalisation`).
type ActivationScale =
    { In: float[]
      Out: float[] }

    static member Ones(nLayers: int) = { In = Array.create nLayers 1.0; Out = Array.create nLayers 1.0 }
    member s.IsOne = s.In |> Array.forall ((=) 1.0) && s.Out |> Array.forall ((=) 1.0)

/// Everything needed to rebuild a coder module (what `coder.json` holds).
type CoderConfig =
    { Kind: CoderKind
      /// Model layers the coder belongs to (one for SAE/transcoders; ascending, distinct for a cross-layer transcoder).
      Layers: int[]
      /// Hook point read at each layer (TransformerLens names).
      HookIn: string[]
      /// Hook point predicted at each layer (the same as `HookIn` for an SAE).
      HookOut: string[]
      DIn: int
      DOut: int
      /// Features per layer.
      DSae: int
      Activation: CoderActivation
      /// Subtract a learned input-side bias before encoding. For an SAE this bias is `b_dec` itself (SAELens
      /// `apply_b_dec_to_input`). For transcoders it is a separate `b_in` [d_in] (the transcoder paper's `b_dec`,
      /// whose output bias is `b_dec_out`); it only reparametrises `b_enc`, so saving folds it:
      /// b_enc ← b_enc − b_in·W_enc, and saved transcoder files never contain it.
      InputBias: bool
      Decoder: DecoderNorm
      /// Scales applied at run time (ones once folded into the weights).
      Scale: ActivationScale
      /// Scales that were folded into the weights when saving (provenance only; not applied).
      FoldedScale: ActivationScale option
      /// The model these activations come from (opaque, e.g. "gpt2" or "stories260K").
      Model: string }

    member c.NLayers = c.Layers.Length

/// Invalid configuration or file: the message names the field at fault.
exception CoderConfigError of string with
    override this.Message = this.Data0

/// Building, validating and (de)serialising coder configurations.
module CoderConfig =

    /// TransformerLens name of layer l's MLP input (after ln2, without its affine part when folded).
    let mlpInHook (layer: int) = sprintf "blocks.%d.ln2.hook_normalized" layer
    /// TransformerLens name of layer l's MLP output.
    let mlpOutHook (layer: int) = sprintf "blocks.%d.hook_mlp_out" layer

    let private fail fmt = Printf.kprintf (fun s -> raise (CoderConfigError s)) fmt

    /// All problems with a configuration (empty when valid).
    let problems (c: CoderConfig) : string list =
        [ if c.DIn <= 0 then yield sprintf "DIn must be positive (got %d)" c.DIn
          if c.DOut <= 0 then yield sprintf "DOut must be positive (got %d)" c.DOut
          if c.DSae <= 0 then yield sprintf "DSae must be positive (got %d)" c.DSae
          let n = c.Layers.Length
          if n = 0 then yield "Layers must not be empty"
          if c.Kind <> CrossLayerTranscoder && n <> 1 then
              yield sprintf "Layers: a %A reads exactly one layer (got %d)" c.Kind n
          if c.Layers |> Array.exists (fun l -> l < 0) then yield "Layers must be non-negative"
          if n > 1 && (c.Layers |> Array.pairwise |> Array.exists (fun (a, b) -> b <= a)) then
              yield sprintf "Layers must be strictly ascending (got %A)" c.Layers
          if c.HookIn.Length <> n then yield sprintf "HookIn: one hook per layer expected (%d layers, %d hooks)" n c.HookIn.Length
          if c.HookOut.Length <> n then yield sprintf "HookOut: one hook per layer expected (%d layers, %d hooks)" n c.HookOut.Length
          if Array.append c.HookIn c.HookOut |> Array.exists String.IsNullOrWhiteSpace then yield "HookIn/HookOut: hook names must not be empty"
          if c.Kind = Sae then
              if c.DIn <> c.DOut then yield sprintf "DOut: an SAE reconstructs its input, so DOut must equal DIn (%d vs %d)" c.DOut c.DIn
              if c.HookIn <> c.HookOut then yield sprintf "HookOut: an SAE reconstructs its input hook (%A vs %A)" c.HookOut c.HookIn
              if c.Scale.In <> c.Scale.Out then yield "Scale: an SAE's input and output scales must be equal"
          match c.Activation with
          | ReLU -> ()
          | JumpReLU j ->
              if not (j.InitialThreshold > 0.0 && Double.IsFinite j.InitialThreshold) then
                  yield sprintf "Activation.JumpReLU.InitialThreshold must be positive and finite (got %g)" j.InitialThreshold
              if not (j.Bandwidth > 0.0 && Double.IsFinite j.Bandwidth) then
                  yield sprintf "Activation.JumpReLU.Bandwidth must be positive and finite (got %g)" j.Bandwidth
          | TopK k -> if k < 1 || k > c.DSae then yield sprintf "Activation.TopK: k must be in 1..DSae=%d (got %d)" c.DSae k
          | BatchTopK k ->
              if not (k > 0.0 && k <= float c.DSae) then yield sprintf "Activation.BatchTopK: k must be in (0, DSae=%d] (got %g)" c.DSae k
          | GroupMax k ->
              if k < 1 || k > c.DSae || c.DSae % k <> 0 then
                  yield sprintf "Activation.GroupMax: k must be in 1..DSae=%d and divide it (got %d)" c.DSae k
          let checkScale name (s: ActivationScale) =
              [ if s.In.Length <> n || s.Out.Length <> n then
                    yield sprintf "%s: one input and one output scale per layer expected (%d layers; got %d and %d)" name n s.In.Length s.Out.Length
                if Array.append s.In s.Out |> Array.exists (fun v -> not (v > 0.0 && Double.IsFinite v)) then
                    yield sprintf "%s: scales must be positive and finite (got %A / %A)" name s.In s.Out ]
          yield! checkScale "Scale" c.Scale
          match c.FoldedScale with
          | Some s -> yield! checkScale "FoldedScale" s
          | None -> () ]

    /// Raises `CoderConfigError` listing every problem, or returns the config unchanged.
    let validate (c: CoderConfig) =
        match problems c with
        | [] -> c
        | ps -> raise (CoderConfigError("invalid CoderConfig: " + String.Join("; ", ps)))

    /// An SAE on `hook` (at model layer `layer`), ReLU, unit-norm decoder, b_dec subtracted from the input.
    let sae (model: string) (hook: string) (layer: int) (dIn: int) (dSae: int) =
        { Kind = Sae; Layers = [| layer |]; HookIn = [| hook |]; HookOut = [| hook |]
          DIn = dIn; DOut = dIn; DSae = dSae; Activation = ReLU; InputBias = true; Decoder = UnitNorm
          Scale = ActivationScale.Ones 1; FoldedScale = None; Model = model }
        |> validate

    /// A transcoder of layer `layer`'s MLP (reads ln2.hook_normalized, predicts hook_mlp_out), as in the
    /// transcoder paper: ReLU, unit-norm decoder, input bias.
    let transcoder (model: string) (layer: int) (dModel: int) (dSae: int) =
        { Kind = Transcoder; Layers = [| layer |]; HookIn = [| mlpInHook layer |]; HookOut = [| mlpOutHook layer |]
          DIn = dModel; DOut = dModel; DSae = dSae; Activation = ReLU; InputBias = true; Decoder = UnitNorm
          Scale = ActivationScale.Ones 1; FoldedScale = None; Model = model }
        |> validate

    /// A skip transcoder of layer `layer`'s MLP.
    let skipTranscoder (model: string) (layer: int) (dModel: int) (dSae: int) =
        { transcoder model layer dModel dSae with Kind = SkipTranscoder } |> validate

    /// A cross-layer transcoder over `layers` (each reading its MLP input, writing to its own and later MLP outputs),
    /// with Anthropic's recipe: JumpReLU, free decoder norms (use a decoder-norm-weighted penalty), no input bias.
    let crossLayer (model: string) (layers: int[]) (dModel: int) (dSae: int) =
        { Kind = CrossLayerTranscoder; Layers = Array.copy layers
          HookIn = layers |> Array.map mlpInHook; HookOut = layers |> Array.map mlpOutHook
          DIn = dModel; DOut = dModel; DSae = dSae; Activation = JumpReLU JumpReLUSpec.Default; InputBias = false
          Decoder = Free; Scale = ActivationScale.Ones layers.Length; FoldedScale = None; Model = model }
        |> validate

    // ---- JSON ----

    /// Identifies our coder JSON files.
    [<Literal>]
    let FormatName = "transcoders.coder"

    /// Current JSON format version (readers accept this and older).
    [<Literal>]
    let FormatVersion = 1

    let kindName = function
        | Sae -> "sae"
        | Transcoder -> "transcoder"
        | SkipTranscoder -> "skip_transcoder"
        | CrossLayerTranscoder -> "cross_layer_transcoder"

    let private kindOfName source = function
        | "sae" -> Sae
        | "transcoder" -> Transcoder
        | "skip_transcoder" -> SkipTranscoder
        | "cross_layer_transcoder" -> CrossLayerTranscoder
        | s -> fail "%s: architecture '%s' is not one of sae, transcoder, skip_transcoder, cross_layer_transcoder" source s

    let private floats (xs: float[]) = JsonArray(xs |> Array.map (fun v -> JsonValue.Create v :> JsonNode))
    let private ints (xs: int[]) = JsonArray(xs |> Array.map (fun v -> JsonValue.Create v :> JsonNode))
    let private strings (xs: string[]) = JsonArray(xs |> Array.map (fun v -> JsonValue.Create v :> JsonNode))

    let private scaleJson (s: ActivationScale) =
        let o = JsonObject()
        o["in"] <- floats s.In
        o["out"] <- floats s.Out
        o

    /// The JSON object of a config. SAELens field names are used where they exist (d_in, d_sae, d_out, hook_name,
    /// model_name, apply_b_dec_to_input).
    let toJsonNode (c: CoderConfig) : JsonObject =
        let o = JsonObject()
        o["format"] <- FormatName
        o["format_version"] <- FormatVersion
        o["architecture"] <- kindName c.Kind
        o["model_name"] <- c.Model
        o["layers"] <- ints c.Layers
        o["hook_names_in"] <- strings c.HookIn
        o["hook_names_out"] <- strings c.HookOut
        if c.Kind <> CrossLayerTranscoder then
            o["hook_name"] <- c.HookIn[0]
            o["hook_name_out"] <- c.HookOut[0]
            o["hook_layer"] <- c.Layers[0]
        o["d_in"] <- c.DIn
        o["d_out"] <- c.DOut
        o["d_sae"] <- c.DSae
        let act = JsonObject()
        match c.Activation with
        | ReLU -> act["kind"] <- "relu"
        | JumpReLU j ->
            act["kind"] <- "jumprelu"
            act["initial_threshold"] <- j.InitialThreshold
            act["bandwidth"] <- j.Bandwidth
        | TopK k ->
            act["kind"] <- "topk"
            act["k"] <- k
        | BatchTopK k ->
            act["kind"] <- "batchtopk"
            act["k"] <- k
        | GroupMax k ->
            act["kind"] <- "groupmax"
            act["k"] <- k
        o["activation"] <- act
        o["apply_b_dec_to_input"] <- (c.InputBias && c.Kind = Sae)
        o["input_bias"] <- c.InputBias
        o["decoder_norm"] <- (match c.Decoder with UnitNorm -> "unit" | Free -> "free")
        o["scale"] <- scaleJson c.Scale
        match c.FoldedScale with
        | Some s -> o["folded_scale"] <- scaleJson s
        | None -> ()
        o["dtype"] <- "float32"
        o

    let toJson (c: CoderConfig) =
        (toJsonNode c).ToJsonString(JsonSerializerOptions(WriteIndented = true))

    let private field (source: string) (o: JsonObject) (name: string) : JsonNode =
        match o[name] with
        | null -> fail "%s: field '%s' is missing" source name
        | n -> n

    let private get<'T> (source: string) (o: JsonObject) (name: string) : 'T =
        let n = field source o name
        try n.GetValue<'T>()
        with _ -> fail "%s: field '%s' should be a %s (got %s)" source name typeof<'T>.Name (n.ToJsonString())

    let private getArray<'T> (source: string) (o: JsonObject) (name: string) : 'T[] =
        match field source o name with
        | :? JsonArray as a ->
            a |> Seq.mapi (fun i n ->
                if isNull n then fail "%s: field '%s'[%d] is null" source name i
                try n.GetValue<'T>()
                with _ -> fail "%s: field '%s'[%d] should be a %s (got %s)" source name i typeof<'T>.Name (n.ToJsonString()))
            |> Array.ofSeq
        | n -> fail "%s: field '%s' should be an array (got %s)" source name (n.ToJsonString())

    let private getObject (source: string) (o: JsonObject) (name: string) : JsonObject =
        match field source o name with
        | :? JsonObject as x -> x
        | n -> fail "%s: field '%s' should be an object (got %s)" source name (n.ToJsonString())

    let private readScale source (o: JsonObject) name =
        let s = getObject source o name
        { In = getArray<float> source s "in"; Out = getArray<float> source s "out" }

    /// Parses and validates a config JSON object; `source` (a file name) is used in error messages.
    let ofJsonNode (source: string) (o: JsonObject) : CoderConfig =
        let fmt = get<string> source o "format"
        if fmt <> FormatName then fail "%s: not a coder config (format '%s', expected '%s')" source fmt FormatName
        let version = get<int> source o "format_version"
        if version < 1 || version > FormatVersion then
            fail "%s: format_version %d is not supported (this library reads 1..%d)" source version FormatVersion
        let dtype = get<string> source o "dtype"
        if dtype <> "float32" then fail "%s: dtype '%s' is not supported (float32 expected)" source dtype
        let act = getObject (source + " activation") o "activation"
        let asrc = source + ": activation"
        let activation =
            match get<string> asrc act "kind" with
            | "relu" -> ReLU
            | "jumprelu" -> JumpReLU { InitialThreshold = get<float> asrc act "initial_threshold"; Bandwidth = get<float> asrc act "bandwidth" }
            | "topk" -> TopK(get<int> asrc act "k")
            | "batchtopk" -> BatchTopK(get<float> asrc act "k")
            | "groupmax" -> GroupMax(get<int> asrc act "k")
            | k -> fail "%s: activation kind '%s' is not one of relu, jumprelu, topk, batchtopk, groupmax" source k
        let cfg =
            { Kind = kindOfName source (get<string> source o "architecture")
              Layers = getArray<int> source o "layers"
              HookIn = getArray<string> source o "hook_names_in"
              HookOut = getArray<string> source o "hook_names_out"
              DIn = get<int> source o "d_in"
              DOut = get<int> source o "d_out"
              DSae = get<int> source o "d_sae"
              Activation = activation
              InputBias = get<bool> source o "input_bias"
              Decoder =
                match get<string> source o "decoder_norm" with
                | "unit" -> UnitNorm
                | "free" -> Free
                | s -> fail "%s: decoder_norm '%s' is not one of unit, free" source s
              Scale = readScale source o "scale"
              FoldedScale = (match o["folded_scale"] with null -> None | _ -> Some(readScale source o "folded_scale"))
              Model = get<string> source o "model_name" }
        match problems cfg with
        | [] -> cfg
        | ps -> fail "%s: invalid coder config: %s" source (String.Join("; ", ps))

    /// Parses a config from JSON text.
    let ofJson (source: string) (json: string) : CoderConfig =
        let node =
            try JsonNode.Parse json
            with e -> fail "%s: not valid JSON (%s)" source e.Message
        match node with
        | :? JsonObject as o -> ofJsonNode source o
        | _ -> fail "%s: a JSON object was expected at the top level" source
