namespace Transcoders.Circuits

open TorchSharp
open Transcoders.Text

/// Tracing a prompt from plain values: settings records built from their defaults (so that fields added later keep
/// their defaults; the C# facade and the command line come in here), graphs labelled with their token strings, and
/// the root of a path search from a component's name.
[<RequireQualifiedAccess>]
module Tracing =

    /// `GraphConfig.Default` with these values.
    let graphConfig (maxLogits: int) (desiredLogitProbability: float) (logitTokens: int[] option) (batchSize: int)
                    (maxFeatureNodes: int option) (updateInterval: int) (causalCone: bool) (memoryBudgetBytes: int64 option)
                    (progress: GraphProgress -> unit) : GraphConfig =
        { GraphConfig.Default with
            MaxLogits = maxLogits
            DesiredLogitProbability = desiredLogitProbability
            LogitTokens = logitTokens
            BatchSize = batchSize
            MaxFeatureNodes = maxFeatureNodes
            UpdateInterval = updateInterval
            CausalCone = causalCone
            MemoryBudgetBytes = memoryBudgetBytes
            Progress = progress }

    /// `PruneConfig.Default` with these thresholds, computed on `device`.
    let pruneConfig (nodeThreshold: float) (edgeThreshold: float) (device: torch.Device) : PruneConfig =
        { PruneConfig.Default with NodeThreshold = nodeThreshold; EdgeThreshold = edgeThreshold; Device = device }

    /// `PathSearchOptions.Default` with these values; `byMagnitude` ranks by |attribution| instead of positive
    /// attribution, `ignoreBos` keeps attention heads at position 0 out of the candidates (`NodeFilter.ignoreBos`).
    let pathSearch (depth: int) (perLayer: int) (branches: int) (beam: int) (byMagnitude: bool) (includeErrors: bool)
                   (ignoreBos: bool) : PathSearchOptions =
        { PathSearchOptions.Default with
            Depth = depth; PerLayer = perLayer; Branches = branches; Beam = beam
            Ranking = (if byMagnitude then Magnitude else Positive)
            IncludeErrors = includeErrors
            Candidates = (if ignoreBos then NodeFilter.ignoreBos else AnyNode) }

    /// The graph with its tokens' display strings decoded by `tokenizer`.
    let withTokenStrings (tokenizer: Tokenizer) (graph: Graph) : Graph =
        { graph with TokenStrings = graph.Tokens |> Array.map (fun t -> Tokenizer.decode tokenizer [| t |]) }

    /// The root of a path search: a transcoder feature (`mlp2tc[17]@5`), a logit (`logit[87]@14`) or a logit
    /// difference (`logit[87-12]@14`) of the run's prompt; other components fail with a message naming them.
    let root (run: PromptRun) (node: Component) : FeatureVector =
        match node with
        | TranscoderFeature at -> FeatureVector.ofFeature run at
        | TokenLogit(t, p) -> FeatureVector.ofLogit run t p
        | LogitDifference(t, o, p) -> FeatureVector.ofLogitDiff run t o p
        | c -> invalidArg "node" (sprintf "%s cannot root a path search: give a feature mlpLtc[F]@P, a logit logit[T]@P or a logit difference logit[T-U]@P" c.Display)
