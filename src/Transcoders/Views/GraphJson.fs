namespace Transcoders.Views

open System
open System.IO
open System.Text.Json
open System.Text.Json.Nodes
open Transcoders.Circuits
open Transcoders.Files

/// How error nodes are named in circuit-tracer's graph JSON.
type ErrorIdStyle =
    /// `{layer}_-1_{pos}` (jsNodeId `{layer}_-1-{pos}`): circuit-tracer's frontend/graph_models.py since its fix of
    /// issue #78 (PR #102). Never collides with a feature id. The default.
    | Current
    /// `0_{layer}_{pos}` (jsNodeId `{layer}_{pos}-0`): the original convention. It collides with feature `layer` of
    /// layer 0 at the same position, so the exporter refuses a graph where that happens.
    | Legacy

/// What a graph export needs besides the graph.
type GraphExportOptions =
    { /// The graph's name in the frontend (file `{slug}.json`).
      Slug: string
      /// The model / coder set id (`metadata.scan`); also the folder of the feature files.
      Scan: string
      /// The prompt text.
      Prompt: string
      /// Display text of a token id (for prompt_tokens and logit labels).
      TokenText: int -> string
      NodeThreshold: float
      EdgeThreshold: float
      ErrorIds: ErrorIdStyle
      /// `metadata.transcoder_list` (circuit-tracer's field; names of the coders used).
      TranscoderList: string list
      /// Where pruning runs.
      Device: TorchSharp.torch.Device }

    static member Create(slug: string, scan: string, prompt: string, tokenText: int -> string) =
        { Slug = slug; Scan = scan; Prompt = prompt; TokenText = tokenText; NodeThreshold = 0.8; EdgeThreshold = 0.98
          ErrorIds = Current; TranscoderList = []; Device = TorchSharp.torch.CPU }

/// A node of a circuit-tracer / Neuronpedia graph JSON file.
type GraphJsonNode =
    { NodeId: string
      Feature: int option
      Layer: string
      CtxIdx: int
      FeatureType: string
      JsNodeId: string
      Clerp: string
      Influence: float option
      Activation: float option
      TokenProb: float
      IsTargetLogit: bool }

/// A link: source and target node ids, weight.
type GraphJsonLink = { Source: string; Target: string; Weight: float }

/// A graph JSON file as read (every field of the schema; `QParams` kept as JSON).
type GraphJsonDocument =
    { Slug: string
      Scan: string
      Prompt: string
      PromptTokens: string[]
      NodeThreshold: float option
      Nodes: GraphJsonNode[]
      Links: GraphJsonLink[]
      QParams: JsonObject
      Metadata: JsonObject }

/// circuit-tracer's and Neuronpedia's attribution-graph JSON, both directions.
///
/// Schema followed: Neuronpedia's "Anthropic Attribution Graph" JSON schema version 1.0.0
/// (`apps/webapp/app/api/graph/graph-schema.json`) together with circuit-tracer's pydantic models
/// (`circuit_tracer/frontend/graph_models.py`, `schema_version` 1): top level `metadata`, `qParams`, `nodes`, `links`;
/// node ids `{layer}_{feature}_{pos}` (features, `feature` = Cantor pairing of layer and index, as circuit-tracer),
/// errors (see `ErrorIdStyle`), `E_{token}_{pos}` (embeddings), `{n_layers+1}_{token}_{pos}` (logits, at the last
/// position); `influence` is the node's cumulative influence (what `node_threshold` is compared with), as
/// circuit-tracer's `create_graph_files` writes it. The local frontend's index `graph-metadata.json`
/// ({"graphs": [metadata, ...]}) is kept up to date, and feature files go to `features/{scan}/{feature}.json`.
[<RequireQualifiedAccess>]
module GraphJson =

    [<Literal>]
    let SchemaVersion = "Anthropic Attribution Graph schema 1.0.0 (Neuronpedia graph-schema.json); circuit-tracer graph_models.py schema_version 1"

    /// circuit-tracer's feature number for (layer, index): the Cantor pairing (x + y)(x + y + 1)/2 + y.
    let cantor (layer: int) (feature: int) : int64 =
        let x, y = int64 layer, int64 feature
        (x + y) * (x + y + 1L) / 2L + y

    /// The inverse of `cantor`.
    let uncantor (z: int64) : int * int =
        let w = int64 (Math.Floor((Math.Sqrt(8.0 * float z + 1.0) - 1.0) / 2.0))
        let w = if (w + 1L) * (w + 2L) / 2L <= z then w + 1L elif w * (w + 1L) / 2L > z then w - 1L else w
        let t = w * (w + 1L) / 2L
        let y = z - t
        int (w - y), int y

    /// The circuit-tracer id of a node of the graph.
    let nodeId (style: ErrorIdStyle) (g: Graph) (id: int) : string =
        match Graph.node g id with
        | GraphNode.Feature f -> sprintf "%d_%d_%d" f.Layer f.Feature f.Position
        | GraphNode.Error (l, p) -> (match style with Current -> sprintf "%d_-1_%d" l p | Legacy -> sprintf "0_%d_%d" l p)
        | GraphNode.Token (p, t) -> sprintf "E_%d_%d" t p
        | GraphNode.Logit l -> sprintf "%d_%d_%d" (g.NLayers + 1) l.Token (g.NPositions - 1)

    let private jsNodeId (style: ErrorIdStyle) (g: Graph) (id: int) : string =
        match Graph.node g id with
        | GraphNode.Feature f -> sprintf "%d_%d-0" f.Layer f.Feature
        | GraphNode.Error (l, p) -> (match style with Current -> sprintf "%d_-1-%d" l p | Legacy -> sprintf "%d_%d-0" l p)
        | GraphNode.Token (p, t) -> sprintf "E_%d-%d" t p
        | GraphNode.Logit l -> sprintf "L_%d-%d" l.Token (g.NPositions - 1)

    let private generator () =
        let v = Reflection.Assembly.GetExecutingAssembly().GetName().Version
        Page.obj [ "name", Page.str "Transcoders (.NET)"; "version", Page.str (string v) ]

    /// The graph as circuit-tracer's JSON: pruned with the options' thresholds (`Pruning.prune`), nodes without edges
    /// dropped except tokens and logits (as `create_used_nodes_and_edges`).
    let toJson (options: GraphExportOptions) (g: Graph) : JsonObject =
        let pruned = Pruning.prune { NodeThreshold = options.NodeThreshold; EdgeThreshold = options.EdgeThreshold; Device = options.Device } g
        let ids = Array.init g.NodeCount (nodeId options.ErrorIds g)
        // refuse id collisions (possible only with the legacy error ids)
        let seen = Collections.Generic.Dictionary<string, int>()
        for i in pruned.KeptNodes do
            match seen.TryGetValue ids[i] with
            | true, j -> invalidOp (sprintf "node id '%s' is used by both %s and %s: export with ErrorIdStyle.Current" ids[i] (Graph.label g j) (Graph.label g i))
            | _ -> seen[ids[i]] <- i
        let connected = Collections.Generic.HashSet<int>()
        let links =
            [| for e in pruned.Edges do
                   if pruned.NodeMask[e.Source] && pruned.NodeMask[e.Target] then
                       connected.Add e.Source |> ignore
                       connected.Add e.Target |> ignore
                       yield Page.obj [ "source", Page.str ids[e.Source]; "target", Page.str ids[e.Target]; "weight", Page.num (float e.Weight) ] |]
        let nodes =
            [| for i in pruned.KeptNodes do
                   let node = Graph.node g i
                   let keep = match node with GraphNode.Token _ | GraphNode.Logit _ -> true | _ -> connected.Contains i
                   if keep then
                       let infl = Page.num pruned.CumulativeInfluence[i]
                       let common (feature: int64) (layer: string) (ctx: int) (ftype: string) (clerp: string) (prob: float) (target: bool) (act: JsonNode) =
                           Page.obj [ "node_id", Page.str ids[i]; "feature", Page.int64 feature; "layer", Page.str layer
                                      "ctx_idx", Page.int ctx; "feature_type", Page.str ftype; "token_prob", Page.num prob
                                      "is_target_logit", Page.bool target; "run_idx", Page.int 0; "reverse_ctx_idx", Page.int 0
                                      "jsNodeId", Page.str (jsNodeId options.ErrorIds g i); "clerp", Page.str clerp
                                      "influence", infl; "activation", act ]
                       match node with
                       | GraphNode.Feature f -> yield common (cantor f.Layer f.Feature) (string f.Layer) f.Position "cross layer transcoder" "" 0.0 false (Page.num f.Activation)
                       | GraphNode.Error (l, p) -> yield common -1L (string l) p "mlp reconstruction error" "" 0.0 false null
                       | GraphNode.Token (p, _) -> yield common (int64 p) "E" p "embedding" "" 0.0 false null
                       | GraphNode.Logit l ->
                           let k = i - g.LogitStart
                           let clerp = sprintf "Output \"%s\" (p=%.3f)" (options.TokenText l.Token) l.Probability
                           yield common (int64 l.Token) (string (g.NLayers + 1)) (g.NPositions - 1) "logit" clerp l.Probability (k = 0) null |]
        let metadata =
            Page.obj [
                "slug", Page.str options.Slug
                "scan", Page.str options.Scan
                "transcoder_list", Page.arr (options.TranscoderList |> List.map Page.str)
                "prompt_tokens", Page.arr [ for t in g.Tokens -> Page.str (options.TokenText t) ]
                "prompt", Page.str options.Prompt
                "node_threshold", Page.num options.NodeThreshold
                "schema_version", Page.int 1
                "info", Page.obj [ "generator", generator ()
                                   "create_time_ms", Page.int64 (DateTimeOffset.UtcNow.ToUnixTimeMilliseconds())
                                   "description", Page.str SchemaVersion ]
                "generation_settings", Page.obj [ "max_n_logits", Page.int g.Settings.MaxLogits
                                                  "desired_logit_prob", Page.num g.Settings.DesiredLogitProbability
                                                  "batch_size", Page.int g.Settings.BatchSize
                                                  "max_feature_nodes", (match g.Settings.MaxFeatureNodes with Some n -> Page.int n | None -> null) ]
                "pruning_settings", Page.obj [ "node_threshold", Page.num options.NodeThreshold; "edge_threshold", Page.num options.EdgeThreshold ] ]
        let root = JsonObject()
        root["metadata"] <- metadata
        root["qParams"] <- Page.obj [ "pinnedIds", Page.arr []; "supernodes", Page.arr []; "linkType", Page.str "both"; "clickedId", Page.str ""; "sg_pos", Page.str "" ]
        root["nodes"] <- Page.arr nodes
        root["links"] <- Page.arr links
        root

    /// Adds (or replaces, by slug) a graph's metadata in `graph-metadata.json` of `folder`.
    let addToIndex (folder: string) (metadata: JsonNode) =
        let path = Path.Combine(folder, "graph-metadata.json")
        let graphs =
            if File.Exists path then
                match JsonNode.Parse(File.ReadAllText path) with
                | :? JsonObject as o when (o["graphs"] :? JsonArray) -> o["graphs"].AsArray()
                | _ -> failwithf "%s is not a graph index ({\"graphs\": [...]})" path
            else JsonArray()
        let slug = metadata["slug"].GetValue<string>()
        let kept = [| for n in graphs do if not (isNull n) && (try n["slug"].GetValue<string>() <> slug with _ -> true) then yield n.DeepClone() |]
        let o = JsonObject()
        o["graphs"] <- JsonArray(Array.append kept [| metadata.DeepClone() |])
        AtomicFile.writeAllText path (o.ToJsonString(JsonSerializerOptions(WriteIndented = true)))

    /// Writes `{slug}.json` into `folder` and updates `graph-metadata.json` there; returns the graph file's path.
    let export (folder: string) (options: GraphExportOptions) (g: Graph) : string =
        Directory.CreateDirectory folder |> ignore
        let root = toJson options g
        let path = Path.Combine(folder, options.Slug + ".json")
        AtomicFile.writeAllText path (root.ToJsonString(JsonSerializerOptions(WriteIndented = true)))
        addToIndex folder root["metadata"]
        path

    // ---- reading ----

    let private fail (path: string) fmt = Printf.kprintf (fun s -> failwithf "graph JSON '%s': %s" path s) fmt

    /// Reads a graph JSON file (ours or circuit-tracer's / Neuronpedia's), checking the schema's required fields.
    let parse (source: string) (text: string) : GraphJsonDocument =
        let root =
            try JsonNode.Parse(text).AsObject()
            with e -> fail source "not a JSON object (%s)" e.Message
        let obj (o: JsonObject) (name: string) =
            match o[name] with
            | :? JsonObject as x -> x
            | null -> fail source "required field '%s' is missing" name
            | _ -> fail source "'%s' must be an object" name
        let arr (o: JsonObject) (name: string) =
            match o[name] with
            | :? JsonArray as x -> x
            | null -> fail source "required field '%s' is missing" name
            | _ -> fail source "'%s' must be an array" name
        let str (o: JsonObject) (name: string) (where: string) =
            match o[name] with
            | null -> fail source "%s: required field '%s' is missing" where name
            | v -> try v.GetValue<string>() with _ -> fail source "%s: '%s' must be a string" where name
        let optNum (o: JsonObject) (name: string) =
            match o[name] with
            | null -> None
            | v -> try Some (v.GetValue<float>()) with _ -> None
        let metadata = obj root "metadata"
        let qParams = obj root "qParams"
        let nodes =
            arr root "nodes"
            |> Seq.mapi (fun i n ->
                let o = match n with :? JsonObject as o -> o | _ -> fail source "nodes[%d] must be an object" i
                let where = sprintf "nodes[%d]" i
                let feature =
                    match o["feature"] with
                    | null -> if o.ContainsKey "feature" then None else fail source "%s: required field 'feature' is missing" where
                    | v -> try Some (int (v.GetValue<int64>())) with _ -> fail source "%s: 'feature' must be an integer or null" where
                let layer =
                    match o["layer"] with
                    | null -> fail source "%s: required field 'layer' is missing" where
                    | v -> match v.GetValueKind() with
                           | JsonValueKind.String -> v.GetValue<string>()
                           | JsonValueKind.Number -> string (v.GetValue<int>())
                           | _ -> fail source "%s: 'layer' must be a string or an integer" where
                let ctx =
                    match o["ctx_idx"] with
                    | null -> fail source "%s: required field 'ctx_idx' is missing" where
                    | v -> try v.GetValue<int>() with _ -> fail source "%s: 'ctx_idx' must be an integer" where
                { NodeId = str o "node_id" where
                  Feature = feature
                  Layer = layer
                  CtxIdx = ctx
                  FeatureType = str o "feature_type" where
                  JsNodeId = str o "jsNodeId" where
                  Clerp = str o "clerp" where
                  Influence = optNum o "influence"
                  Activation = optNum o "activation"
                  TokenProb = optNum o "token_prob" |> Option.defaultValue 0.0
                  IsTargetLogit = (match o["is_target_logit"] with null -> false | v -> try v.GetValue<bool>() with _ -> false) })
            |> Array.ofSeq
        let links =
            arr root "links"
            |> Seq.mapi (fun i n ->
                let o = match n with :? JsonObject as o -> o | _ -> fail source "links[%d] must be an object" i
                let where = sprintf "links[%d]" i
                { Source = str o "source" where; Target = str o "target" where
                  Weight = (match optNum o "weight" with Some w -> w | None -> fail source "%s: 'weight' must be a number" where) })
            |> Array.ofSeq
        let ids = nodes |> Array.map (fun n -> n.NodeId)
        match ids |> Array.countBy id |> Array.tryFind (fun (_, c) -> c > 1) with
        | Some (d, _) -> fail source "node id '%s' occurs more than once" d
        | None -> ()
        let idSet = set ids
        for l in links do
            if not (idSet.Contains l.Source) then fail source "link source '%s' is not a node" l.Source
            if not (idSet.Contains l.Target) then fail source "link target '%s' is not a node" l.Target
        { Slug = str metadata "slug" "metadata"
          Scan = str metadata "scan" "metadata"
          Prompt = str metadata "prompt" "metadata"
          PromptTokens =
            (match metadata["prompt_tokens"] with
             | :? JsonArray as a -> [| for t in a -> t.GetValue<string>() |]
             | _ -> fail source "metadata: required field 'prompt_tokens' is missing")
          NodeThreshold = optNum metadata "node_threshold"
          Nodes = nodes
          Links = links
          QParams = qParams
          Metadata = metadata }

    /// Reads a graph JSON file.
    let load (path: string) : GraphJsonDocument = parse path (File.ReadAllText path)

    /// The graph a JSON file describes, as this library's `Graph`: its feature nodes, every error and token node of the
    /// prompt, its logits and its links (one adjacency block per target). Error nodes are recognised by
    /// `feature_type` (both id styles read); token ids come from the `E_{token}_{pos}` ids.
    let toGraph (doc: GraphJsonDocument) : Graph =
        let src = doc.Slug
        let parts (id: string) = id.Split('_')
        let logits = doc.Nodes |> Array.filter (fun n -> n.FeatureType = "logit")
        let features = doc.Nodes |> Array.filter (fun n -> n.FeatureType = "cross layer transcoder" || n.FeatureType = "transcoder")
        let nLayers =
            if logits.Length > 0 then int logits[0].Layer - 1
            else
                let layersOf = doc.Nodes |> Array.choose (fun n -> match Int32.TryParse n.Layer with | true, l -> Some l | _ -> None)
                if layersOf.Length = 0 then 1 else Array.max layersOf + 1
        let nPos = max doc.PromptTokens.Length ((doc.Nodes |> Array.map (fun n -> n.CtxIdx + 1)) |> Array.fold max 0)
        let tokens = Array.zeroCreate<int> nPos
        for n in doc.Nodes do
            if n.FeatureType = "embedding" then
                let p = parts n.NodeId
                if p.Length <> 3 || p[0] <> "E" then fail src "embedding node '%s' is not E_{token}_{pos}" n.NodeId
                tokens[n.CtxIdx] <- int p[1]
        let featureNodes =
            features
            |> Array.map (fun n ->
                let p = parts n.NodeId
                if p.Length <> 3 then fail src "feature node '%s' is not {layer}_{feature}_{pos}" n.NodeId
                { Layer = int p[0]; Feature = int p[1]; Position = int p[2]; Activation = defaultArg n.Activation nan })
            |> Array.sortBy (fun f -> f.Layer, f.Position, f.Feature)
        let logitNodes =
            logits
            |> Array.sortBy (fun n -> (if n.IsTargetLogit then 0 else 1), -n.TokenProb)
            |> Array.map (fun n ->
                let p = parts n.NodeId
                { Token = int p[1]; Probability = n.TokenProb; Logit = nan })
        let g0 =
            { Tokens = tokens; TokenStrings = (if doc.PromptTokens.Length = nPos then doc.PromptTokens else [||]); NLayers = nLayers
              Features = featureNodes; Logits = logitNodes; Blocks = [||]
              Settings = { MaxLogits = logitNodes.Length; DesiredLogitProbability = 0.95; BatchSize = 64; MaxFeatureNodes = None; UpdateInterval = 4; CausalCone = true }
              Stats = { ActiveFeatures = featureNodes.Length; Batches = 0; BuildSeconds = 0.0; RankingSeconds = 0.0; EstimatedBytes = 0L } }
        let fIndex = Graph.featureIndex g0
        let logitIndex = logitNodes |> Array.mapi (fun k l -> l.Token, k) |> dict
        let idOf (n: GraphJsonNode) =
            match n.FeatureType with
            | "embedding" -> Graph.tokenNode g0 n.CtxIdx
            | "logit" -> let p = parts n.NodeId in Graph.logitNode g0 logitIndex[int p[1]]
            | "mlp reconstruction error" -> Graph.errorNode g0 (int n.Layer) n.CtxIdx
            | "cross layer transcoder" | "transcoder" ->
                let p = parts n.NodeId
                fIndex[{ FeatureAt.Layer = int p[0]; Position = int p[2]; Feature = int p[1] }]
            | t -> fail src "node '%s' has feature_type '%s', which this library's graphs do not hold" n.NodeId t
        let byId = doc.Nodes |> Array.map (fun n -> n.NodeId, idOf n) |> dict
        let blocks =
            doc.Links
            |> Array.groupBy (fun l -> byId[l.Target])
            |> Array.sortBy fst
            |> Array.map (fun (t, ls) ->
                let ls = ls |> Array.sortBy (fun l -> byId[l.Source])
                { Targets = [| t |]; Sources = ls |> Array.map (fun l -> byId[l.Source]); Weights = ls |> Array.map (fun l -> float32 l.Weight) })
        { g0 with Blocks = blocks }

    // ---- feature files ----

    /// circuit-tracer's feature file of one feature (`examples_quantiles`, `top_logits`, `bottom_logits`, `act_min`,
    /// `act_max`, `quantile_values`, `histogram`, `activation_frequency`).
    let featureJson (tokenText: int -> string) (layer: int) (s: FeatureSummary) (w: FeatureWeights option) : JsonObject =
        let example (e: FeatureExample) =
            Page.obj [ "tokens", Page.arr (e.Tokens |> Seq.map (tokenText >> Page.str))
                       "tokens_acts_list", Page.arr (e.Acts |> Seq.map (float >> Page.num))
                       "train_token_ind", Page.int e.Center
                       "is_repeated_datapoint", Page.bool false ]
        let bands = FeatureStats.quantileExamples 5 5 s
        let _, hist = FeatureStats.linearHistogram 50 s
        let o = JsonObject()
        o["index"] <- Page.int64 (cantor layer s.Feature)
        o["examples_quantiles"] <-
            Page.arr [ yield Page.obj [ "quantile_name", Page.str "Top activations"; "examples", Page.arr (s.Top |> Seq.map example) ]
                       for (lo, hi, es) in bands ->
                           Page.obj [ "quantile_name", Page.str (sprintf "Quantile %.0f-%.0f%%" (100.0 * lo) (100.0 * hi))
                                      "examples", Page.arr (es |> Seq.map example) ] ]
        let tokens (pick: FeatureWeights -> TokenScore[]) =
            match w with
            | Some w -> Page.arr (pick w |> Seq.map (fun x -> Page.str (tokenText x.Token)))
            | None -> Page.arr []
        o["top_logits"] <- tokens (fun w -> w.TopLogits)
        o["bottom_logits"] <- tokens (fun w -> w.BottomLogits)
        o["act_min"] <- Page.num (if s.Count = 0L then 0.0 else s.MinPositive)
        o["act_max"] <- Page.num s.Max
        o["quantile_values"] <- Page.arr [ for q in 0 .. 100 -> Page.num (FeatureStats.quantile s (float q / 100.0)) ]
        o["histogram"] <- Page.arr (hist |> Seq.map Page.num)
        o["activation_frequency"] <- Page.num s.Frequency
        o

    /// Writes `features/{scan}/{cantor(layer, feature)}.json` under `folder` for every live feature of the dashboards;
    /// returns the folder written.
    let exportFeatures (folder: string) (scan: string) (tokenText: int -> string) (dashboards: CoderDashboard seq) : string =
        let dir = Path.Combine(folder, "features", scan)
        Directory.CreateDirectory dir |> ignore
        for d in dashboards do
            for l in d.Layers do
                for s in l.Summaries do
                    if s.Count > 0L then
                        let w = l.Weights |> Option.map (fun w -> w[s.Feature])
                        let path = Path.Combine(dir, sprintf "%d.json" (cantor l.Layer s.Feature))
                        File.WriteAllText(path, (featureJson tokenText l.Layer s w).ToJsonString())
        dir
