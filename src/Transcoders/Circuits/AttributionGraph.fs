/// Attribution graphs as in Ameisen et al. 2025, "Circuit Tracing: Revealing Computational Graphs in Language Models"
/// (Anthropic, transformer-circuits.pub), after circuit-tracer: the batched backward of the local replacement model,
/// restricted to causal cones and stored blockwise, with the features ranked by influence between batches and a
/// memory estimate checked before building. The graph itself is plain data (`Graph`).
namespace Transcoders.Circuits

open System
open System.Collections.Generic
open System.Diagnostics
open TorchSharp
open Transcoders.Coders.Scalars
open Transcoders.Models
open Transcoders.Coders

/// Progress of a build, reported after every backward pass.
type GraphProgress =
    { /// "logits" or "features".
      Phase: string
      /// Rows (targets) computed so far in this phase, of `Total`.
      Done: int
      Total: int
      Elapsed: TimeSpan }

/// How the rows of an attribution graph are computed.
[<RequireQualifiedAccess>]
type GraphEngine =
    /// The transpose of the frozen local replacement network as explicit matrix products, layer by layer, batched
    /// over targets (`FrozenLinear`): no forward pass and no autograd graph per batch (the default).
    | Explicit
    /// A forward pass of the whole model per batch with attention, normalisation and MLP outputs pinned by hooks,
    /// then autograd: the slow reference the explicit engine is checked against.
    | Autograd

/// How to build an attribution graph. Start from `GraphConfig.Default`.
type GraphConfig =
    { /// At most this many logit nodes (when `LogitTokens` is None).
      MaxLogits: int
      /// Take the most likely next tokens until their probabilities add up to this (at most `MaxLogits`).
      DesiredLogitProbability: float
      /// Explain these next tokens instead of the most likely ones.
      LogitTokens: int[] option
      /// Targets per backward pass; 0: the largest batch (up to 1,024) whose memory bound
      /// (`MemoryEstimate.BoundBytes`) fits `MemoryBudgetBytes`.
      BatchSize: int
      /// At most this many feature nodes, chosen in order of influence on the logits (None: every active feature).
      MaxFeatureNodes: int option
      /// Batches between two re-rankings of the features by influence.
      UpdateInterval: int
      /// Restrict each backward pass to its causal cone (layers up to the highest target, positions up to the last
      /// target's); false runs every pass over the whole prompt and model (same edges, more work).
      CausalCone: bool
      /// Refuse to build a graph whose memory bound (`MemoryEstimate.BoundBytes`, the conservative side of the
      /// estimate) exceeds this many bytes (None: no limit).
      MemoryBudgetBytes: int64 option
      /// Positions whose coder activations and error vectors are zeroed: no feature nodes there and error nodes
      /// without edges (circuit-tracer's default drops position 0, where the attention sink makes features and
      /// errors huge and uninformative). Positions beyond the prompt are ignored; [] keeps everything.
      ZeroPositions: int list
      /// The dtype of the backward passes (None: the model's). Some torch.bfloat16 halves their memory at a loss of
      /// precision (edge weights to about 1e-2 relative); the edges are stored as float32 either way.
      BackwardDType: torch.ScalarType option
      /// How rows are computed (GraphEngine.Explicit unless checking against the slow reference).
      Engine: GraphEngine
      /// Called after every backward pass.
      Progress: GraphProgress -> unit }

    static member Default =
        { MaxLogits = 10; DesiredLogitProbability = 0.95; LogitTokens = None; BatchSize = 64
          MaxFeatureNodes = Some 7500; UpdateInterval = 4; CausalCone = true
          MemoryBudgetBytes = Some (16L <<< 30); ZeroPositions = [ 0 ]; BackwardDType = None
          Engine = GraphEngine.Explicit; Progress = ignore }

    member c.Settings =
        { MaxLogits = c.MaxLogits; DesiredLogitProbability = c.DesiredLogitProbability; BatchSize = c.BatchSize
          MaxFeatureNodes = c.MaxFeatureNodes; UpdateInterval = c.UpdateInterval; CausalCone = c.CausalCone }

/// What building a graph will take, in bytes, above what the process held before the clean run (the model and
/// coders already loaded). `TotalBytes` is the expected peak: the larger of the clean run's own peak and what the
/// build holds at once (the clean run's frozen values, the engine's tables, the widest backward batch, the adjacency
/// blocks, the ranking's square and the graph's copy), plus a fixed allowance for the runtime and the allocator. With a
/// binding feature cap the rows the ranking will pick are not known before building: `TotalBytes` then expects the
/// rows the first ranking (through the logit rows alone) puts first, each batch over its causal cone (`estimateFor`
/// computes the logit rows for this; without them, each row is taken as wide as the active features' cones on
/// average), and `BoundBytes` takes every row as wide as the whole prompt. The memory budget
/// (`GraphConfig.MemoryBudgetBytes`) is checked against `BoundBytes`, which no choice of rows can exceed; without a
/// binding cap the two are equal.
type MemoryEstimate =
    { /// The clean run's part: its frozen values (queries, keys, patterns, scales, MLP inputs, outputs, errors),
      /// the engine's prepared tables and the fixed allowance; or, when the clean run's own peak (what it keeps plus
      /// one block's temporaries) exceeds all the build holds, the rest of that peak.
      CleanRunBytes: int64
      /// The widest backward pass: its gradients, the transposed pass's temporaries and its rows.
      BatchBytes: int64
      /// The adjacency blocks (float32, each row over its causal cone), the ranking's square of the visited rows, and
      /// the graph's copy of the blocks made at the end.
      AdjacencyBytes: int64
      TotalBytes: int64
      /// As `TotalBytes` with every capped row as wide as the whole prompt: the conservative bound the memory budget
      /// is checked against.
      BoundBytes: int64 }

/// Building attribution graphs.
[<RequireQualifiedAccess>]
module AttributionGraph =

    let private gib (b: int64) = sprintf "%.2f GiB" (float b / float (1L <<< 30))

    /// Problems with a configuration (empty when it is valid).
    let problems (c: GraphConfig) : string list =
        [ if c.MaxLogits < 1 then yield sprintf "MaxLogits must be at least 1, got %d" c.MaxLogits
          if not (c.DesiredLogitProbability > 0.0 && c.DesiredLogitProbability <= 1.0) then
              yield sprintf "DesiredLogitProbability must be in (0, 1], got %g" c.DesiredLogitProbability
          if c.BatchSize < 0 then yield sprintf "BatchSize must be at least 1 (or 0: chosen from MemoryBudgetBytes), got %d" c.BatchSize
          if c.BatchSize = 0 && c.MemoryBudgetBytes.IsNone then
              yield "BatchSize 0 chooses the batch from the memory budget, but MemoryBudgetBytes is None: give a budget or a BatchSize of at least 1"
          match c.MaxFeatureNodes with
          | Some n when n < 0 -> yield sprintf "MaxFeatureNodes must be non-negative, got %d" n
          | _ -> ()
          if c.UpdateInterval < 1 then yield sprintf "UpdateInterval must be at least 1, got %d" c.UpdateInterval
          match c.MemoryBudgetBytes with
          | Some b when b <= 0L -> yield sprintf "MemoryBudgetBytes must be positive, got %d" b
          | _ -> ()
          match c.ZeroPositions |> List.tryFind (fun p -> p < 0) with
          | Some p -> yield sprintf "ZeroPositions must be positions (≥ 0), got %d" p
          | None -> ()
          match c.BackwardDType with
          | Some t when not (t = torch.float32 || t = torch.float64 || t = torch.bfloat16 || t = torch.float16) ->
              yield sprintf "BackwardDType must be a floating dtype (float32, float64, bfloat16, float16), got %A" t
          | _ -> ()
          match c.LogitTokens with
          | Some ts when ts.Length = 0 -> yield "LogitTokens is empty: give at least one token, or None for the most likely ones"
          | _ -> () ]

    let validate (c: GraphConfig) =
        match problems c with
        | [] -> c
        | ps -> invalidArg "config" ("invalid GraphConfig: " + String.concat "; " ps)

    let private bytesOf (t: torch.ScalarType) =
        if t = torch.float64 then 8L elif t = torch.bfloat16 || t = torch.float16 then 2L else 4L

    /// What the runtime and the allocator add to a build (code compiled on first use, thread pools, freed chunks
    /// glibc keeps): measured as about 30 MiB on the bench fixture at 64 tokens.
    let private slackBytes = 32L <<< 20

    /// Bytes the clean run holds at its peak. `Transformer.run` frees each block's temporaries when the block ends, so
    /// the peak is what the run keeps for the caller — per layer the cached queries, keys, [heads, p, p] pattern, MLP
    /// input and output and two normalisation scales, plus the embedding and the residual stream — and on top of it
    /// one block's temporaries: the attention's larger step (two score-sized tensors, one of them the pattern the run
    /// keeps, and two [p, p] boolean masks) or the MLP's hidden units (two, gated four, [p, d_mlp]), with about 19
    /// [p, d]; or, at the end, the logits [p, vocab].
    let private cleanRunPeak (model: TransformerConfig) (es: int64) (p: int64) =
        let l, d, m = int64 model.NLayers, int64 model.DModel, int64 model.DMlp
        let e = int64 (TransformerConfig.dHead model)
        let h, kv, v = int64 model.NHeads, int64 model.NKvHeads, int64 model.VocabSize
        let mlpTensors = match model.Mlp with Gated _ -> 4L | Plain _ -> 2L
        let kept = l * (p * (h + kv) * e + h * p * p + 2L * p * d + 2L * p) * es + 2L * p * d * es
        let block = max (h * p * p * es + 2L * p * p) (mlpTensors * p * m * es) + 19L * p * d * es
        let final = p * v * es + 8L * p * d * es
        kept + max block final

    /// The estimate from its parts (see `MemoryEstimate`); `tableBytes` is the decoder tables' size, `featureRows`
    /// the feature rows computed, `cells` / `boundCells` the float32 weights the blocks hold (expected / at most),
    /// `copyCells` / `boundCopy` those the graph keeps (sources outside the selected features dropped).
    let private estimateParts (model: TransformerConfig) (es: int64) (esC: int64) (p: int64) (nActive: int64) (tableBytes: int64)
                              (batch: int64) (featureRows: int64) (nLogits: int64) (cells: int64) (copyCells: int64)
                              (boundCells: int64) (boundCopy: int64) (ranks: bool) : MemoryEstimate =
        let l, d = int64 model.NLayers, int64 model.DModel
        let e = int64 (TransformerConfig.dHead model)
        let h, kv, v = int64 model.NHeads, int64 model.NKvHeads, int64 model.VocabSize
        let rows = featureRows + nLogits
        let live =
            l * p * (h + kv) * e * es                       // frozen queries and keys
            + l * h * p * p * es                            // attention patterns
            + l * p * 3L * d * es                           // MLP inputs, outputs, errors
            + p * d * es + v * es                           // embedding, last logits
            + nActive * 52L                                 // active features: host arrays and device tensors
        let prepared =
            (if esC <> es then l * h * p * p * esC else 0L) // patterns in the backward dtype
            + 3L * l * p * d * esC + p * d * esC            // normalisation factors, zeroed errors, embedding
            + tableBytes                                    // activation-scaled decoder rows, per position
        let batchBytes =
            8L * batch * p * d * esC                        // the gradient and the transposed pass's temporaries
            + 2L * batch * (nActive + (l + 1L) * p) * 4L    // one batch's rows and their transposed copy
        let ranking = if ranks then rows * featureRows * 4L else 0L   // the block among visited nodes
        let adjacency (c: int64) (kept: int64) = c * 4L + kept * 4L + rows * 40L + ranking
        let total (c: int64) (kept: int64) =
            slackBytes + max (live + prepared + batchBytes + adjacency c kept) (cleanRunPeak model es p)
        let adj = adjacency cells copyCells
        let totalBytes = total cells copyCells
        { CleanRunBytes = totalBytes - batchBytes - adj; BatchBytes = batchBytes; AdjacencyBytes = adj
          TotalBytes = totalBytes; BoundBytes = max totalBytes (total boundCells boundCopy) }

    /// The memory a graph of a prompt of `nTokens` tokens with `nActive` active features and `nLogits` logits needs
    /// with this model (`elementBytes` per activation value: 4 for float32, 8 for float64), before the prompt has run:
    /// a bound in which every adjacency row spans every source (`TotalBytes` = `BoundBytes`). `estimateFor` is
    /// tighter once the prompt has run.
    let estimateMemory (model: TransformerConfig) (elementBytes: int) (nTokens: int) (nActive: int64) (nLogits: int) (config: GraphConfig) : MemoryEstimate =
        let es = int64 elementBytes
        let esC = match config.BackwardDType with Some t -> bytesOf t | None -> es
        let p, l, d = int64 nTokens, int64 model.NLayers, int64 model.DModel
        let featureRows = match config.MaxFeatureNodes with Some n -> min (int64 n) nActive | None -> nActive
        let cells = (featureRows + int64 nLogits) * (nActive + (l + 1L) * p)
        let batch = int64 (if config.BatchSize > 0 then config.BatchSize else 64)
        let ranks = match config.MaxFeatureNodes with Some n -> int64 n < nActive | None -> false
        estimateParts model es esC p nActive (nActive * d * esC * 5L / 4L) batch featureRows (int64 nLogits) cells cells cells cells ranks

    let private refuseBeyondBudget (config: GraphConfig) (est: MemoryEstimate) (what: string) =
        match config.MemoryBudgetBytes with
        | Some budget when est.BoundBytes > budget ->
            invalidOp (sprintf "the attribution graph %s may need up to %s (expected about %s: clean run %s, one backward batch %s, adjacency %s), more than the memory budget of %s (GraphConfig.MemoryBudgetBytes): lower MaxFeatureNodes or BatchSize, shorten the prompt, or raise the budget"
                           what (gib est.BoundBytes) (gib est.TotalBytes) (gib est.CleanRunBytes) (gib est.BatchBytes) (gib est.AdjacencyBytes) (gib budget))
        | _ -> ()

    /// The features that can be nodes: the prompt's active features outside the zeroed positions, in the local
    /// replacement model's order (layer, position, feature). Node k is `lr.Active` entry `Index[k]`.
    type internal NodeFeatures =
        { Index: int[]
          Layer: int[]
          Position: int[]
          Feature: int[]
          Activation: float[]
          /// First node of each layer (length n_layers + 1).
          LayerStart: int[] }

        member n.Count = n.Index.Length

    let internal nodeFeatures (lr: LocalReplacement) (zeroPositions: int list) : NodeFeatures =
        let zero = Set.ofList zeroPositions
        let a = lr.Active
        let idx = [| for k in 0 .. a.Count - 1 do if not (zero.Contains a.Position[k]) then yield k |]
        let layer = idx |> Array.map (fun k -> a.Layer[k])
        let starts = Array.zeroCreate (lr.NLayers + 1)
        let mutable j = 0
        for l in 0 .. lr.NLayers do
            while j < layer.Length && layer[j] < l do j <- j + 1
            starts[l] <- j
        { Index = idx; Layer = layer; Position = idx |> Array.map (fun k -> a.Position[k])
          Feature = idx |> Array.map (fun k -> a.Feature[k]); Activation = idx |> Array.map (fun k -> a.Activation[k])
          LayerStart = starts }

    /// Nodes of layer `layer` at positions below `prefix` (they come first within the layer).
    let private countBelow (nodes: NodeFeatures) (layer: int) (prefix: int) =
        let start = nodes.LayerStart[layer]
        let mutable lo, hi = start, nodes.LayerStart[layer + 1]
        while lo < hi do
            let mid = (lo + hi) / 2
            if nodes.Position[mid] < prefix then lo <- mid + 1 else hi <- mid
        lo - start

    /// Per source layer: the most nodes at one position (the decoder tables' width).
    let private maxPerPosition (nodes: NodeFeatures) (layer: int) =
        let mutable best, run = 0, 0
        for k in nodes.LayerStart[layer] .. nodes.LayerStart[layer + 1] - 1 do
            run <- if k > nodes.LayerStart[layer] && nodes.Position[k] = nodes.Position[k - 1] then run + 1 else 1
            best <- max best run
        best

    /// Bytes of the decoder tables for these nodes.
    let private tableBytes (lr: LocalReplacement) (nodes: NodeFeatures) (esC: int64) =
        let d = int64 lr.Model.Config.DModel
        Array.init lr.NLayers (fun l ->
            let w = int64 lr.Sites[l].WritesTo.Length
            if nodes.LayerStart[l + 1] > nodes.LayerStart[l] then w * int64 lr.NPositions * int64 (maxPerPosition nodes l) * d * esC else 0L)
        |> Array.sum

    /// The weights the feature rows of these batches hold while building: each batch of targets (`order`, in
    /// batches of `batch`) spans the features below its highest layer and last position, then the errors and tokens of
    /// its cone; returned as (feature-source cells, error- and token-source cells).
    let private featureRowCells (lr: LocalReplacement) (nodes: NodeFeatures) (order: int[]) (batch: int) (causalCone: bool) =
        let nL, p = lr.NLayers, lr.NPositions
        let widths (top: int) (prefix: int) =
            let src = min top nL
            int64 ([ 0 .. src - 1 ] |> List.sumBy (fun l -> countBelow nodes l prefix)), int64 ((src + 1) * prefix)
        let mutable feats, others = 0L, 0L
        let mutable s = 0
        while s < order.Length do
            let m = min batch (order.Length - s)
            let idx = order[s .. s + m - 1]
            let f, o =
                if causalCone then widths (idx |> Array.map (fun k -> nodes.Layer[k]) |> Array.max) ((idx |> Array.map (fun k -> nodes.Position[k]) |> Array.max) + 1)
                else widths nL p
            feats <- feats + int64 m * f
            others <- others + int64 m * o
            s <- s + m
        feats, others

    /// Orders node features by position, then layer, then index (tight causal cones for consecutive targets).
    let private byPositionThenLayer (nodes: NodeFeatures) (a: int) (b: int) =
        let c = compare nodes.Position[a] nodes.Position[b]
        if c <> 0 then c
        else
            let c = compare nodes.Layer[a] nodes.Layer[b]
            if c <> 0 then c else compare a b

    /// The feature rows in the order the builder visits them when there is no cap: by position, then layer (tight
    /// causal cones), or as listed without cones.
    let private uncappedOrder (nodes: NodeFeatures) (causalCone: bool) =
        let all = Array.init nodes.Count id
        if causalCone then all |> Array.sortWith (byPositionThenLayer nodes) else all

    /// The memory this build needs, from the local replacement model (exact node counts and decoder tables). The
    /// adjacency is exact without a binding feature cap; with one, the rows the ranking picks are unknown, so the
    /// expected cells take the rows of `picks` (`firstRankingPicks`) in the build's batches, or without them each row
    /// as wide as the active features' own cones are on average, and the bound takes every row over the whole prompt
    /// (see `MemoryEstimate`).
    let internal estimateWith (lr: LocalReplacement) (nodes: NodeFeatures) (nLogits: int) (batch: int) (config: GraphConfig)
                              (picks: int[] option) : MemoryEstimate =
        let c = lr.Model.Config
        let es = bytesOf lr.DType
        let esC = match config.BackwardDType with Some t -> bytesOf t | None -> es
        let nNode = int64 nodes.Count
        let p, nL = int64 lr.NPositions, int64 lr.NLayers
        let capped = match config.MaxFeatureNodes with Some n -> int64 n < nNode | None -> false
        let featureRows = match config.MaxFeatureNodes with Some n -> min (int64 n) nNode | None -> nNode
        let others = (nL + 1L) * p
        let logitCells = int64 nLogits * (nNode + others)
        let cells, copy, boundCells, boundCopy =
            if not capped then
                let feats, errs = featureRowCells lr nodes (uncappedOrder nodes config.CausalCone) batch config.CausalCone
                let cells = logitCells + feats + errs
                cells, cells, cells, cells
            else
                // the graph keeps the selected features' columns (about featureRows / nNode of the feature sources)
                // and every error and token column
                let scale (x: int64) = int64 (float x * float featureRows / float (max 1L nNode))
                let keptWidth = featureRows + others
                let expected, expectedCopy =
                    match picks with
                    | Some order ->
                        // the rows the first ranking puts first, in the build's batches, each over its causal cone
                        let feats, errs = featureRowCells lr nodes order batch config.CausalCone
                        logitCells + feats + errs, int64 nLogits * keptWidth + scale feats + errs
                    | None ->
                        // unknown rows: each as wide as its own cone (batches of one), averaged over the active features
                        let feats, errs = featureRowCells lr nodes (uncappedOrder nodes config.CausalCone) 1 config.CausalCone
                        logitCells + scale (feats + errs), int64 nLogits * keptWidth + scale (scale feats + errs)
                expected, expectedCopy,
                (featureRows + int64 nLogits) * (nNode + others), (featureRows + int64 nLogits) * keptWidth
        let tables = match config.Engine with GraphEngine.Explicit -> tableBytes lr nodes esC | GraphEngine.Autograd -> 0L
        estimateParts c es esC p nNode tables (int64 batch) featureRows (int64 nLogits) cells copy boundCells boundCopy capped

    /// The batch size: BatchSize, or with 0 the largest (up to 1,024) whose bound fits the budget (1 when none does).
    let internal chooseBatch (lr: LocalReplacement) (nodes: NodeFeatures) (nLogits: int) (config: GraphConfig) : int =
        if config.BatchSize > 0 then config.BatchSize
        else
            let budget = defaultArg config.MemoryBudgetBytes Int64.MaxValue
            let fits b = (estimateWith lr nodes nLogits b config None).BoundBytes <= budget
            if not (fits 1) then 1
            else
                let mutable lo, hi = 1, 1024
                while lo < hi do
                    let mid = (lo + hi + 1) / 2
                    if fits mid then lo <- mid else hi <- mid - 1
                lo

    /// The unembedding matrix W_U [vocab, d] and the final normalisation's weight and bias (None when absent).
    let internal unembedding (model: Transformer) =
        let ps = Transformer.parameters model |> dict
        let wU = if model.Config.TiedUnembed then ps["embed.weight"] else ps["unembed.weight"]
        let find n = match ps.TryGetValue n with | true, p -> Some (p :> torch.Tensor) | _ -> None
        (wU :> torch.Tensor), find "ln_final.weight", find "ln_final.bias"

    /// The vectors [k, d] (model dtype) that read the de-meaned logits (logit_t − mean over the vocabulary) of
    /// `tokens` off the residual stream after the last block at the last position, with the final normalisation's
    /// scale frozen at its clean value: for LayerNorm center(w ⊙ u / s), for RMSNorm w ⊙ u / s, without one u,
    /// where u = W_U[t] − mean_v W_U[v].
    let logitDirections (lr: LocalReplacement) (tokens: int[]) : torch.Tensor =
        use _ = torch.no_grad ()
        use scope = torch.NewDisposeScope()
        let model = lr.Model
        let c = model.Config
        let wU, wNorm, _ = unembedding model
        let wU = wU.``to``(lr.DType)
        let idx = torch.tensor(tokens |> Array.map int64, device = lr.Device)
        let u = wU.index_select(0L, idx).sub(wU.mean([| 0L |], true))
        let pulled =
            if c.FinalNorm && c.Norm <> NoNorm then
                let s = lr.Scales |> List.find (fun (n, _) -> n = HookNames.lnFinalScale) |> snd
                let sLast = s[0L, -1L].reshape(1L, 1L)
                let v = u.mul(wNorm.Value.``to``(lr.DType).unsqueeze 0).div(sLast)
                if c.Norm = LayerNorm then v.sub(v.mean([| 1L |], true)) else v
            else u
        pulled.contiguous().MoveToOuterDisposeScope()

    /// Chooses the logit targets: the given tokens, or the most likely next tokens until their probabilities reach
    /// `DesiredLogitProbability` (at most `MaxLogits`).
    let logitTargets (lr: LocalReplacement) (config: GraphConfig) : LogitNode[] =
        use _ = torch.no_grad ()
        let probs, raw =
            use scope = torch.NewDisposeScope()
            let logits = lr.LastLogits.to_type(torch.float64).cpu()
            logits.softmax(0L).data<float>().ToArray(), logits.data<float>().ToArray()
        let vocab = probs.Length
        match config.LogitTokens with
        | Some ts ->
            ts |> Array.map (fun t ->
                if t < 0 || t >= vocab then
                    invalidArg "LogitTokens" (sprintf "target token %d is outside the vocabulary (0..%d)" t (vocab - 1))
                { Token = t; Probability = probs[t]; Logit = raw[t] })
        | None ->
            let order = Array.init vocab id |> Array.sortWith (fun a b -> let c = compare probs[b] probs[a] in if c <> 0 then c else compare a b)
            let chosen = ResizeArray<LogitNode>()
            let mutable cum = 0.0
            let mutable k = 0
            while k < order.Length && chosen.Count < config.MaxLogits && cum < config.DesiredLogitProbability do
                let t = order[k]
                chosen.Add { Token = t; Probability = probs[t]; Logit = raw[t] }
                cum <- cum + probs[t]
                k <- k + 1
            chosen.ToArray()

    /// The rows of one batch of targets the slow way (GraphEngine.Autograd, the reference the explicit engine is checked
    /// against): a forward pass of the whole model over B copies of the prompt's causal cone with attention,
    /// normalisation and MLP outputs pinned by hooks, then one autograd pass. Target t (layer Layers[t], position
    /// Positions[t]; layer n_layers means the residual stream after the last block, where logit directions are read)
    /// reads vector Vectors[t]. Returns the source ids (build ids over every active feature of `lr`, then errors, then
    /// tokens) and the weights [B, C] (float32).
    let internal computeRows (lr: LocalReplacement) (causalCone: bool) (layers: int[]) (positions: int[]) (vectors: torch.Tensor)
                             : torch.Tensor * torch.Tensor =
        let model = lr.Model
        let nL, p = lr.NLayers, lr.NPositions
        let nActive = lr.Active.Count
        let d = lr.Embedding.shape[1]
        let dtype, device = lr.DType, lr.Device
        let b = layers.Length
        let maxLayer = Array.max layers
        let prefix = if causalCone then Array.max positions + 1 else p
        // sources live in layers below the highest target (all layers for the logits)
        let srcLayers = if causalCone then maxLayer else nL
        let stop = if causalCone then min nL (maxLayer + 1) else nL
        use scope = torch.NewDisposeScope()
        let leaf () = torch.zeros([| int64 b; int64 prefix; d |], dtype = dtype, device = device).requires_grad_(true)
        let deltas = Array.init srcLayers (fun _ -> leaf ())
        let deltaEmb = leaf ()
        let embedding = lr.Embedding.narrow(0, 0L, int64 prefix)
        let hooks =
            LocalReplacement.frozenHooks lr b prefix
            @ [ HookNames.residPre 0, (fun (x: torch.Tensor) -> embedding.unsqueeze(0).expand(x.shape).add(deltaEmb)) ]
            @ LocalReplacement.mlpOutHooks lr prefix srcLayers (fun l -> Some deltas[l])
        let targetLayers = layers |> Array.filter (fun l -> l < nL) |> Array.distinct
        let cache = targetLayers |> Array.map HookNames.mlpIn |> Set.ofArray
        let tokens = torch.tensor(lr.Tokens[.. prefix - 1] |> Array.map int64, device = device).unsqueeze(0).expand(int64 b, int64 prefix)
        let run = Transformer.run model { RunOptions.Default with Cache = cache; Hooks = hooks; StopAtLayer = Some stop; DetachCache = false } tokens
        let injected (where: torch.Tensor) (layer: int) =
            let rows = [| for i in 0 .. b - 1 do if layers[i] = layer then yield i |]
            let idx = torch.tensor(rows |> Array.map int64, device = device)
            let flat = torch.tensor(rows |> Array.map (fun i -> int64 i * int64 prefix + int64 positions[i]), device = device)
            let inj = torch.zeros([| int64 b * int64 prefix; d |], dtype = dtype, device = device)
            inj.index_copy_(0L, flat, vectors.index_select(0L, idx)) |> ignore
            where.reshape(int64 b * int64 prefix, d).mul(inj).sum()
        let objective =
            let terms =
                [ for l in targetLayers -> injected run[HookNames.mlpIn l] l
                  if layers |> Array.contains nL then yield injected run.Residual.Value nL ]
            terms |> List.reduce (fun a c -> a.add c)
        let inputs = Array.append [| deltaEmb |] deltas
        let grads = torch.autograd.grad([| objective |], inputs, allow_unused = true) |> Array.ofSeq
        let gradOf (k: int) =
            let g = grads[k]
            let valid = not (isNull g) && (try g.Handle <> IntPtr.Zero with :? InvalidOperationException -> false)
            if valid then g.detach() else torch.zeros_like(inputs[k])
        let gEmb = gradOf 0
        let g = Array.init srcLayers (fun l -> gradOf (l + 1))
        let columns = ResizeArray<torch.Tensor>()
        let ids = ResizeArray<torch.Tensor>()
        let layerT, posT, featT, valT = lr.ActiveTensors
        // features of source layer ls at positions < prefix: a contiguous range of the sorted active list
        for ls in 0 .. srcLayers - 1 do
            let start, stopIdx = lr.ActiveLayerStart[ls], lr.ActiveLayerStart[ls + 1]
            let mutable hi = start
            // active features are sorted by position within a layer
            let mutable lo, up = start, stopIdx
            while lo < up do
                let mid = (lo + up) / 2
                if lr.Active.Position[mid] < prefix then lo <- mid + 1 else up <- mid
            hi <- lo
            let n = hi - start
            if n > 0 then
                let chunk = max 1 (int (33_554_432L / (int64 b * d)))
                let parts = ResizeArray<torch.Tensor>()
                let mutable s = 0
                while s < n do
                    let m = min chunk (n - s)
                    use inner = torch.NewDisposeScope()
                    let pos = posT.narrow(0, int64 (start + s), int64 m)
                    let feat = featT.narrow(0, int64 (start + s), int64 m)
                    let acc = torch.zeros([| int64 b; int64 m |], dtype = dtype, device = device)
                    for t in lr.Sites[ls].WritesTo do
                        if t < srcLayers then
                            let rows = LocalReplacement.decoderRows lr ls t feat
                            acc.add_(g[t].index_select(1L, pos).mul(rows.unsqueeze 0).sum(-1L)) |> ignore
                    parts.Add(acc.mul(valT.narrow(0, int64 (start + s), int64 m).unsqueeze 0).MoveToOuterDisposeScope())
                    s <- s + m
                columns.Add(torch.cat(parts.ToArray(), 1L))
                ids.Add(torch.arange(int64 start, int64 hi, dtype = torch.int64, device = device))
        for l in 0 .. srcLayers - 1 do
            columns.Add(g[l].mul(lr.Errors[l].narrow(0, 0L, int64 prefix).unsqueeze 0).sum(-1L))
            ids.Add(torch.arange(int64 prefix, dtype = torch.int64, device = device).add(scl (int64 (nActive + l * p))))
        columns.Add(gEmb.mul(embedding.unsqueeze 0).sum(-1L))
        ids.Add(torch.arange(int64 prefix, dtype = torch.int64, device = device).add(scl (int64 (nActive + nL * p))))
        let values = torch.cat(columns.ToArray(), 1L).to_type(torch.float32).contiguous()
        let sources = torch.cat(ids.ToArray(), 0L)
        sources.MoveToOuterDisposeScope(), values.MoveToOuterDisposeScope()

    /// What the explicit engine holds for one build: the frozen network's transpose, the node features' activation-
    /// scaled decoder rows as per-position tables ([p, maxN, d] per source and target layer, zero-padded), the error
    /// vectors with the zeroed positions cleared, and the embedding, all in the backward dtype.
    type internal Prepared(frozen: FrozenLinear, nodes: NodeFeatures, maxN: int[], flat: torch.Tensor[],
                           tables: torch.Tensor option[,], errors: torch.Tensor[], embedding: torch.Tensor) =
        member _.Frozen = frozen
        member _.Nodes = nodes
        member _.MaxN = maxN
        /// Per source layer: int64 [n] = position·maxN + slot of each of its nodes (ascending).
        member _.Flat = flat
        /// [source layer, target layer] → the table, when that layer's features write there.
        member _.Tables = tables
        member _.Errors = errors
        member _.Embedding = embedding
        interface IDisposable with
            member _.Dispose() =
                (frozen :> IDisposable).Dispose()
                for t in flat do t.Dispose()
                tables |> Array2D.iter (fun (t: torch.Tensor option) -> t |> Option.iter (fun t -> t.Dispose()))
                for t in errors do t.Dispose()
                embedding.Dispose()

    let internal prepare (lr: LocalReplacement) (nodes: NodeFeatures) (zeroPositions: int list) (dtype: torch.ScalarType option) : Prepared =
        use _ = torch.no_grad ()
        let frozen = FrozenLinear.create lr dtype
        try
            use scope = torch.NewDisposeScope()
            let dt = frozen.DType
            let nL, p = lr.NLayers, lr.NPositions
            let device = lr.Device
            let d = lr.Embedding.shape[1]
            let maxN = Array.init nL (maxPerPosition nodes)
            let slots = Array.zeroCreate<int64> nodes.Count
            for l in 0 .. nL - 1 do
                for k in nodes.LayerStart[l] .. nodes.LayerStart[l + 1] - 1 do
                    let slot = if k > nodes.LayerStart[l] && nodes.Position[k] = nodes.Position[k - 1] then slots[k - 1] + 1L else 0L
                    slots[k] <- slot
            let flat =
                Array.init nL (fun l ->
                    let s, e = nodes.LayerStart[l], nodes.LayerStart[l + 1]
                    torch.tensor(Array.init (e - s) (fun i -> int64 nodes.Position[s + i] * int64 maxN[l] + slots[s + i]), dtype = torch.int64, device = device)
                        .DetachFromDisposeScope())
            let tables = Array2D.create nL nL None
            for ls in 0 .. nL - 1 do
                let s, e = nodes.LayerStart[ls], nodes.LayerStart[ls + 1]
                if e > s then
                    for t in lr.Sites[ls].WritesTo do
                        let table = torch.zeros([| int64 p * int64 maxN[ls]; d |], dtype = dt, device = device)
                        let chunk = 65536
                        let mutable k = s
                        while k < e do
                            let m = min chunk (e - k)
                            use inner = torch.NewDisposeScope()
                            let feats = torch.tensor(Array.init m (fun i -> int64 nodes.Feature[k + i]), device = device)
                            let acts = torch.tensor(Array.init m (fun i -> nodes.Activation[k + i]), device = device).to_type(lr.DType)
                            let rows = (LocalReplacement.decoderRows lr ls t feats).mul(acts.unsqueeze 1).to_type(dt)
                            table.index_copy_(0L, flat[ls].narrow(0, int64 (k - s), int64 m), rows) |> ignore
                            k <- k + m
                        tables[ls, t] <- Some (table.view(int64 p, int64 maxN[ls], d).DetachFromDisposeScope())
            let errors =
                lr.Errors |> Array.map (fun err ->
                    let z = err.to_type(dt).clone()
                    for pos in zeroPositions do
                        if pos < p then z.select(0, int64 pos).zero_() |> ignore
                    z.DetachFromDisposeScope())
            let embedding = lr.Embedding.to_type(dt).contiguous().DetachFromDisposeScope()
            new Prepared(frozen, nodes, maxN, flat, tables, errors, embedding)
        with _ ->
            (frozen :> IDisposable).Dispose()
            reraise ()

    /// The rows of one batch of targets with the explicit engine: target i (layer `layers[i]`, n_layers for the
    /// logits, read at the stream after the last block; position `positions[i]`) reads vector `vectors[i]` [d] there.
    /// Returns the batch's row order (indices into the targets), the source ids (build ids: node features, then
    /// errors, then tokens) and the weights [B, C] float32 in that row order.
    ///
    /// One pass down the layers, rows ordered by target layer (highest first) so that the rows alive at a layer are a
    /// prefix of the batch: a target only costs the layers below it. At each layer the gradient at the MLP output is
    /// contracted with that layer's sources (per-position decoder tables, one batched product; the error vectors), a
    /// skip path is pulled back, the layer's own targets are injected (through the frozen ln2), and attention and ln1
    /// are pulled back; what reaches the bottom is contracted with the embeddings.
    let internal explicitRows (pr: Prepared) (p: int) (causalCone: bool) (layers: int[]) (positions: int[]) (vectors: torch.Tensor)
                              : int[] * torch.Tensor * torch.Tensor =
        use _ = torch.no_grad ()
        let fz = pr.Frozen
        let nodes = pr.Nodes
        let nL = fz.NLayers
        let nNode = nodes.Count
        let b = layers.Length
        let dt = fz.DType
        let device = vectors.device
        let d = vectors.shape[1]
        let top = Array.max layers
        let prefix = if causalCone then Array.max positions + 1 else p
        let pp = int64 prefix
        let srcLayers = if causalCone then min top nL else nL
        let order =
            Array.init b id
            |> Array.sortWith (fun i j ->
                let c = compare layers[j] layers[i]
                if c <> 0 then c else let c = compare positions[i] positions[j] in if c <> 0 then c else compare i j)
        let lay = order |> Array.map (fun i -> layers[i])
        let pos = order |> Array.map (fun i -> positions[i])
        // alive[l]: rows whose target is at layer ≥ l (a prefix of the ordered batch)
        let alive = Array.init (nL + 2) (fun l -> lay |> Array.sumBy (fun x -> if x >= l then 1 else 0))
        use scope = torch.NewDisposeScope()
        let counts = Array.init srcLayers (fun l -> countBelow nodes l prefix)
        let featCol = Array.scan (+) 0 counts
        let nFeatCols = featCol[srcLayers]
        let errCol (l: int) = nFeatCols + l * prefix
        let tokCol = nFeatCols + srcLayers * prefix
        let nCols = tokCol + prefix
        let rowsT = torch.zeros([| int64 nCols; int64 b |], dtype = torch.float32, device = device)
        let g = torch.zeros([| int64 b; pp; d |], dtype = dt, device = device)
        let gFlat = g.view(int64 b * pp, d)
        let vecs = vectors.index_select(0L, torch.tensor(order |> Array.map int64, device = device)).to_type(dt)
        let inject (lo: int) (hi: int) (layer: int option) =
            use inner = torch.NewDisposeScope()
            let flatIdx = torch.tensor(Array.init (hi - lo) (fun i -> int64 (lo + i) * pp + int64 pos[lo + i]), device = device)
            let v = vecs.narrow(0, int64 lo, int64 (hi - lo))
            let v =
                match layer with
                | Some l -> fz.Ln2TAt(l, torch.tensor(Array.init (hi - lo) (fun i -> int64 pos[lo + i]), device = device), v)
                | None -> v
            gFlat.index_copy_(0L, flatIdx, v) |> ignore
        if alive[nL] > 0 then inject 0 alive[nL] None
        let start = if causalCone then min top (nL - 1) else nL - 1
        for l in start .. -1 .. 0 do
            use layerScope = torch.NewDisposeScope()
            let nOld, nNew = alive[l + 1], alive[l]
            if nOld > 0 then
                let gOld = g.narrow(0, 0L, int64 nOld)
                if l < srcLayers then
                    let goT = gOld.permute(1L, 2L, 0L).contiguous()                       // [prefix, d, nOld]
                    for ls in 0 .. min l (srcLayers - 1) do
                        match pr.Tables[ls, l] with
                        | Some table when counts[ls] > 0 ->
                            let m = int64 pr.MaxN[ls]
                            let r = table.narrow(0, 0L, pp).bmm(goT)                        // [prefix, maxN, nOld]
                            let sel = r.view(pp * m, int64 nOld).index_select(0L, pr.Flat[ls].narrow(0, 0L, int64 counts[ls]))
                            rowsT.narrow(0, int64 featCol[ls], int64 counts[ls]).narrow(1, 0L, int64 nOld).add_(sel) |> ignore
                        | _ -> ()
                    let e = pr.Errors[l].narrow(0, 0L, pp).unsqueeze(1).bmm(goT)          // [prefix, 1, nOld]
                    rowsT.narrow(0, int64 (errCol l), pp).narrow(1, 0L, int64 nOld).copy_(e.view(pp, int64 nOld)) |> ignore
                match fz.SkipT(l, gOld) with
                | Some s -> gOld.add_(fz.Ln2T(l, s)) |> ignore
                | None -> ()
            if nNew > nOld then inject nOld nNew (Some l)
            if nNew > 0 then
                let gm = g.narrow(0, 0L, int64 nNew)
                gm.add_(fz.Ln1T(l, fz.AttentionT(l, gm))) |> ignore
        // what reaches the bottom is the gradient at the embedding
        (use tail = torch.NewDisposeScope()
         let goT = g.permute(1L, 2L, 0L).contiguous()
         let e = pr.Embedding.narrow(0, 0L, pp).unsqueeze(1).bmm(goT)
         rowsT.narrow(0, int64 tokCol, pp).copy_(e.view(pp, int64 b)) |> ignore)
        let ids =
            [| for ls in 0 .. srcLayers - 1 do
                 let s = nodes.LayerStart[ls]
                 for k in 0 .. counts[ls] - 1 -> int64 (s + k)
               for l in 0 .. srcLayers - 1 do
                 for q in 0 .. prefix - 1 -> int64 (nNode + l * p + q)
               for q in 0 .. prefix - 1 -> int64 (nNode + nL * p + q) |]
        let sources = torch.tensor(ids, device = device)
        let values = rowsT.t().contiguous()
        order, sources.MoveToOuterDisposeScope(), values.MoveToOuterDisposeScope()

    /// The autograd engine's rows in the node numbering: columns of zeroed features dropped, error columns at zeroed
    /// positions cleared.
    let private autogradEngine (lr: LocalReplacement) (nodes: NodeFeatures) (zeroPositions: int list) (causalCone: bool) =
        let nL, p = lr.NLayers, lr.NPositions
        let nActive, nNode = lr.Active.Count, nodes.Count
        let remap = Array.create (nActive + (nL + 1) * p) -1L
        nodes.Index |> Array.iteri (fun k i -> remap[i] <- int64 k)
        for id in nActive .. remap.Length - 1 do remap[id] <- int64 (id - nActive + nNode)
        let mask = Array.create (nNode + (nL + 1) * p) 1.0f
        for l in 0 .. nL - 1 do
            for pos in zeroPositions do
                if pos < p then mask[nNode + l * p + pos] <- 0.0f
        let remapT = torch.tensor(remap, device = lr.Device)
        let maskT = torch.tensor(mask, device = lr.Device)
        let rows (layers: int[]) (positions: int[]) (vectors: torch.Tensor) =
            let sources, values = computeRows lr causalCone layers positions vectors
            use scope = torch.NewDisposeScope()
            use sources = sources
            use values = values
            let cols = remapT.index_select(0L, sources)
            let keep = cols.ge(sc 0.0).nonzero().reshape(-1L)
            let cols = cols.index_select(0L, keep)
            let vals = values.index_select(1L, keep).mul(maskT.index_select(0L, cols).unsqueeze 0)
            Array.init layers.Length id, cols.MoveToOuterDisposeScope(), vals.contiguous().MoveToOuterDisposeScope()
        rows, { new IDisposable with member _.Dispose() = remapT.Dispose(); maskT.Dispose() }

    /// Every node's influence on the logits in the graph built so far (circuit-tracer's partial influence), kept up to
    /// date between rankings. With Â the rows' |A| normalised to unit sums (over each row's whole cone) and w the logit
    /// probabilities, the influence is w·(Â + Â² + …). Only nodes with rows (the logits and the visited features) pass
    /// influence on, so the powers run over the dense block of Â among them — [rows, visited features], filled
    /// incrementally (new rows, and new columns of old rows) — with one product per power; then one pass c·Â over
    /// every block, c = w + (the row nodes' influence), gives every node's.
    type private Ranker(nBuild: int, maxRows: int, maxVisited: int, device: torch.Device) =
        let square = torch.zeros([| int64 maxRows; int64 (max 1 maxVisited) |], dtype = torch.float32, device = device)
        let rowStart = ResizeArray<int>()            // per block: its first row in `square`
        let filled = ResizeArray<int>()              // per block: visited columns filled so far
        let visitedNodes = ResizeArray<int64>()      // visit order → node id
        let rowOfVisit = ResizeArray<int64>()        // visit order → its row in `square`
        let mutable rows = 0

        /// Registers a block (already in `blocks`) whose rows are `nodes` (their feature node ids, or -1 for logits).
        member _.Add(rowNodes: int[]) =
            rowStart.Add rows
            filled.Add 0
            rowNodes |> Array.iteri (fun i node ->
                if node >= 0 then
                    visitedNodes.Add(int64 node)
                    rowOfVisit.Add(int64 (rows + i)))
            rows <- rows + rowNodes.Length

        member _.Influence(blocks: ResizeArray<Adjacency.DeviceBlock>, invSums: ResizeArray<torch.Tensor>, w: torch.Tensor) : torch.Tensor =
            use _ = torch.no_grad ()
            use scope = torch.NewDisposeScope()
            let v = visitedNodes.Count
            let visited = torch.tensor(visitedNodes.ToArray(), device = device)
            // fill the columns visited since each block was last brought up to date
            for i in 0 .. blocks.Count - 1 do
                if filled[i] < v then
                    use step = torch.NewDisposeScope()
                    let b = blocks[i]
                    let fresh = visited.narrow(0, int64 filled[i], int64 (v - filled[i]))
                    let at = torch.searchsorted(b.Cols, fresh).clamp_max(scl (b.Cols.shape[0] - 1L))
                    let hit = b.Cols.index_select(0L, at).eq(fresh).nonzero().reshape(-1L)
                    if hit.shape[0] > 0L then
                        let values = b.Values.index_select(1L, at.index_select(0L, hit)).abs_().mul_(invSums[i].unsqueeze 1)
                        square.narrow(0, int64 rowStart[i], b.Rows.shape[0])
                            .index_copy_(1L, hit.add(scl (int64 filled[i])), values) |> ignore
                    filled[i] <- v
            // powers of Â among the row nodes
            let rowIds = torch.cat([| for b in blocks -> b.Rows |], 0L)                  // row → node
            let rowOf = torch.tensor(rowOfVisit.ToArray(), device = device)              // visit → row
            let sq = square.narrow(0, 0L, int64 rows).narrow(1, 0L, int64 (max 1 v))
            let total = torch.zeros([| int64 v |], dtype = torch.float64, device = device)
            let mutable x = w.index_select(0L, rowIds).to_type(torch.float32)
            let mutable go = v > 0
            let mutable iterations = 0
            while go do
                let y = x.unsqueeze(0).matmul(sq).squeeze(0)                              // [visited]
                if not (y.ne(sc 0.0).any().item<bool> ()) then go <- false
                else
                    total.add_(y.to_type(torch.float64)) |> ignore
                    x <- torch.zeros([| int64 rows |], dtype = torch.float32, device = device).index_copy_(0L, rowOf, y)
                    iterations <- iterations + 1
                    if iterations > 4 * nBuild + 16 then
                        invalidOp "influence did not converge: the adjacency has a cycle (an edge from a node to an earlier one)"
            // c = w + the row nodes' influence, then one pass over every block
            let c = w.clone()
            if v > 0 then c.index_add_(0L, visited, total, sc 1.0) |> ignore
            let result = torch.zeros([| int64 nBuild |], dtype = torch.float64, device = device)
            let largest = blocks |> Seq.map (fun b -> b.Values.numel ()) |> Seq.fold max 1L
            let absBuffer = torch.empty([| largest |], dtype = torch.float32, device = device)   // |A| of one block, reused
            for i in 0 .. blocks.Count - 1 do
                use step = torch.NewDisposeScope()
                let b = blocks[i]
                let cb = c.index_select(0L, b.Rows).to_type(torch.float32).mul(invSums[i])
                if cb.ne(sc 0.0).any().item<bool> () then
                    let a = absBuffer.narrow(0, 0L, b.Values.numel ()).view(b.Values.shape).copy_(b.Values).abs_()
                    let contrib = cb.unsqueeze(0).matmul(a).squeeze(0).to_type(torch.float64)
                    result.index_add_(0L, b.Cols, contrib, sc 1.0) |> ignore
            result.MoveToOuterDisposeScope()

        interface IDisposable with
            member _.Dispose() = square.Dispose()

    /// The feature rows a binding cap is expected to pick, in the order the build visits them: the nodes the first
    /// ranking puts first (influence through the logit rows alone: each row's |weights| normalised to a unit sum, times
    /// the logit's probability), a queue of UpdateInterval × batch at a time, each sorted as the build sorts it.
    /// `rowsOf` computes rows as the build does. Later rankings may pick other rows: an expectation, not a bound.
    let internal firstRankingPicks (rowsOf: int[] -> int[] -> torch.Tensor -> int[] * torch.Tensor * torch.Tensor)
                                   (lr: LocalReplacement) (nodes: NodeFeatures) (logits: LogitNode[]) (batch: int)
                                   (config: GraphConfig) : int[] =
        // (not under no_grad: the autograd engine's rows need the graph)
        use scope = torch.NewDisposeScope()
        let nL, p, nNode = lr.NLayers, lr.NPositions, nodes.Count
        let maxFeatures = match config.MaxFeatureNodes with Some n -> min n nNode | None -> nNode
        let influence = torch.zeros([| int64 (nNode + (nL + 1) * p) |], dtype = torch.float64, device = lr.Device)
        let dirs = logitDirections lr (logits |> Array.map (fun l -> l.Token))
        let mutable s = 0
        while s < logits.Length do
            let m = min batch (logits.Length - s)
            use step = torch.NewDisposeScope()
            let order, sources, values = rowsOf (Array.create m nL) (Array.create m (p - 1)) (dirs.narrow(0, int64 s, int64 m))
            let a = values.to_type(torch.float64).abs()
            let w = torch.tensor(order |> Array.map (fun i -> logits[s + i].Probability), dtype = torch.float64, device = lr.Device)
            let coef = w.div(a.sum(1L).clamp_min(sc 1e-10))
            influence.index_add_(0L, sources, coef.unsqueeze(0).matmul(a).squeeze(0), sc 1.0) |> ignore
            s <- s + m
        let values = influence.narrow(0, 0L, int64 nNode).cpu().data<float>().ToArray()
        Array.init nNode id
        |> Array.sortWith (fun a b -> let c = compare values[b] values[a] in if c <> 0 then c else compare a b)
        |> Array.truncate maxFeatures
        |> Array.chunkBySize (max 1 (config.UpdateInterval * batch))
        |> Array.collect (fun q -> if config.CausalCone then Array.sortWith (byPositionThenLayer nodes) q else q)

    /// The memory estimate of building the graph of `lr` with `config` (see `MemoryEstimate`), with the batch size
    /// the build would choose. With a binding feature cap it computes the logit rows (one transposed pass per batch of
    /// logits) to expect the rows the first ranking picks.
    let estimateFor (lr: LocalReplacement) (config: GraphConfig) : MemoryEstimate =
        let nodes = nodeFeatures lr config.ZeroPositions
        let nLogits = match config.LogitTokens with Some ts -> ts.Length | None -> config.MaxLogits
        let batch = chooseBatch lr nodes nLogits config
        let capped = match config.MaxFeatureNodes with Some n -> n < nodes.Count | None -> false
        let picks =
            if not capped then None
            else
                use pr = prepare lr nodes config.ZeroPositions config.BackwardDType
                Some (firstRankingPicks (explicitRows pr lr.NPositions config.CausalCone) lr nodes (logitTargets lr config) batch config)
        estimateWith lr nodes nLogits batch config picks

    /// Checks a prompt against a model (not empty, within the context, ids in the vocabulary).
    let checkPrompt (model: TransformerConfig) (tokens: int[]) =
        if isNull (box tokens) || tokens.Length = 0 then invalidArg "tokens" "the prompt is empty: give at least one token"
        if tokens.Length > model.NCtx then
            invalidArg "tokens" (sprintf "the prompt has %d tokens, more than the model's context length n_ctx = %d" tokens.Length model.NCtx)
        match tokens |> Array.tryFindIndex (fun t -> t < 0 || t >= model.VocabSize) with
        | Some i -> invalidArg "tokens" (sprintf "token %d at position %d is outside the vocabulary (0..%d)" tokens[i] i (model.VocabSize - 1))
        | None -> ()


    /// The attribution graph of the local replacement model `lr` (its last position's next-token prediction): edges
    /// between the active features outside `ZeroPositions` (at most `MaxFeatureNodes`, the most influential on the
    /// logits), error nodes, token embeddings and the target logits, computed one batch of `BatchSize` targets at a
    /// time, each batch one pass down the transposed frozen network (`GraphEngine.Explicit`) or one autograd pass
    /// (`GraphEngine.Autograd`), in its causal cone. Refuses (InvalidOperationException) when the memory estimate
    /// exceeds the budget.
    let buildFrom (lr: LocalReplacement) (config: GraphConfig) : Graph =
        let config = validate config
        let clock = Stopwatch.StartNew()
        let nL, p = lr.NLayers, lr.NPositions
        let device = lr.Device
        let nodes = nodeFeatures lr config.ZeroPositions
        let nNode = nodes.Count
        let logits = logitTargets lr config
        let nLogits = logits.Length
        let batchSize = chooseBatch lr nodes nLogits config
        // the bound does not depend on which rows a cap picks: checked before any heavy work
        refuseBeyondBudget config (estimateWith lr nodes nLogits batchSize config None) (sprintf "of %d tokens with %d active features" p nNode)
        let nBuild = nNode + (nL + 1) * p + nLogits
        let logitBase = nNode + (nL + 1) * p
        let rowsOf, engine =
            match config.Engine with
            | GraphEngine.Explicit ->
                let pr = prepare lr nodes config.ZeroPositions config.BackwardDType
                explicitRows pr p config.CausalCone, (pr :> IDisposable)
            | GraphEngine.Autograd -> autogradEngine lr nodes config.ZeroPositions config.CausalCone
        use _engine = engine
        let maxFeatures = match config.MaxFeatureNodes with Some n -> min n nNode | None -> nNode
        let est =
            let picks = if maxFeatures < nNode then Some (firstRankingPicks rowsOf lr nodes logits batchSize config) else None
            estimateWith lr nodes nLogits batchSize config picks
        let blocks = ResizeArray<Adjacency.DeviceBlock>()
        let invSums = ResizeArray<torch.Tensor>()
        // ranking by influence only when the cap binds
        let ranker = if maxFeatures < nNode then Some (new Ranker(nBuild, nLogits + maxFeatures, maxFeatures, device)) else None
        use _ranker = { new IDisposable with member _.Dispose() = ranker |> Option.iter (fun r -> (r :> IDisposable).Dispose()) }
        let mutable batches = 0
        let mutable ranking = 0.0
        try
            let addBlock (targets: int[]) (order: int[], sources: torch.Tensor, values: torch.Tensor) =
                ranker |> Option.iter (fun (r: Ranker) -> r.Add(order |> Array.map (fun i -> if targets[i] < nNode then targets[i] else -1)))
                use _ = torch.no_grad ()
                blocks.Add { Rows = torch.tensor(order |> Array.map (fun i -> int64 targets[i]), device = device); Cols = sources; Values = values }
                invSums.Add(
                    use scope = torch.NewDisposeScope()
                    values.abs().sum(1L).clamp_min(sc 1e-10).reciprocal().MoveToOuterDisposeScope())
                batches <- batches + 1
            // logits
            (use dirs = logitDirections lr (logits |> Array.map (fun l -> l.Token))
             let mutable s = 0
             while s < nLogits do
                 let m = min batchSize (nLogits - s)
                 use vecs = dirs.narrow(0, int64 s, int64 m)
                 addBlock (Array.init m (fun k -> logitBase + s + k)) (rowsOf (Array.create m nL) (Array.create m (p - 1)) vecs)
                 s <- s + m
                 config.Progress { Phase = "logits"; Done = s; Total = nLogits; Elapsed = clock.Elapsed })
            // features, in order of influence
            let visited = Array.zeroCreate<bool> nNode
            let mutable nVisited = 0
            use logitWeights =
                let w = Array.zeroCreate<float> nBuild
                logits |> Array.iteri (fun k l -> w[logitBase + k] <- l.Probability)
                torch.tensor(w, device = device)
            while nVisited < maxFeatures do
                let pending =
                    if maxFeatures = nNode then [| for k in 0 .. nNode - 1 do if not visited[k] then yield k |]
                    else
                        let started = clock.Elapsed
                        use _ranking = { new IDisposable with member _.Dispose() = ranking <- ranking + (clock.Elapsed - started).TotalSeconds }
                        let values =
                            use scope = torch.NewDisposeScope()
                            ranker.Value.Influence(blocks, invSums, logitWeights).narrow(0, 0L, int64 nNode).cpu().data<float>().ToArray()
                        let queue = min (config.UpdateInterval * batchSize) (maxFeatures - nVisited)
                        [| for k in 0 .. nNode - 1 do if not visited[k] then yield k |]
                        |> Array.sortWith (fun a b -> let c = compare values[b] values[a] in if c <> 0 then c else compare a b)
                        |> Array.truncate queue
                // tight causal cones: batch neighbours in position, then layer
                let pending = if config.CausalCone then pending |> Array.sortWith (byPositionThenLayer nodes) else pending
                let mutable s = 0
                while s < pending.Length do
                    let m = min batchSize (pending.Length - s)
                    let idx = pending[s .. s + m - 1]
                    let layers = idx |> Array.map (fun k -> nodes.Layer[k])
                    let positions = idx |> Array.map (fun k -> nodes.Position[k])
                    let vecs =
                        use scope = torch.NewDisposeScope()
                        let out = torch.zeros([| int64 m; lr.Embedding.shape[1] |], dtype = lr.DType, device = device)
                        for layer in Array.distinct layers do
                            let at = [| for i in 0 .. m - 1 do if layers[i] = layer then yield i |]
                            let feats = torch.tensor(at |> Array.map (fun i -> int64 nodes.Feature[idx[i]]), device = device)
                            out.index_copy_(0L, torch.tensor(at |> Array.map int64, device = device), LocalReplacement.encoderDirections lr layer feats) |> ignore
                        out.MoveToOuterDisposeScope()
                    let rows =
                        try rowsOf layers positions vecs
                        finally vecs.Dispose()
                    addBlock idx rows
                    for k in idx do visited[k] <- true
                    nVisited <- nVisited + m
                    s <- s + m
                    config.Progress { Phase = "features"; Done = nVisited; Total = maxFeatures; Elapsed = clock.Elapsed }
            // the graph's node ids: selected features, errors, tokens, logits; each device block freed once copied
            let selected = [| for k in 0 .. nNode - 1 do if visited[k] then yield k |]
            let nSel = selected.Length
            let remap = Array.create nBuild -1
            selected |> Array.iteri (fun i k -> remap[k] <- i)
            for id in nNode .. nBuild - 1 do remap[id] <- id - nNode + nSel
            use remapT = torch.tensor(remap |> Array.map int64, device = device)
            let graphBlocks =
                [| for i in 0 .. blocks.Count - 1 ->
                     let blk = blocks[i]
                     let converted =
                         use scope = torch.NewDisposeScope()
                         let cols = remapT.index_select(0L, blk.Cols)
                         let keep = cols.ge(sc 0.0).nonzero().reshape(-1L)
                         let cols = cols.index_select(0L, keep).cpu()
                         let values = (if keep.shape[0] = blk.Cols.shape[0] then blk.Values else blk.Values.index_select(1L, keep)).contiguous().cpu()
                         let rows = remapT.index_select(0L, blk.Rows).cpu()
                         { Targets = rows.data<int64>().ToArray() |> Array.map int
                           Sources = cols.data<int64>().ToArray() |> Array.map int
                           Weights = values.reshape(-1L).data<float32>().ToArray() }
                     Adjacency.dispose [ blk ]
                     converted |]
            let features =
                selected |> Array.map (fun k ->
                    { Layer = nodes.Layer[k]; Position = nodes.Position[k]; Feature = nodes.Feature[k]; Activation = nodes.Activation[k] })
            { Tokens = Array.copy lr.Tokens
              TokenStrings = [||]
              NLayers = nL
              Features = features
              Logits = logits
              Blocks = graphBlocks
              Settings = { config.Settings with BatchSize = batchSize }
              Stats = { ActiveFeatures = nNode; Batches = batches; BuildSeconds = clock.Elapsed.TotalSeconds; RankingSeconds = ranking; EstimatedBytes = est.TotalBytes } }
        finally
            Adjacency.dispose blocks
            for t in invSums do t.Dispose()

    let private checkInputs (model: Transformer) (coders: Coder list) (prompts: int[][]) (config: GraphConfig) =
        for tokens in prompts do checkPrompt model.Config tokens
        LocalReplacement.sites model.Config coders |> ignore
        match config.LogitTokens with
        | Some ts ->
            match ts |> Array.tryFind (fun t -> t < 0 || t >= model.Config.VocabSize) with
            | Some t -> invalidArg "LogitTokens" (sprintf "target token %d is outside the vocabulary (0..%d)" t (model.Config.VocabSize - 1))
            | None -> ()
        | None -> ()
        let es = if LocalReplacement.modelDType model = torch.float64 then 8 else 4
        for tokens in prompts do
            // a lower bound (no active features yet): refuses hopeless prompts before the clean run
            refuseBeyondBudget { config with BatchSize = max 1 config.BatchSize } (estimateMemory model.Config es tokens.Length 0L config.MaxLogits { config with BatchSize = max 1 config.BatchSize })
                (sprintf "of %d tokens" tokens.Length)

    /// The attribution graph of `tokens` with `coders` in place of every MLP of `model` (see `buildFrom`). Checks the
    /// prompt, the coders and the memory budget before any heavy work.
    let build (model: Transformer) (coders: Coder list) (tokens: int[]) (config: GraphConfig) : Graph =
        let config = validate config
        checkInputs model coders [| tokens |] config
        use lr = LocalReplacement.create model coders tokens
        buildFrom lr config

    /// The attribution graphs of several prompts, from one batched clean forward pass (`LocalReplacement.createMany`);
    /// each graph equals the one `build` makes of that prompt alone (zeroed positions count from each prompt's start).
    let buildMany (model: Transformer) (coders: Coder list) (prompts: int[][]) (config: GraphConfig) : Graph[] =
        let config = validate config
        if isNull (box prompts) || prompts.Length = 0 then invalidArg "prompts" "no prompts: give at least one"
        checkInputs model coders prompts config
        let lrs = LocalReplacement.createMany model coders prompts
        try lrs |> Array.map (fun lr -> buildFrom lr config)
        finally for lr in lrs do (lr :> IDisposable).Dispose()
