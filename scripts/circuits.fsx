#load "load.fsx"
// Circuits of one prediction of the default model, the kinds of result of the transcoder paper and of TinyTranscoder:
// the attribution graph (pruned, scored, saved), the greedy computational paths to the predicted token, a later-layer
// feature traced back to earlier features and heads, a feature's de-embedding, and a feature turned on to change the
// next token (free and constrained), with the graph's prediction of the effect.
//
//   dotnet run --project src/Transcoders.Cli -c Release -- quickstart      (trains the default GPT and its transcoders)
//   dotnet build src/Transcoders -c Release
//   dotnet fsi scripts/circuits.fsx [MODEL] [CODERS] [PROMPT]
//
// MODEL defaults to runs/quickstart/model and CODERS (a folder of coder folders) to runs/quickstart/coders.

open System
open System.IO
open TorchSharp
open Transcoders.Circuits
open Transcoders.Coders
open Transcoders.Models
open Transcoders.Text

let args = fsi.CommandLineArgs |> Array.tail
let modelPath = if args.Length > 0 then args[0] else Path.Combine("runs", "quickstart", "model")
let codersPath = if args.Length > 1 then args[1] else Path.Combine("runs", "quickstart", "coders")
let prompt = if args.Length > 2 then args[2] else "Once upon a time, there was a little girl named Lily. She"
if not (Directory.Exists modelPath || File.Exists modelPath) then
    failwithf "%s not found: run the quickstart first (it trains the default GPT and its transcoders), or give MODEL and CODERS" modelPath
let device = Transcoders.Tensors.Device.resolve Transcoders.Tensors.Device.Auto

// 1. The model, its transcoders (one per MLP) and the prompt.
let model, _ = ModelFiles.load modelPath device
model.eval ()
let tokenizer = ModelTokenizer.find modelPath
let coders =
    CoderFolders.load [ codersPath ] device
    |> List.filter (fun c -> c.Config.Kind = Transcoder || c.Config.Kind = CrossLayerTranscoder)
let tokens = PromptTokens.encode tokenizer prompt
let show (id: int) = sprintf "%A" (Tokenizer.decode tokenizer [| id |])
let last = tokens.Length - 1
printfn "%d transcoders; prompt of %d tokens: %s" coders.Length tokens.Length (String.Join(" ", tokens |> Array.map show))

// 2. The attribution graph of the next-token prediction: pruned by influence, scored, saved.
let graph = AttributionGraph.build model coders tokens GraphConfig.Default |> Tracing.withTokenStrings tokenizer
let pruned = Pruning.prune { PruneConfig.Default with Device = device } graph
let scores = Pruning.scores graph device
printfn "\ngraph: %d nodes, %d kept after pruning (%d edges); replacement %.3f, completeness %.3f; built in %.2f s"
    graph.NodeCount pruned.KeptNodes.Length pruned.Edges.Length scores.Replacement scores.Completeness graph.Stats.BuildSeconds
for l in graph.Logits |> Array.truncate 3 do printfn "  explains %s (p = %.3f)" (show l.Token) l.Probability
Directory.CreateDirectory(Path.Combine("runs", "circuits")) |> ignore
GraphFile.saveWith (Path.Combine("runs", "circuits", "graph.safetensors")) { Scores = Some scores; Description = Map.ofList [ ("prompt", prompt) ] } graph

// 3. The paper's greedy computational paths to the predicted token, merged into a path graph (Algorithm 2).
let circuit = CircuitModel.create model coders
let run = Prompt.run circuit tokens
let predicted = graph.Logits[0].Token
let toLogit = PathSearch.find run PathSearchOptions.Default (FeatureVector.ofLogit run predicted last)
printfn "\npaths to %s:" (show predicted)
for p in toLogit.Paths |> List.truncate 6 do printfn "  %+8.4f  %s" p.Attribution (PathSearch.display p)
printfn "%s" (PathGraph.format (PathGraph.ofPaths run (toLogit.Paths |> List.truncate 6)))

// 4. A later-layer feature traced back to earlier features and attention heads.
let top = coders |> List.last
let lastLayer = top.Config.Layers |> Array.last
let acts = run.ActivationsAt(lastLayer, last)
let feature = acts |> Array.mapi (fun i a -> i, a) |> Array.maxBy snd |> fst
printfn "\nthe most active layer-%d feature at the last position: mlp%dtc[%d]@%d (activation %.3f)" lastLayer lastLayer feature last acts[feature]
let back = PathSearch.find run { PathSearchOptions.Default with Candidates = NodeFilter.ignoreBos } (FeatureVector.ofFeature run { FeatureAt.Layer = lastLayer; Position = last; Feature = feature })
for p in back.Paths |> List.truncate 6 do printfn "  %+8.4f  %s" p.Attribution (PathSearch.display p)

// 5. Input-invariant: which tokens directly drive the strongest layer-0 feature of the paths.
match PathSearch.topNodes 1 (AllOf [ OfKind FeatureComponent; AtLayer(Eq, 0) ]) (toLogit.Paths @ back.Paths) with
| (TranscoderFeature { Layer = l; Feature = f }, _) :: _ ->
    let deemb = Attribution.featureDeembedding circuit l f
    printfn "\nde-embedding of mlp%dtc[%d] (tokens that drive it directly): %s" l f
        (String.Join(", ", Attribution.top 8 false deemb |> List.map (fun (t, v) -> sprintf "%s %.2f" (show t) v)))
| _ -> ()

// 6. Turning a feature on: the feature whose direct effect most favours another token than the prediction, set
//    high at the last position; free (the real model) and constrained (attention and norms frozen) next tokens.
let nodesAtLast = graph.Features |> Array.mapi (fun i f -> i, f) |> Array.filter (fun (_, f) -> f.Position = last)
let second = graph.Logits |> Array.tryItem 1 |> Option.map (fun l -> l.Token)
match second with
| Some alt ->
    let altNode = Graph.logitNode graph 1
    let id, f = nodesAtLast |> Array.maxBy (fun (i, f) -> float (Graph.edge graph altNode i) / max 1e-6 f.Activation)
    let iv = [ { Layer = f.Layer; Feature = f.Feature; Position = At last; Action = SetTo(f.Activation * 8.0) } ]
    use lr = LocalReplacement.create model coders tokens
    let topOf (logits: torch.Tensor) = show (fst (NextToken.top 1 (NextToken.probabilities logits)).Head)
    use clean = LocalReplacement.forward lr
    use free = Interventions.free model coders tokens iv
    use constrained = Interventions.constrained lr iv
    printfn "\nturning on %s (×8, it favours %s): next token %s → free %s, constrained %s"
        (Graph.label graph id) (show alt) (topOf clean) (topOf free) (topOf constrained)
    for c in Interventions.compareWithGraph lr graph iv |> Array.truncate 3 do
        printfn "  %-12s graph predicts %+8.3f, constrained %+8.3f, free %+8.3f" (show c.Token) c.Predicted c.Constrained c.Free
| None -> ()

(run :> IDisposable).Dispose()
(circuit :> IDisposable).Dispose()
for c in coders do (c :> IDisposable).Dispose()
