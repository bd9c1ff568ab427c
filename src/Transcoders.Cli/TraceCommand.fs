/// `trace MODEL --coders DIR --prompt TEXT`: the attribution graph of a prediction (pruned, scored, saved) and the
/// transcoder paper's greedy computational paths to the predicted logit or to a feature.
module Transcoders.Cli.TraceCommand

open System
open System.Diagnostics
open System.IO
open Argu
open TorchSharp
open Transcoders.Circuits
open Transcoders.Coders
open Transcoders.Models
open Transcoders.Text

type Args =
    | [<MainCommand; ExactlyOnce>] Model of path: string
    | [<Mandatory>] Coders of folders: string list
    | [<Mandatory>] Prompt of text: string
    | Target of token: string
    | Target_Id of id: int
    | Feature of name: string
    | Out of file: string
    | Max_Feature_Nodes of int
    | Batch_Size of int
    | Memory_Budget_Gib of float
    | Node_Threshold of float
    | Edge_Threshold of float
    | Paths of int
    | Depth of int
    | Beam of int
    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Model _ -> "the model (our folder, a Hugging Face folder or a llama2.c .bin)"
            | Coders _ -> "transcoders or a cross-layer transcoder, one per MLP: coder folders, or folders holding them (e.g. runs/quickstart/coders)"
            | Prompt _ -> "the prompt (encoded with the model's tokenizer, BOS first)"
            | Target _ -> "explain this next token (text of one token, e.g. ' she') instead of the most likely ones"
            | Target_Id _ -> "explain this next-token id"
            | Feature _ -> "trace paths to this feature instead of a logit, in the transcoder paper's names: mlp2tc[17]@5"
            | Out _ -> "graph file (default graph.safetensors)"
            | Max_Feature_Nodes _ -> "at most this many feature nodes, the most influential (default 7500)"
            | Batch_Size _ -> "targets per backward pass (default 64)"
            | Memory_Budget_Gib _ -> "refuse graphs whose estimated memory exceeds this (default 16)"
            | Node_Threshold _ -> "pruning: keep the nodes holding this share of the influence (default 0.8)"
            | Edge_Threshold _ -> "pruning: keep the edges holding this share of the influence (default 0.98)"
            | Paths _ -> "computational paths printed (default 10)"
            | Depth _ -> "path search depth (default 3)"
            | Beam _ -> "paths kept per iteration (default 15)"

/// Every coder under `folders`, ordered by layer (kept for callers of the command's old helper).
[<Obsolete "use Transcoders.Coders.CoderFolders.load">]
let loadCoders (folders: string list) (device: torch.Device) : Coder list = CoderFolders.load folders device

/// The model, its tokenizer and the prompt's tokens (kept for callers of the command's old helper).
[<Obsolete "use Transcoders.Models.PromptTokens.load">]
let loadPrompt (modelPath: string) (prompt: string) (device: torch.Device) = PromptTokens.load modelPath prompt device

/// Prints the top-k next tokens of the last position of logits [1, p, vocab] (or [p, vocab]).
let printTop (tokenizer: Tokenizer) (k: int) (logits: torch.Tensor) =
    for id, p in NextToken.top k (NextToken.probabilities logits) do printfn "  %-28s p = %.4f" (PromptTokens.display tokenizer id) p

/// Everything `trace` prints and saves, as a function the quickstart calls too.
let trace (modelPath: string) (model: Transformer) (tokenizer: Tokenizer) (coders: Coder list) (tokens: int[]) (target: int option)
          (feature: Component option) (config: GraphConfig) (prune: PruneConfig) (search: PathSearchOptions) (nPaths: int) (out: string) =
    let sw = Stopwatch.StartNew()
    printfn "prompt: %d tokens: %s" tokens.Length (String.Join(" ", tokens |> Array.map (fun t -> sprintf "%A" (Tokenizer.decode tokenizer [| t |]))))
    use logits = (use _ = torch.no_grad () in use t = PromptTokens.tensor tokens model.Device in Transformer.forward model t)
    printfn "the model's next-token predictions:"
    printTop tokenizer 5 logits
    let config = { config with LogitTokens = target |> Option.map (fun t -> [| t |]) }
    let mutable lastPrint = TimeSpan.Zero
    let progress (p: GraphProgress) =
        if p.Elapsed - lastPrint > TimeSpan.FromSeconds 5.0 || p.Done = p.Total then
            lastPrint <- p.Elapsed
            printfn "  [%6.1fs] %s %d/%d" p.Elapsed.TotalSeconds p.Phase p.Done p.Total
    let graph =
        AttributionGraph.build model coders tokens
            { config with Progress = progress }
    let graph = Tracing.withTokenStrings tokenizer graph
    let pruned = Pruning.prune prune graph
    let scores = Pruning.scores graph prune.Device
    let edgeCount = Graph.edges graph |> Seq.length
    printfn "\nattribution graph: %d active features (%d kept as nodes), %d error nodes, %d token nodes, %d logits; %d nodes, %s edges; %d backward passes in %.2f s"
        graph.Stats.ActiveFeatures graph.Features.Length (graph.NLayers * graph.NPositions) graph.NPositions graph.Logits.Length
        graph.NodeCount (Output.count (int64 edgeCount)) graph.Stats.Batches graph.Stats.BuildSeconds
    for l in graph.Logits do printfn "  logit %-28s p = %.4f" (PromptTokens.display tokenizer l.Token) l.Probability
    printfn "pruned (node %.2f, edge %.2f): %d nodes, %d edges kept" prune.NodeThreshold prune.EdgeThreshold pruned.KeptNodes.Length pruned.Edges.Length
    printfn "replacement score %.4f, completeness score %.4f" scores.Replacement scores.Completeness
    printfn "most influential features on the logits:"
    let top =
        [ 0 .. graph.Features.Length - 1 ]
        |> List.sortByDescending (fun i -> pruned.NodeInfluence[i])
        |> List.truncate 10
    for i in top do
        let f = graph.Features[i]
        printfn "  %-18s on %-14s activation %8.3f  influence %.4f" (Graph.label graph i) (sprintf "%A" graph.TokenStrings[f.Position]) f.Activation pruned.NodeInfluence[i]
    let info =
        { Scores = Some scores
          Description =
            Map [ "model", Path.GetFullPath modelPath
                  "prompt_tokens", String.Join(" ", tokens)
                  "coders", String.Join(", ", coders |> List.map (fun c -> sprintf "%s L%s" (CoderConfig.kindName c.Config.Kind) (String.Join("+", c.Config.Layers)))) ] }
    let dir = Path.GetDirectoryName(Path.GetFullPath out)
    if not (String.IsNullOrEmpty dir) then Directory.CreateDirectory dir |> ignore
    GraphFile.saveWith out info graph
    printfn "graph written to %s" out

    // The paper's greedy path search, from the target logit (or feature) back to the embeddings.
    use circuit = CircuitModel.create model coders
    use run = Prompt.run circuit tokens
    let last = tokens.Length - 1
    let root =
        match feature with
        | Some(TranscoderFeature at) -> FeatureVector.ofFeature run at
        | Some c -> invalidArg "feature" (sprintf "%s is not a transcoder feature (give mlpLtc[F]@P)" c.Display)
        | None ->
            let t = match target with Some t -> t | None -> graph.Logits[0].Token
            FeatureVector.ofLogit run t last
    let found = PathSearch.find run search root
    printfn "\ncomputational paths to %s (value %.4f), best first:" root.Component.Display root.Contribution
    for p in found.Paths |> List.truncate nPaths do printfn "  %+9.4f  %s" p.Attribution (PathSearch.display p)
    printfn "top features over the paths (summed attribution):"
    for c, v in PathSearch.topNodes 5 (NodeFilter.OfKind FeatureComponent) found.Paths do printfn "  %+9.4f  %s" v c.Display
    printfn "traced in %s" (Output.seconds sw.Elapsed)
    graph, pruned, scores

let run (common: Common.Options) (args: ParseResults<Args>) =
    let modelPath = args.GetResult Model
    let device = Common.device common
    let model, tokenizer, tokens = PromptTokens.loadWith (Common.loadOptions common) modelPath (args.GetResult Prompt) device
    use _m = model
    let coders = CoderFolders.load (args.GetResult Coders) device
    try
        let target =
            match args.TryGetResult Target_Id, args.TryGetResult Target with
            | Some id, _ -> Some id
            | None, Some text -> Some(PromptTokens.single tokenizer text)
            | None, None -> None
        let feature = args.TryGetResult Feature |> Option.map Component.parse
        let config =
            { GraphConfig.Default with
                MaxFeatureNodes = Some(args.GetResult(Max_Feature_Nodes, 7500))
                BatchSize = args.GetResult(Batch_Size, GraphConfig.Default.BatchSize)
                MemoryBudgetBytes = Some(int64 (args.GetResult(Memory_Budget_Gib, 16.0) * float (1L <<< 30))) }
        let prune =
            { PruneConfig.Default with
                NodeThreshold = args.GetResult(Node_Threshold, 0.8)
                EdgeThreshold = args.GetResult(Edge_Threshold, 0.98)
                Device = device }
        let search = { PathSearchOptions.Default with Depth = args.GetResult(Depth, 3); Beam = args.GetResult(Beam, 15) }
        trace modelPath model tokenizer coders tokens target feature config prune search (args.GetResult(Paths, 10))
            (args.GetResult(Out, "graph.safetensors")) |> ignore
        0
    finally
        for c in coders do (c :> IDisposable).Dispose()
