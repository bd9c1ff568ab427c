namespace Transcoders.Circuits

open System
open System.IO
open System.Text.Json
open System.Text.Json.Nodes
open TorchSharp
open Transcoders.Files

/// A graph file that cannot be read: the message names the file and the field at fault.
exception GraphFileError of path: string * problem: string with
    override this.Message = sprintf "graph file '%s': %s" this.path this.problem

/// What a graph file holds besides the graph.
type GraphFileInfo =
    { /// The graph's scores, when computed.
      Scores: GraphScores option
      /// Free-form provenance (model, coders, prompt text, ...).
      Description: Map<string, string> }

    static member Empty = { Scores = None; Description = Map.empty }

/// Saving and loading attribution graphs: one safetensors file whose tensors are the adjacency blocks
/// (`adjacency.block_targets`/`block_sources` [blocks] give each block's size, `adjacency.targets`/`sources` the node
/// ids, `adjacency.weights` the row-major weights, float32) and whose metadata holds the rest as JSON under "graph":
/// tokens and their strings, the node lists (features as [layer, position, feature, activation], logits), the node
/// order, settings, stats and scores. Everything a converter to circuit-tracer's frontend JSON needs is there
/// (node ids follow the same order: features, errors, tokens, logits).
[<RequireQualifiedAccess>]
module GraphFile =

    [<Literal>]
    let FormatName = "transcoders.graph"

    [<Literal>]
    let FormatVersion = 1

    let private num (v: float) : JsonNode = if Double.IsFinite v then JsonValue.Create v :> JsonNode else null

    let private toJson (g: Graph) (info: GraphFileInfo) : string =
        let o = JsonObject()
        o["node_order"] <- JsonValue.Create "features (sorted by layer, position, feature), errors (layer-major: layer * n_positions + position), tokens, logits"
        o["n_layers"] <- JsonValue.Create g.NLayers
        o["tokens"] <- JsonArray([| for t in g.Tokens -> JsonValue.Create t :> JsonNode |])
        o["token_strings"] <- JsonArray([| for s in g.TokenStrings -> JsonValue.Create s :> JsonNode |])
        o["features"] <-
            JsonArray([| for f in g.Features ->
                           JsonArray([| JsonValue.Create f.Layer :> JsonNode; JsonValue.Create f.Position; JsonValue.Create f.Feature; num f.Activation |]) :> JsonNode |])
        o["logits"] <-
            JsonArray([| for l in g.Logits ->
                           let lo = JsonObject()
                           lo["token"] <- JsonValue.Create l.Token
                           lo["probability"] <- num l.Probability
                           lo["logit"] <- num l.Logit
                           lo :> JsonNode |])
        let s = JsonObject()
        s["max_logits"] <- JsonValue.Create g.Settings.MaxLogits
        s["desired_logit_probability"] <- num g.Settings.DesiredLogitProbability
        s["batch_size"] <- JsonValue.Create g.Settings.BatchSize
        s["max_feature_nodes"] <- (match g.Settings.MaxFeatureNodes with Some n -> JsonValue.Create n :> JsonNode | None -> null)
        s["update_interval"] <- JsonValue.Create g.Settings.UpdateInterval
        s["causal_cone"] <- JsonValue.Create g.Settings.CausalCone
        o["settings"] <- s
        let st = JsonObject()
        st["active_features"] <- JsonValue.Create g.Stats.ActiveFeatures
        st["batches"] <- JsonValue.Create g.Stats.Batches
        st["build_seconds"] <- num g.Stats.BuildSeconds
        st["ranking_seconds"] <- num g.Stats.RankingSeconds
        st["estimated_bytes"] <- JsonValue.Create g.Stats.EstimatedBytes
        o["stats"] <- st
        o["scores"] <-
            match info.Scores with
            | Some sc ->
                let so = JsonObject()
                so["replacement"] <- num sc.Replacement
                so["completeness"] <- num sc.Completeness
                so :> JsonNode
            | None -> null
        let d = JsonObject()
        for KeyValue(k, v) in info.Description do d[k] <- JsonValue.Create v
        o["description"] <- d
        o.ToJsonString()

    /// Writes the graph (and scores, description) to `path`, atomically.
    let saveWith (path: string) (info: GraphFileInfo) (g: Graph) : unit =
        use scope = torch.NewDisposeScope()
        let i64 (xs: int64[]) = torch.tensor(xs)
        let blocks = g.Blocks
        let tensors =
            [ "adjacency.block_targets", i64 (blocks |> Array.map (fun b -> int64 b.Targets.Length))
              "adjacency.block_sources", i64 (blocks |> Array.map (fun b -> int64 b.Sources.Length))
              "adjacency.targets", i64 (blocks |> Array.collect (fun b -> b.Targets |> Array.map int64))
              "adjacency.sources", i64 (blocks |> Array.collect (fun b -> b.Sources |> Array.map int64))
              "adjacency.weights", torch.tensor(blocks |> Array.collect (fun b -> b.Weights)) ]
        let metadata =
            Map.ofList [ "format", FormatName; "version", string FormatVersion; "graph", toJson g info ]
        Safetensors.save path metadata tensors

    /// Writes the graph to `path`, atomically.
    let save (path: string) (g: Graph) : unit = saveWith path GraphFileInfo.Empty g

    /// Reads a graph file, validating its format, every field and the consistency of the adjacency with the nodes;
    /// a GraphFileError (or SafetensorsError for a damaged container) names what is wrong.
    let loadWith (path: string) : Graph * GraphFileInfo =
        if not (File.Exists path) then raise (GraphFileError(path, "no such file"))
        let fail fmt = Printf.kprintf (fun s -> raise (GraphFileError(path, s))) fmt
        use reader = Safetensors.Reader.Open path
        let meta = reader.Metadata
        match meta.TryFind "format" with
        | Some f when f = FormatName -> ()
        | Some f -> fail "format '%s' is not an attribution graph (expected '%s')" f FormatName
        | None -> fail "no 'format' metadata: not an attribution graph file"
        match meta.TryFind "version" |> Option.map Int32.TryParse with
        | Some (true, v) when v >= 1 && v <= FormatVersion -> ()
        | Some (true, v) when v > FormatVersion -> fail "version %d is newer than this library reads (%d)" v FormatVersion
        | Some (true, v) -> fail "version %d is not a version of this format (1..%d)" v FormatVersion
        | _ -> fail "missing or unreadable 'version' metadata"
        let root =
            match meta.TryFind "graph" with
            | None -> fail "no 'graph' metadata"
            | Some text ->
                try JsonNode.Parse(text).AsObject()
                with e -> fail "the 'graph' metadata is not a JSON object (%s)" e.Message
        let tryProp (o: JsonObject) (name: string) : JsonNode option =
            let mutable v : JsonNode = null
            if o.TryGetPropertyValue(name, &v) && not (isNull v) then Some v else None
        let field (o: JsonObject) (name: string) : JsonNode =
            match tryProp o name with
            | Some v -> v
            | None -> fail "field '%s' is missing" name
        let show (n: JsonNode) = if isNull n then "null" else n.ToJsonString()
        let intOf (what: string) (n: JsonNode) : int =
            try n.GetValue<int>() with _ -> fail "%s must be an integer (got %s)" what (show n)
        let floatOf (what: string) (n: JsonNode) : float =
            if isNull n then nan
            else try n.GetValue<float>() with _ -> fail "%s must be a number (got %s)" what (show n)
        let arrayOf (what: string) (n: JsonNode) : JsonArray =
            match n with
            | :? JsonArray as a -> a
            | _ -> fail "%s must be an array" what
        let nLayers = intOf "n_layers" (field root "n_layers")
        if nLayers < 1 then fail "n_layers must be positive (got %d)" nLayers
        let tokens = arrayOf "tokens" (field root "tokens") |> Seq.mapi (fun i t -> intOf (sprintf "tokens[%d]" i) t) |> Array.ofSeq
        if tokens.Length = 0 then fail "tokens is empty"
        match tokens |> Array.tryFindIndex (fun t -> t < 0) with
        | Some i -> fail "tokens[%d] is the negative token id %d" i tokens[i]
        | None -> ()
        let p = tokens.Length
        let tokenStrings =
            arrayOf "token_strings" (field root "token_strings")
            |> Seq.mapi (fun i s -> try s.GetValue<string>() with _ -> fail "token_strings[%d] must be a string" i) |> Array.ofSeq
        if tokenStrings.Length <> 0 && tokenStrings.Length <> p then
            fail "token_strings has %d entries for %d tokens" tokenStrings.Length p
        let features =
            arrayOf "features" (field root "features")
            |> Seq.mapi (fun i n ->
                let a = arrayOf (sprintf "features[%d]" i) n
                if a.Count <> 4 then fail "features[%d] must be [layer, position, feature, activation]" i
                let f = { Layer = intOf (sprintf "features[%d].layer" i) a[0]; Position = intOf (sprintf "features[%d].position" i) a[1]
                          Feature = intOf (sprintf "features[%d].feature" i) a[2]; Activation = floatOf (sprintf "features[%d].activation" i) a[3] }
                if f.Layer < 0 || f.Layer >= nLayers then fail "features[%d] has layer %d outside 0..%d" i f.Layer (nLayers - 1)
                if f.Position < 0 || f.Position >= p then fail "features[%d] has position %d outside 0..%d" i f.Position (p - 1)
                if f.Feature < 0 then fail "features[%d] has a negative feature index" i
                if not (Double.IsFinite f.Activation) then fail "features[%d] has a non-finite activation" i
                f)
            |> Array.ofSeq
        let logits =
            arrayOf "logits" (field root "logits")
            |> Seq.mapi (fun i n ->
                let o = match n with :? JsonObject as o -> o | _ -> fail "logits[%d] must be an object" i
                let l = { Token = intOf (sprintf "logits[%d].token" i) (field o "token")
                          Probability = floatOf (sprintf "logits[%d].probability" i) (field o "probability")
                          Logit = floatOf (sprintf "logits[%d].logit" i) (field o "logit") }
                if l.Token < 0 then fail "logits[%d] has a negative token" i
                if not (l.Probability >= 0.0 && l.Probability <= 1.0) then fail "logits[%d] has probability %g outside [0, 1]" i l.Probability
                l)
            |> Array.ofSeq
        if logits.Length = 0 then fail "logits is empty: a graph explains at least one logit"
        let settingsO = match field root "settings" with :? JsonObject as o -> o | _ -> fail "settings must be an object"
        let optInt (o: JsonObject) name = tryProp o name |> Option.map (intOf name)
        let settings =
            { MaxLogits = intOf "settings.max_logits" (field settingsO "max_logits")
              DesiredLogitProbability = floatOf "settings.desired_logit_probability" (field settingsO "desired_logit_probability")
              BatchSize = intOf "settings.batch_size" (field settingsO "batch_size")
              MaxFeatureNodes = optInt settingsO "max_feature_nodes"
              UpdateInterval = intOf "settings.update_interval" (field settingsO "update_interval")
              CausalCone = (try (field settingsO "causal_cone").GetValue<bool>() with :? GraphFileError -> reraise () | _ -> fail "settings.causal_cone must be true or false") }
        let statsO = match field root "stats" with :? JsonObject as o -> o | _ -> fail "stats must be an object"
        let stats =
            { ActiveFeatures = intOf "stats.active_features" (field statsO "active_features")
              Batches = intOf "stats.batches" (field statsO "batches")
              BuildSeconds = floatOf "stats.build_seconds" (field statsO "build_seconds")
              RankingSeconds = (match tryProp statsO "ranking_seconds" with Some v -> floatOf "stats.ranking_seconds" v | None -> 0.0)
              EstimatedBytes = (try (field statsO "estimated_bytes").GetValue<int64>() with :? GraphFileError -> reraise () | _ -> fail "stats.estimated_bytes must be an integer") }
        let scores =
            match tryProp root "scores" with
            | Some (:? JsonObject as so) ->
                Some { Replacement = floatOf "scores.replacement" (tryProp so "replacement" |> Option.toObj)
                       Completeness = floatOf "scores.completeness" (tryProp so "completeness" |> Option.toObj) }
            | Some other -> fail "scores must be an object or null (got %s)" (other.ToJsonString())
            | None -> None
        let description =
            match tryProp root "description" with
            | Some (:? JsonObject as d) -> d |> Seq.map (fun kv -> kv.Key, (try kv.Value.GetValue<string>() with _ -> fail "description.%s must be a string" kv.Key)) |> Map.ofSeq
            | Some other -> fail "description must be an object of strings (got %s)" (other.ToJsonString())
            | None -> Map.empty
        // the adjacency
        let tensor (name: string) (dtype: torch.ScalarType) =
            if not (reader.Contains name) then fail "tensor '%s' is missing" name
            let t = reader.Tensor name
            if t.dtype <> dtype then
                let actual = t.dtype
                t.Dispose()
                fail "tensor '%s' has dtype %A, expected %A" name actual dtype
            if t.dim () <> 1L then
                t.Dispose()
                fail "tensor '%s' must be one-dimensional" name
            t
        let int64s name = use t = tensor name torch.int64 in t.data<int64>().ToArray()
        let blockTargets = int64s "adjacency.block_targets"
        let blockSources = int64s "adjacency.block_sources"
        let targets = int64s "adjacency.targets"
        let sources = int64s "adjacency.sources"
        let weights = (use t = tensor "adjacency.weights" torch.float32 in t.data<float32>().ToArray())
        if blockTargets.Length <> blockSources.Length then
            fail "adjacency.block_targets has %d blocks but adjacency.block_sources %d" blockTargets.Length blockSources.Length
        if Array.exists (fun n -> n < 0L) blockTargets || Array.exists (fun n -> n < 0L) blockSources then fail "negative block sizes"
        // Sizes are bounded by the id arrays before any product is taken: a corrupt size must not overflow.
        let total (what: string) (sizes: int64[]) (available: int) =
            let mutable sum = 0L
            for k in 0 .. sizes.Length - 1 do
                if sizes[k] > int64 available - sum then
                    fail "%s[%d] = %d: the blocks would need more than the %d entries %s holds" what k sizes[k] available
                        (if what.EndsWith "targets" then "adjacency.targets" else "adjacency.sources")
                sum <- sum + sizes[k]
            sum
        let rows = total "adjacency.block_targets" blockTargets targets.Length
        if rows <> int64 targets.Length then
            fail "the blocks have %d target rows in all but adjacency.targets holds %d" rows targets.Length
        let columns = total "adjacency.block_sources" blockSources sources.Length
        if columns <> int64 sources.Length then
            fail "the blocks have %d source columns in all but adjacency.sources holds %d" columns sources.Length
        // each block is at most targets.Length × sources.Length (< 2^62), and so is their sum
        let cells = Array.map2 (*) blockTargets blockSources |> Array.sum
        if cells <> int64 weights.Length then
            fail "the blocks have %d weights in all but adjacency.weights holds %d" cells weights.Length
        let nodeCount = features.Length + (nLayers + 1) * p + logits.Length
        let tokenStart = features.Length + nLayers * p
        let check (what: string) (ids: int64[]) =
            match ids |> Array.tryFind (fun i -> i < 0L || i >= int64 nodeCount) with
            | Some i -> fail "%s holds node id %d outside 0..%d" what i (nodeCount - 1)
            | None -> ()
        check "adjacency.targets" targets
        check "adjacency.sources" sources
        // targets are features or logits; sources are features, errors or tokens
        match targets |> Array.tryFind (fun i -> i >= int64 features.Length && i < int64 (tokenStart + p)) with
        | Some i -> fail "adjacency.targets holds node %d, an error or token node (they have no incoming edges)" i
        | None -> ()
        match sources |> Array.tryFind (fun i -> i >= int64 (tokenStart + p)) with
        | Some i -> fail "adjacency.sources holds node %d, a logit node (logits have no outgoing edges)" i
        | None -> ()
        match weights |> Array.tryFindIndex (fun w -> not (Single.IsFinite w)) with
        | Some i -> fail "adjacency.weights[%d] is not finite" i
        | None -> ()
        let blocks =
            let mutable ti, si, wi = 0, 0, 0
            [| for k in 0 .. blockTargets.Length - 1 do
                 let nt, ns = int blockTargets[k], int blockSources[k]
                 let b = { Targets = targets[ti .. ti + nt - 1] |> Array.map int
                           Sources = sources[si .. si + ns - 1] |> Array.map int
                           Weights = weights[wi .. wi + nt * ns - 1] }
                 ti <- ti + nt
                 si <- si + ns
                 wi <- wi + nt * ns
                 yield b |]
        { Tokens = tokens; TokenStrings = tokenStrings; NLayers = nLayers; Features = features; Logits = logits
          Blocks = blocks; Settings = settings; Stats = stats },
        { Scores = scores; Description = description }

    /// Reads a graph file (see `loadWith`).
    let load (path: string) : Graph = fst (loadWith path)
