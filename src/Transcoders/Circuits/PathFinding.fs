/// The circuit search of Dunefsky, Chlenski & Nanda 2024, "Transcoders find interpretable LLM feature circuits"
/// (NeurIPS 2024, arXiv 2406.11944): Algorithm 1, greedy computational-path-finding (from
/// a root feature vector, take each node's strongest direct contributors, top-k per layer then the best overall, and
/// keep a beam of the best paths at each depth, down to the embeddings), and Algorithm 2, merging paths into a graph
/// whose edges sum the path attributions, with error nodes (transcoder error, bias, pruning) that make every node's
/// value add up. Path filters (infix, not-infix, suffix) and the summed top features of a set of paths.
namespace Transcoders.Circuits

open System
open System.Text

/// Comparisons for node filters.
type Compare =
    | Eq
    | Ne
    | Lt
    | Le
    | Gt
    | Ge

/// Which nodes a filter matches (the paper's `FeatureFilter`, as composable data).
type NodeFilter =
    /// Every node.
    | AnyNode
    | OfKind of ComponentKind
    /// Layer compared with a number (embeddings are layer 0; logits have no layer and never match).
    | AtLayer of Compare * int
    /// Token position (a head's source position) compared with a number.
    | AtPosition of Compare * int
    /// An attention head with this index.
    | WithHead of int
    /// A transcoder feature with this index.
    | WithFeature of int
    /// Exactly this component.
    | IsComponent of Component
    | Not of NodeFilter
    | AllOf of NodeFilter list
    | AnyOf of NodeFilter list

/// Filters over whole paths (the paper's `get_paths_via_filter`).
type PathFilter =
    /// Some contiguous run of nodes matches these filters in order.
    | Infix of NodeFilter list
    /// No contiguous run of nodes matches these filters in order.
    | NotInfix of NodeFilter list
    /// The last nodes match these filters in order.
    | Suffix of NodeFilter list

/// How candidates and paths are ranked.
type Ranking =
    /// By signed attribution, keeping only positive ones (excitatory paths, as the paper).
    | Positive
    /// By the magnitude of the attribution (excitatory and inhibitory paths).
    | Magnitude

/// Options of the greedy path search.
type PathSearchOptions =
    { /// Iterations: the longest paths have Depth + 1 nodes (the root and Depth contributors).
      Depth: int
      /// Candidates kept per transcoder layer and per attention layer before the overall choice.
      PerLayer: int
      /// Contributors expanded per node (the best overall among the per-layer candidates and the embeddings).
      Branches: int
      /// Paths kept after each iteration (the beam).
      Beam: int
      Ranking: Ranking
      /// Whether error terms (transcoder errors, biases) may be path leaves.
      IncludeErrors: bool
      /// Candidates must match this filter at every expansion (e.g. `Not (AtPosition (Eq, 0))` to ignore BOS).
      Candidates: NodeFilter }

    /// Depth 3, 5 per layer, 5 branches, a beam of 15, positive attributions, no error leaves, no filter.
    static member Default =
        { Depth = 3; PerLayer = 5; Branches = 5; Beam = 15; Ranking = Positive; IncludeErrors = false; Candidates = AnyNode }

/// What a path search found.
type PathSearch =
    { Root: FeatureVector
      /// Every path kept at any depth, best first.
      Paths: ComputationalPath list }

/// The error nodes of a graph node.
type NodeErrors =
    { /// Σ over earlier layers of (mlp_out − TC(x))·v.
      TranscoderError: float
      /// The constants: the node's own bias and the output biases feeding it.
      BiasError: float
      /// What the node's kept children and the two errors above leave unexplained.
      PruneError: float }

/// A node of a path graph.
type PathGraphNode =
    { Component: Component
      /// The summed attribution to the root of the distinct path prefixes ending here (the root's value for the root).
      Contribution: float
      /// For nodes with children (features, heads and the root); None for leaves.
      Errors: NodeErrors option }

/// An edge of a path graph: from a contributor (`Source`) to the node it feeds (`Target`).
type PathGraphEdge =
    { Source: Component
      Target: Component
      /// The summed attribution to the root of the distinct path prefixes ending with this hop.
      Attribution: float }

/// The paths merged into a graph (Algorithm 2).
type PathGraph =
    { Root: Component
      /// Root first, then by decreasing contribution.
      Nodes: PathGraphNode list
      Edges: PathGraphEdge list }

/// A path graph with token positions merged (`PathGraph.sumOverTokens`).
type TokenSummedGraph =
    { /// (label, summed contribution), root first.
      Nodes: (string * float) list
      /// (source label, target label, summed attribution), largest first.
      Edges: (string * string * float) list }

/// Node filters.
[<RequireQualifiedAccess>]
module NodeFilter =

    let private compare (op: Compare) (a: int) (b: int) =
        match op with
        | Eq -> a = b
        | Ne -> a <> b
        | Lt -> a < b
        | Le -> a <= b
        | Gt -> a > b
        | Ge -> a >= b

    /// Whether the filter matches a component.
    let rec matches (filter: NodeFilter) (c: Component) : bool =
        match filter with
        | AnyNode -> true
        | OfKind k -> Component.kind c = k
        | AtLayer (op, l) -> (match Component.layer c with Some x -> compare op x l | None -> false)
        | AtPosition (op, p) -> compare op (Component.position c) p
        | WithHead h -> (match c with AttentionHead (_, x, _) -> x = h | _ -> false)
        | WithFeature f -> (match c with TranscoderFeature at -> at.Feature = f | _ -> false)
        | IsComponent x -> x = c
        | Not f -> not (matches f c)
        | AllOf fs -> fs |> List.forall (fun f -> matches f c)
        | AnyOf fs -> fs |> List.exists (fun f -> matches f c)

    /// Heads reading position 0 excluded (the paper's `ignore_bos`, for prompts that start with BOS, where attention
    /// sinks collect large but uninformative contributions); use as `PathSearchOptions.Candidates`.
    let ignoreBos = Not (AllOf [ OfKind HeadComponent; AtPosition (Eq, 0) ])

/// Algorithm 1 and path utilities.
[<RequireQualifiedAccess>]
module PathSearch =

    let private key (ranking: Ranking) (v: float) = match ranking with Positive -> v | Magnitude -> abs v

    let private validate (o: PathSearchOptions) =
        let problems =
            [ if o.Depth < 1 then yield sprintf "Depth must be at least 1 (got %d)" o.Depth
              if o.PerLayer < 1 then yield sprintf "PerLayer must be at least 1 (got %d)" o.PerLayer
              if o.Branches < 1 then yield sprintf "Branches must be at least 1 (got %d)" o.Branches
              if o.Beam < 1 then yield sprintf "Beam must be at least 1 (got %d)" o.Beam ]
        if not problems.IsEmpty then invalidArg "options" ("invalid path search options: " + String.concat "; " problems)

    /// The contributors of a node worth expanding: its direct attribution's terms allowed by the options, the top
    /// `PerLayer` per transcoder layer and per attention layer, then the best `Branches` overall (with the embeddings
    /// and, when allowed, the error terms), best first. With `Positive` ranking only positive terms qualify.
    let candidates (run: PromptRun) (options: PathSearchOptions) (node: FeatureVector) : (Component * float) list =
        validate options
        let d = Attribution.direct run node
        let allowed (c: Component, v: float) =
            (options.IncludeErrors || Component.kind c <> ErrorComponent)
            && NodeFilter.matches options.Candidates c
            && (match options.Ranking with Positive -> v > 0.0 | Magnitude -> v <> 0.0)
        let group (c: Component) =
            match c with
            | TranscoderFeature at -> Some (0, at.Layer)
            | AttentionHead (l, _, _) -> Some (1, l)
            | _ -> None
        d.Terms
        |> Array.filter allowed
        |> Array.groupBy (fst >> group)
        |> Array.collect (fun (g, terms) ->
            let sorted = terms |> Array.sortByDescending (snd >> key options.Ranking)
            match g with
            | Some _ -> Array.truncate options.PerLayer sorted
            | None -> sorted)
        |> Array.sortByDescending (snd >> key options.Ranking)
        |> Array.truncate options.Branches
        |> List.ofArray

    /// The node for a contributor of `parent`: its feature vector when it can be expanded further, else a leaf (no
    /// vector) carrying its attribution.
    let private extend (run: PromptRun) (parent: FeatureVector) (c: Component, v: float) : FeatureVector =
        match Attribution.child run parent c with
        | Some fv -> fv
        | None ->
            { Component = c; Stream = parent.Stream; Position = Component.position c; Vector = [||]; Bias = 0.0; Contribution = v }

    /// Algorithm 1 (greedy computational-path-finding): starting from the root, each iteration extends every path of
    /// the beam by the `candidates` of its last node (paths ending in a leaf stop) and keeps the best `Beam` of the
    /// extended paths by their attribution. Returns every path kept at any depth, best first.
    let find (run: PromptRun) (options: PathSearchOptions) (root: FeatureVector) : PathSearch =
        validate options
        let rank (p: ComputationalPath) = key options.Ranking p.Attribution
        let mutable frontier = [ { Nodes = [ root ] } ]
        let all = ResizeArray<ComputationalPath>()
        for _ in 1 .. options.Depth do
            let extended =
                [ for path in frontier do
                      let last = path.Last
                      if not (Component.isLeaf last.Component) && last.Vector.Length > 0 then
                          for cand in candidates run options last ->
                              { Nodes = path.Nodes @ [ extend run last cand ] } ]
            let kept = extended |> List.sortByDescending rank |> List.truncate options.Beam
            all.AddRange kept
            frontier <- kept
        { Root = root; Paths = all |> Seq.sortByDescending rank |> List.ofSeq }

    /// Whether `filters` match the nodes starting at `start`, in order.
    let private matchesAt (filters: NodeFilter list) (nodes: Component[]) (start: int) =
        start + filters.Length <= nodes.Length
        && (filters |> List.mapi (fun i f -> NodeFilter.matches f nodes[start + i]) |> List.forall id)

    /// Whether a path passes a filter.
    let matches (filter: PathFilter) (path: ComputationalPath) : bool =
        let nodes = path.Nodes |> List.map (fun n -> n.Component) |> Array.ofList
        let infix fs = fs = [] || Seq.exists (matchesAt fs nodes) (seq { 0 .. nodes.Length - 1 })
        match filter with
        | Infix fs -> infix fs
        | NotInfix fs -> not (infix fs)
        | Suffix fs -> matchesAt fs nodes (nodes.Length - fs.Length) && fs.Length <= nodes.Length

    /// The paths passing every filter (the paper's `get_paths_via_filter`).
    let filter (filters: PathFilter list) (paths: ComputationalPath list) : ComputationalPath list =
        paths |> List.filter (fun p -> filters |> List.forall (fun f -> matches f p))

    /// The summed top features among paths: each distinct end node's attributions summed over the paths ending there,
    /// restricted to nodes matching `filter`, the `k` largest first.
    let topNodes (k: int) (filter: NodeFilter) (paths: ComputationalPath list) : (Component * float) list =
        paths
        |> List.filter (fun p -> p.Nodes.Length > 1 && NodeFilter.matches filter p.Last.Component)
        |> List.groupBy (fun p -> p.Last.Component)
        |> List.map (fun (c, ps) -> c, ps |> List.sumBy (fun p -> p.Attribution))
        |> List.sortByDescending snd
        |> List.truncate k

    /// `mlp3tc[12]@5 (2.310) <- attn1[0]@2 (0.840) <- embed@2 (0.520)`.
    let display (path: ComputationalPath) : string =
        path.Nodes |> List.map (fun n -> sprintf "%s (%.4g)" n.Component.Display n.Contribution) |> String.concat " <- "

    /// A search's paths as text, one per line with its attribution, best first.
    let format (search: PathSearch) : string =
        let sb = StringBuilder()
        sb.AppendFormat("{0}: value {1:G5}\n", search.Root.Component.Display, search.Root.Contribution) |> ignore
        for p in search.Paths do
            sb.AppendFormat("  {0,10:F4}  {1}\n", p.Attribution, p.Display) |> ignore
        sb.ToString()

/// Algorithm 2: paths to a graph.
[<RequireQualifiedAccess>]
module PathGraph =

    /// Merges paths from one root into a graph (the paper's `paths_to_graph` and `add_error_nodes_to_graph`): each
    /// distinct path prefix is counted once; an edge's attribution is the sum of the attributions of the prefixes
    /// ending with that hop, a node's the sum over the prefixes ending at it (their vectors summed too). Every node
    /// with children gets error nodes from its summed vector: the transcoder errors and biases feeding it, and the
    /// pruning error, what its kept children leave out, so that contribution = Σ incoming edges + errors.
    let ofPaths (run: PromptRun) (paths: ComputationalPath list) : PathGraph =
        if paths.IsEmpty then invalidArg "paths" "no paths to merge"
        let root = paths.Head.Nodes.Head
        match paths |> List.tryFind (fun p -> p.Nodes.Head.Component <> root.Component) with
        | Some p -> invalidArg "paths" (sprintf "the paths start from different roots (%O and %O)" root.Component p.Nodes.Head.Component)
        | None -> ()
        let prefixes =
            paths
            |> List.collect (fun p -> [ for n in 2 .. p.Nodes.Length -> List.truncate n p.Nodes ])
            |> List.distinctBy (List.map (fun n -> n.Component))
        let nodeOrder = Collections.Generic.List<Component>([ root.Component ])
        let contributions = Collections.Generic.Dictionary<Component, float>()
        let vectors = Collections.Generic.Dictionary<Component, FeatureVector>()
        let edges = Collections.Generic.Dictionary<struct (Component * Component), float>()
        contributions[root.Component] <- root.Contribution
        vectors[root.Component] <- root
        let add (d: Collections.Generic.Dictionary<'k, float>) k v =
            d[k] <- (match d.TryGetValue k with | true, x -> x + v | _ -> v)
        for prefix in prefixes do
            let arr = Array.ofList prefix
            let child, parent = arr[arr.Length - 1], arr[arr.Length - 2]
            if not (contributions.ContainsKey child.Component) then nodeOrder.Add child.Component
            add contributions child.Component child.Contribution
            add edges (struct (child.Component, parent.Component)) child.Contribution
            if child.Vector.Length > 0 then
                vectors[child.Component] <-
                    match vectors.TryGetValue child.Component with
                    | true, fv ->
                        { fv with Vector = Array.map2 (+) fv.Vector child.Vector; Bias = fv.Bias + child.Bias
                                  Contribution = fv.Contribution + child.Contribution }
                    | _ -> child
        let nodes =
            [ for c in nodeOrder ->
                  let errors =
                      match vectors.TryGetValue c with
                      | true, fv ->
                          let summed = { fv with Contribution = contributions[c] }
                          let kept = edges.Keys |> Seq.choose (fun (struct (s, t)) -> if t = c then Some s else None) |> Set.ofSeq
                          let d = Attribution.direct run summed
                          let sumOf kind =
                              d.Terms |> Array.sumBy (fun (tc, v) ->
                                  match tc with
                                  | ErrorTerm (k, _, _) when k = kind && not (kept.Contains tc) -> v
                                  | _ -> 0.0)
                          let tcErr, biasErr = sumOf TranscoderError, sumOf BiasError
                          let incoming = kept |> Seq.sumBy (fun s -> edges[struct (s, c)])
                          Some { TranscoderError = tcErr; BiasError = biasErr; PruneError = summed.Contribution - incoming - tcErr - biasErr }
                      | _ -> None
                  { Component = c; Contribution = contributions[c]; Errors = errors } ]
        let nodes = List.head nodes :: (List.tail nodes |> List.sortByDescending (fun n -> n.Contribution))
        { Root = root.Component
          Nodes = nodes
          Edges =
            [ for KeyValue (struct (s, t), v) in edges -> { Source = s; Target = t; Attribution = v } ]
            |> List.sortByDescending (fun e -> e.Attribution) }

    /// The graph with nodes and edges that differ only in token position merged (the paper's `sum_over_tokens`):
    /// node labels are display names without the `@position` part (`mlp3tc[12]`, `attn1[0]`, `embed`), values summed.
    let sumOverTokens (graph: PathGraph) : TokenSummedGraph =
        let label (c: Component) = let s = c.Display in s.Substring(0, s.LastIndexOf '@')
        { Nodes =
            graph.Nodes |> List.groupBy (fun n -> label n.Component)
            |> List.map (fun (l, ns) -> l, ns |> List.sumBy (fun n -> n.Contribution))
          Edges =
            graph.Edges |> List.groupBy (fun e -> label e.Source, label e.Target)
            |> List.map (fun ((s, t), es) -> s, t, es |> List.sumBy (fun e -> e.Attribution))
            |> List.sortByDescending (fun (_, _, v) -> v) }

    /// The graph as text: nodes with their contributions and errors, then edges.
    let format (graph: PathGraph) : string =
        let sb = StringBuilder()
        sb.AppendFormat("graph of {0}: {1} nodes, {2} edges\n", graph.Root.Display, graph.Nodes.Length, graph.Edges.Length) |> ignore
        for n in graph.Nodes do
            sb.AppendFormat("  {0,-24} {1,10:F4}", n.Component.Display, n.Contribution) |> ignore
            match n.Errors with
            | Some e -> sb.AppendFormat("   tc_error {0:F4}  bias_error {1:F4}  prune_error {2:F4}", e.TranscoderError, e.BiasError, e.PruneError) |> ignore
            | None -> ()
            sb.Append('\n') |> ignore
        for e in graph.Edges do
            sb.AppendFormat("  {0} -> {1}: {2:F4}\n", e.Source.Display, e.Target.Display, e.Attribution) |> ignore
        sb.ToString()
