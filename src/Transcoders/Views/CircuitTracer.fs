namespace Transcoders.Views

open System
open System.Collections.Generic
open System.IO
open System.Text.RegularExpressions
open TorchSharp
open YamlDotNet.RepresentationModel
open Transcoders.Coders
open Transcoders.Files

/// circuit-tracer's on-disk layout for transcoders, both directions (the layout of its local cache and of its
/// Hugging Face repositories, as read by `load_transcoder_set` / `load_clt` and written by their `to_safetensors`;
/// followed as of circuit-tracer's main branch of early 2026, the version with `model_kind` configs and CLTs).
///
/// A folder holds `config.yaml` with `model_name`, `model_kind` ("transcoder_set" or "cross_layer_transcoder"),
/// `feature_input_hook` / `feature_output_hook` (TransformerLens hook names without the `blocks.{l}.` prefix, e.g.
/// "ln2.hook_normalized" / "hook_mlp_out"), `scan_name`, and for TopK `activation: topk` with `k`; and
///  - per-layer transcoders (ReLU, JumpReLU, TopK; with or without skip): `layer_{l}.safetensors` for each model layer
///    l, holding `W_enc` [F, d], `b_enc` [F], `W_dec` [F, d], `b_dec` [d], `activation_function.threshold` [F]
///    (JumpReLU), `W_skip` [d, d] (skip transcoders); circuit-tracer computes a = σ(x·W_encᵀ + b_enc),
///    ŷ = a·W_dec + b_dec + x·W_skipᵀ.
///  - a cross-layer transcoder over model layers 0..L−1 (ReLU or JumpReLU): `W_enc_{i}.safetensors` holding
///    `W_enc_{i}` [F, d], `b_enc_{i}` [F], `b_dec_{i}` [d], `threshold_{i}` [F] (JumpReLU), and `W_dec_{i}.safetensors`
///    holding `W_dec_{i}` [F, L−i, d] (layer i's features to the outputs of layers i..L−1).
///
/// Mapping from ours (`Coder`): our W_enc is [d_in, F] (x·W_enc), circuit-tracer's is its transpose [F, d_in]; W_dec
/// ([F, d_out], and [F, L−i, d_out] per CLT layer), b_enc, b_dec and W_skip ([d_out, d_in], applied as x·W_skipᵀ) are
/// the same in both. Activation scales and a transcoder's input bias are folded into the weights before export
/// (`CoderFile.folded`: b_enc ← b_enc − b_in·W_enc), so the files compute in the model's units. JumpReLU: we store
/// log θ and compute z·H(z − θ); circuit-tracer stores θ itself and computes z·(z > θ), the same function; a θ ≤ 0
/// cannot be represented by us and is refused on import. TopK: ours keeps the k largest ReLU'd pre-activations,
/// circuit-tracer's the k largest pre-activations without ReLU; the two agree unless one of a token's k largest
/// pre-activations is negative. circuit-tracer's transcoders have d_in = d_out = d_model, so coders with d_in ≠ d_out
/// are refused, as are SAEs, BatchTopK/GroupMax coders (convert BatchTopK to JumpReLU first), TopK CLTs, skip CLTs
/// and CLTs not covering layers 0..L−1. circuit-tracer itself needs a transcoder for every layer 0..n−1 of a set.
/// Our coder config is also kept in each safetensors file's metadata (`transcoders.coder`), which circuit-tracer
/// ignores, so a round trip restores every field (model name, decoder constraint, JumpReLU bandwidth).
[<RequireQualifiedAccess>]
module CircuitTracer =

    let private fail fmt = Printf.kprintf (fun s -> raise (CoderFile.CoderFileError s)) fmt
    let private showShape (shape: int64[]) = "[" + String.Join(", ", shape) + "]"

    /// circuit-tracer's `model_kind` for a coder configuration, or why there is none.
    let modelKind (c: CoderConfig) : Result<string, string> =
        let d = if c.DIn <> c.DOut then Some (sprintf "circuit-tracer's transcoders map d_model to d_model; this coder has d_in %d ≠ d_out %d" c.DIn c.DOut) else None
        match d with
        | Some e -> Error e
        | None ->
            match c.Kind, c.Activation with
            | Sae, _ -> Error "circuit-tracer reads transcoders, not SAEs (export SAEs in SAELens' layout)"
            | (Transcoder | SkipTranscoder), (ReLU | JumpReLU _ | TopK _) -> Ok "transcoder_set"
            | CrossLayerTranscoder, (ReLU | JumpReLU _) ->
                if c.Layers <> Array.init c.NLayers id then
                    Error (sprintf "circuit-tracer's cross-layer transcoder covers model layers 0..L−1; this one covers %A" c.Layers)
                else Ok "cross_layer_transcoder"
            | CrossLayerTranscoder, a -> Error (sprintf "circuit-tracer's cross-layer transcoders are ReLU or JumpReLU, not %A" a)
            | _, a -> Error (sprintf "circuit-tracer has no %A activation (ReLU, JumpReLU, TopK; convert BatchTopK to JumpReLU first)" a)

    /// The per-layer part of a hook name (`blocks.3.ln2.hook_normalized` at layer 3 → `ln2.hook_normalized`), as
    /// circuit-tracer's `feature_input_hook` / `feature_output_hook` name it.
    let hookSuffix (layer: int) (hook: string) : string =
        let prefix = sprintf "blocks.%d." layer
        if hook.StartsWith prefix then hook.Substring prefix.Length else hook

    let private activationName = function
        | ReLU -> "relu"
        | JumpReLU _ -> "jump_relu"
        | TopK _ -> "topk"
        | a -> sprintf "%A" a

    let private writeYaml (path: string) (entries: (string * obj) list) =
        let d = Dictionary<string, obj>()
        for k, v in entries do d[k] <- v
        let yaml = YamlDotNet.Serialization.SerializerBuilder().Build().Serialize(d)
        AtomicFile.writeAllText path yaml

    /// Writes `coders` into `folder` in circuit-tracer's layout: one cross-layer transcoder, or per-layer transcoders
    /// (of distinct layers, one kind, activation, width and hook pair) as a transcoder set. Returns the folder.
    let export (folder: string) (scanName: string) (coders: Coder list) : string =
        if coders.IsEmpty then invalidArg "coders" "circuit-tracer export: no coder given"
        for c in coders do
            match modelKind c.Config with
            | Ok _ -> ()
            | Error e -> fail "circuit-tracer export of %s: %s" (Splicing.describe c) e
        let first = coders.Head.Config
        let kind = (modelKind first |> Result.defaultValue "")
        if kind = "cross_layer_transcoder" && coders.Length > 1 then
            fail "circuit-tracer export: a cross-layer transcoder is exported alone (got %d coders)" coders.Length
        let describeSet (c: CoderConfig) =
            CoderConfig.kindName c.Kind, activationName c.Activation, (match c.Activation with TopK k -> k | _ -> 0), c.DIn, c.DSae,
            hookSuffix c.Layers[0] c.HookIn[0], hookSuffix c.Layers[0] c.HookOut[0]
        for c in coders.Tail do
            if describeSet c.Config <> describeSet first then
                fail "circuit-tracer export: a transcoder set needs one kind, activation, width and hook pair; %A differs from %A" (describeSet c.Config) (describeSet first)
        let layers = coders |> List.map (fun c -> c.Config.Layers[0])
        if kind = "transcoder_set" && (List.distinct layers).Length <> layers.Length then
            fail "circuit-tracer export: two transcoders of the same layer (%A)" layers
        Directory.CreateDirectory folder |> ignore
        for c in coders do
            use scope = torch.NewDisposeScope()
            use f = CoderFile.folded c
            let meta = Map [ "format", "pt"; CoderFile.MetadataKey, CoderConfig.toJson f.Config ]
            let sd = f.StateDict() |> dict
            let cfg = f.Config
            let contiguous (t: torch.Tensor) = t.contiguous()
            let at (name: string) (i: int) = sd[name].select(0, int64 i)
            if cfg.Kind = CrossLayerTranscoder then
                for i in 0 .. cfg.NLayers - 1 do
                    Safetensors.save (Path.Combine(folder, sprintf "W_enc_%d.safetensors" i)) meta
                        [ yield sprintf "W_enc_%d" i, contiguous ((at "W_enc" i).t())
                          yield sprintf "b_enc_%d" i, contiguous ((at "b_enc" i))
                          yield sprintf "b_dec_%d" i, contiguous ((at "b_dec" i))
                          match cfg.Activation with
                          | JumpReLU _ -> yield sprintf "threshold_%d" i, contiguous ((at "log_threshold" i).exp())
                          | _ -> () ]
                    Safetensors.save (Path.Combine(folder, sprintf "W_dec_%d.safetensors" i)) meta
                        [ sprintf "W_dec_%d" i, contiguous (sd[sprintf "W_dec_%d" i]) ]
            else
                Safetensors.save (Path.Combine(folder, sprintf "layer_%d.safetensors" (cfg.Layers[0]))) meta
                    [ yield "W_enc", contiguous ((at "W_enc" 0).t())
                      yield "W_dec", contiguous (sd["W_dec_0"].select(1, 0L))
                      yield "b_enc", contiguous ((at "b_enc" 0))
                      yield "b_dec", contiguous ((at "b_dec" 0))
                      match cfg.Activation with
                      | JumpReLU _ -> yield "activation_function.threshold", contiguous ((at "log_threshold" 0).exp())
                      | _ -> ()
                      if cfg.Kind = SkipTranscoder then yield "W_skip", contiguous ((at "W_skip" 0)) ]
        let l0 = first.Layers[0]
        writeYaml (Path.Combine(folder, "config.yaml"))
            [ yield "model_name", box first.Model
              yield "model_kind", box kind
              yield "feature_input_hook", box (hookSuffix l0 first.HookIn[0])
              yield "feature_output_hook", box (hookSuffix l0 first.HookOut[0])
              yield "scan_name", box scanName
              yield "activation", box (activationName first.Activation)
              match first.Activation with TopK k -> yield "k", box k | _ -> () ]
        folder

    /// The scalar fields of a circuit-tracer `config.yaml` (lists and mappings are skipped).
    let readConfig (path: string) : Map<string, string> =
        if not (File.Exists path) then fail "%s: not found (a circuit-tracer transcoder folder holds config.yaml and its safetensors files)" path
        let stream = YamlStream()
        try
            use reader = new StringReader(File.ReadAllText path)
            stream.Load reader
        with e -> fail "%s: not valid YAML (%s)" path e.Message
        if stream.Documents.Count = 0 then fail "%s: empty YAML file" path
        match stream.Documents[0].RootNode with
        | :? YamlMappingNode as m ->
            Map [ for KeyValue(k, v) in m.Children do
                    match k, v with
                    | (:? YamlScalarNode as k), (:? YamlScalarNode as v) when not (isNull v.Value) -> yield k.Value, v.Value
                    | _ -> () ]
        | _ -> fail "%s: the YAML document is not a mapping of fields" path

    /// Checks a file's header for one tensor: present, floating point, the expected shape.
    let private expect (reader: Safetensors.Reader) (what: string) (name: string) (shape: int64[]) =
        if not (reader.Contains name) then
            fail "%s: tensor '%s' (shape %s) is missing from circuit-tracer's %s layout" reader.Path name (showShape shape) what
        let e = reader.Info name
        match e.DType with
        | Safetensors.F32 | Safetensors.F16 | Safetensors.BF16 | Safetensors.F64 -> ()
        | d -> fail "%s: tensor '%s' has dtype %s; a floating-point dtype is needed" reader.Path name d.Name
        if e.Shape <> shape then fail "%s: tensor '%s' has shape %s, expected %s (%s)" reader.Path name (showShape e.Shape) (showShape shape) what

    /// The first dimension(s) of a tensor the layout sizes others by, after checking its rank.
    let private dims (reader: Safetensors.Reader) (name: string) (rank: int) : int64[] =
        if not (reader.Contains name) then fail "%s: tensor '%s' is missing from circuit-tracer's layout" reader.Path name
        let s = (reader.Info name).Shape
        if s.Length <> rank then fail "%s: tensor '%s' has shape %s; a %d-dimensional tensor is expected" reader.Path name (showShape s) rank
        s

    let private refuseOthers (reader: Safetensors.Reader) (known: Set<string>) =
        for e in reader.Entries do
            if not (known.Contains e.Name) then
                fail "%s: unexpected tensor '%s' (circuit-tracer's layout here holds %s)" reader.Path e.Name (String.Join(", ", known))

    let private read (options: Transcoders.Models.LoadOptions) (reader: Safetensors.Reader) (name: string) (device: torch.Device) =
        let t = reader.Tensor(name, device).to_type(torch.float32)
        match Transcoders.Models.CheckpointFile.nonFinite options name t with
        | Some problem -> fail "%s: %s" reader.Path problem
        | None -> t

    let private logThreshold (path: string) (name: string) (t: torch.Tensor) =
        use lowest = t.min()
        let m = lowest.item<float32> ()
        if not (m > 0.0f) then fail "%s: tensor '%s' holds a threshold %g ≤ 0, which a JumpReLU of this library cannot represent (it stores log θ)" path name m
        t.log()

    /// Our config stored in a file's metadata by `export`, when it describes this coder.
    let private ownConfig (reader: Safetensors.Reader) (fits: CoderConfig -> bool) : CoderConfig option =
        match reader.Metadata.TryFind CoderFile.MetadataKey with
        | Some json ->
            match (try Some (CoderConfig.ofJson reader.Path json) with _ -> None) with
            | Some c when fits c -> Some c
            | _ -> None
        | None -> None

    /// Unit-norm decoders claimed only where they hold (norm over all of a feature's decoders), else free.
    let private decoderNorm (wDecs: torch.Tensor list) =
        use scope = torch.NewDisposeScope()
        let sq = wDecs |> List.map (fun w -> w.square().reshape(w.shape[0], -1L).sum(1L)) |> List.reduce (+)
        let deviation = (sq.sqrt() - 1.0).abs().max().item<float32> ()
        if deviation > 1e-3f then Free else UnitNorm

    let private layerFile = Regex(@"^layer_(\d+)\.safetensors$")
    let private encFile = Regex(@"^W_enc_(\d+)\.safetensors$")

    /// Reads a circuit-tracer transcoder folder as coders on `device`: one coder per `layer_{l}.safetensors` of a
    /// transcoder set (ascending layers), or one cross-layer transcoder. Headers are checked (every tensor present,
    /// floating point, of the shape the layout implies) before any weight is read; weights holding NaN or ±∞ are
    /// refused unless `options` allows them.
    let importWith (options: Transcoders.Models.LoadOptions) (folder: string) (device: torch.Device) : Coder list =
        if not (Directory.Exists folder) then fail "%s: no such folder" folder
        let cfgPath = Path.Combine(folder, "config.yaml")
        let cfg = readConfig cfgPath
        let field name = match cfg.TryFind name with Some v -> v | None -> fail "%s: '%s' is missing" cfgPath name
        let model = defaultArg (cfg.TryFind "model_name") ""
        let hookIn, hookOut = field "feature_input_hook", field "feature_output_hook"
        let hook (l: int) (suffix: string) = if suffix.StartsWith "blocks." then suffix else sprintf "blocks.%d.%s" l suffix
        let activationField = cfg.TryFind "activation" |> Option.map (fun a -> a.ToLowerInvariant())
        let files pattern =
            Directory.GetFiles folder |> Array.choose (fun p ->
                let m = (pattern: Regex).Match(Path.GetFileName p)
                if m.Success then Some (int m.Groups[1].Value, p) else None) |> Array.sortBy fst
        match field "model_kind" with
        | "transcoder_set" ->
            let layerFiles = files layerFile
            if layerFiles.Length = 0 then fail "%s: no layer_{l}.safetensors files (model_kind transcoder_set, from %s)" folder cfgPath
            let configK = cfg.TryFind "k" |> Option.map (fun k -> match Int32.TryParse k with | true, v -> v | _ -> fail "%s: 'k' is '%s', not an integer" cfgPath k)
            let coders = List<Coder>()
            try
                for layer, path in layerFiles do
                    use scope = torch.NewDisposeScope()
                    use reader =
                        try Safetensors.Reader.Open path
                        with e -> fail "%s: cannot read safetensors file (%s)" path e.Message
                    let f = (dims reader "b_enc" 1)[0]
                    let d = (dims reader "b_dec" 1)[0]
                    let what = "per-layer transcoder"
                    expect reader what "W_enc" [| f; d |]
                    expect reader what "W_dec" [| f; d |]
                    let jump = reader.Contains "activation_function.threshold"
                    let skip = reader.Contains "W_skip"
                    if jump then expect reader what "activation_function.threshold" [| f |]
                    if skip then expect reader what "W_skip" [| d; d |]
                    let fileK =
                        if reader.Contains "k" then
                            use k = reader.Tensor("k", torch.CPU)
                            if k.NumberOfElements <> 1L then fail "%s: tensor 'k' must hold one number (got shape %s)" path (showShape k.shape)
                            Some (int (k.to_type(torch.int64).item<int64> ()))
                        else None
                    refuseOthers reader (set [ "W_enc"; "W_dec"; "b_enc"; "b_dec"; "activation_function.threshold"; "W_skip"; "k" ])
                    let activation =
                        match activationField with
                        | Some "topk" ->
                            match configK |> Option.orElse fileK with
                            | Some k -> TopK k
                            | None -> fail "%s: activation topk needs 'k' (in config.yaml or as tensor 'k' in %s)" cfgPath path
                        | Some ("relu" | "jump_relu" | "jumprelu") | None ->
                            if jump then JumpReLU JumpReLUSpec.Default
                            elif activationField = Some "jump_relu" || activationField = Some "jumprelu" then
                                fail "%s: tensor 'activation_function.threshold' is missing, but %s names activation jump_relu" path cfgPath
                            else ReLU
                        | Some a -> fail "%s: activation '%s' is not one this library reads (relu, jump_relu, topk)" cfgPath a
                    if jump && (match activation with JumpReLU _ -> false | _ -> true) then
                        fail "%s: tensor 'activation_function.threshold' is present, but %s names activation %s" path cfgPath (defaultArg activationField "")
                    let kind = if skip then SkipTranscoder else Transcoder
                    let baseCfg =
                        { Kind = kind; Layers = [| layer |]; HookIn = [| hook layer hookIn |]; HookOut = [| hook layer hookOut |]
                          DIn = int d; DOut = int d; DSae = int f; Activation = activation; InputBias = false; Decoder = UnitNorm
                          Scale = ActivationScale.Ones 1; FoldedScale = None; Model = model }
                    let wEnc = (read options reader "W_enc" device).t()
                    let wDec = read options reader "W_dec" device
                    let ours =
                        ownConfig reader (fun o ->
                            o.Kind = kind && o.Layers = baseCfg.Layers && o.DIn = baseCfg.DIn && o.DSae = baseCfg.DSae
                            && (match o.Activation, activation with
                                | ReLU, ReLU | JumpReLU _, JumpReLU _ -> true
                                | TopK a, TopK b -> a = b
                                | _ -> false))
                    let config =
                        match ours with
                        | Some o -> { o with Scale = ActivationScale.Ones 1; InputBias = false }
                        | None -> { baseCfg with Decoder = decoderNorm [ wDec ] }
                    let config =
                        try CoderConfig.validate config
                        with CoderConfigError e -> fail "%s: %s" path e
                    let tensors =
                        [ yield "W_enc", wEnc.unsqueeze 0
                          yield "b_enc", (read options reader "b_enc" device).unsqueeze 0
                          if jump then
                              yield "log_threshold", (logThreshold path "activation_function.threshold" (read options reader "activation_function.threshold" device)).unsqueeze 0
                          yield "W_dec_0", wDec.unsqueeze 1
                          yield "b_dec", (read options reader "b_dec" device).unsqueeze 0
                          if skip then yield "W_skip", (read options reader "W_skip" device).unsqueeze 0 ]
                    coders.Add(Coder.ofTensors config device tensors)
                List.ofSeq coders
            with _ ->
                for c in coders do (c :> IDisposable).Dispose()
                reraise ()
        | "cross_layer_transcoder" ->
            let encFiles = files encFile
            let n = encFiles.Length
            if n = 0 then fail "%s: no W_enc_{i}.safetensors files (model_kind cross_layer_transcoder, from %s)" folder cfgPath
            for i in 0 .. n - 1 do
                if fst encFiles[i] <> i then fail "%s: W_enc_%d.safetensors is missing (%d encoder files found; circuit-tracer numbers them 0..n−1)" folder i n
                let dec = Path.Combine(folder, sprintf "W_dec_%d.safetensors" i)
                if not (File.Exists dec) then fail "%s: not found (the decoder of layer %d's features)" dec i
            match activationField with
            | None | Some ("relu" | "jump_relu" | "jumprelu") -> ()
            | Some a -> fail "%s: activation '%s': circuit-tracer's cross-layer transcoders are relu or jump_relu" cfgPath a
            use scope = torch.NewDisposeScope()
            let readers = List<Safetensors.Reader>()
            try
                let openFile (path: string) =
                    let r =
                        try Safetensors.Reader.Open path
                        with e -> fail "%s: cannot read safetensors file (%s)" path e.Message
                    readers.Add r
                    r
                let encs = [| for i in 0 .. n - 1 -> openFile (Path.Combine(folder, sprintf "W_enc_%d.safetensors" i)) |]
                let decs = [| for i in 0 .. n - 1 -> openFile (Path.Combine(folder, sprintf "W_dec_%d.safetensors" i)) |]
                let fd = dims encs[0] "W_enc_0" 2
                let f, d = fd[0], fd[1]
                let jump = encs[0].Contains "threshold_0"
                let what = "cross-layer transcoder"
                for i in 0 .. n - 1 do
                    expect encs[i] what (sprintf "W_enc_%d" i) [| f; d |]
                    expect encs[i] what (sprintf "b_enc_%d" i) [| f |]
                    expect encs[i] what (sprintf "b_dec_%d" i) [| d |]
                    if jump then expect encs[i] what (sprintf "threshold_%d" i) [| f |]
                    refuseOthers encs[i] (set [ yield sprintf "W_enc_%d" i; yield sprintf "b_enc_%d" i; yield sprintf "b_dec_%d" i
                                                if jump then yield sprintf "threshold_%d" i ])
                    expect decs[i] what (sprintf "W_dec_%d" i) [| f; int64 (n - i); d |]
                    refuseOthers decs[i] (set [ sprintf "W_dec_%d" i ])
                if not jump && (activationField = Some "jump_relu" || activationField = Some "jumprelu") then
                    fail "%s: tensor 'threshold_0' is missing, but %s names activation jump_relu" encs[0].Path cfgPath
                let layers = Array.init n id
                let activation = if jump then JumpReLU JumpReLUSpec.Default else ReLU
                let wDecs = [ for i in 0 .. n - 1 -> read options decs[i] (sprintf "W_dec_%d" i) device ]
                let baseCfg =
                    { CoderConfig.crossLayer model layers (int d) (int f) with
                        HookIn = layers |> Array.map (fun l -> hook l hookIn); HookOut = layers |> Array.map (fun l -> hook l hookOut)
                        Activation = activation }
                let ours =
                    ownConfig encs[0] (fun o ->
                        o.Kind = CrossLayerTranscoder && o.Layers = layers && o.DIn = int d && o.DSae = int f
                        && (match o.Activation, activation with ReLU, ReLU | JumpReLU _, JumpReLU _ -> true | _ -> false))
                let config =
                    match ours with
                    | Some o -> { o with Scale = ActivationScale.Ones n; InputBias = false }
                    | None -> { baseCfg with Decoder = decoderNorm wDecs }
                let config =
                    try CoderConfig.validate config
                    with CoderConfigError e -> fail "%s: %s" cfgPath e
                let stack (name: int -> string) (transform: int -> torch.Tensor -> torch.Tensor) =
                    torch.stack([ for i in 0 .. n - 1 -> transform i (read options encs[i] (name i) device) ], 0L)
                let tensors =
                    [ yield "W_enc", stack (sprintf "W_enc_%d") (fun _ t -> t.t())
                      yield "b_enc", stack (sprintf "b_enc_%d") (fun _ t -> t)
                      if jump then yield "log_threshold", stack (sprintf "threshold_%d") (fun i t -> logThreshold encs[i].Path (sprintf "threshold_%d" i) t)
                      for i in 0 .. n - 1 do yield sprintf "W_dec_%d" i, wDecs[i]
                      yield "b_dec", stack (sprintf "b_dec_%d") (fun _ t -> t) ]
                [ Coder.ofTensors config device tensors ]
            finally
                for r in readers do (r :> IDisposable).Dispose()
        | k -> fail "%s: model_kind '%s' is not one this library reads (transcoder_set, cross_layer_transcoder)" cfgPath k

    /// `importWith LoadOptions.Default`: finite weights only.
    let import (folder: string) (device: torch.Device) : Coder list = importWith Transcoders.Models.LoadOptions.Default folder device
