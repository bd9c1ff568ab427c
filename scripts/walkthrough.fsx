#load "load.fsx"
// A walkthrough of transcoder circuit analysis, the counterpart of the transcoder paper's walkthrough notebook
// (Dunefsky, Chlenski & Nanda 2024): load a model and its transcoders, pick a feature, read its top examples and its
// de-embedding, trace the computational paths that make it fire, merge them into a graph, and test the paths by
// switching a feature off.
//
//   dotnet build src/Transcoders -c Release
//   dotnet fsi scripts/walkthrough.fsx [MODEL] [CODERS] [LAYER] [FEATURE]
//
// MODEL and CODERS default to the shipped TinyStories GPT and its coders (data/models/tinystories-gpt,
// data/coders/tinystories-gpt); LAYER defaults to ⌊2·n_layers/3⌋ and FEATURE to the most active one there at the
// end of a held-out sentence.

open System
open TorchSharp
open Transcoders.Circuits
open Transcoders.Coders
open Transcoders.Files
open Transcoders.Models
open Transcoders.Text
open Transcoders.Views

let args = fsi.CommandLineArgs |> Array.tail
let modelPath = if args.Length > 0 then args[0] else Paths.data "models/tinystories-gpt"
let codersPath = if args.Length > 1 then args[1] else Paths.data "coders/tinystories-gpt"
let device = Transcoders.Tensors.Device.resolve Transcoders.Tensors.Device.Auto

// 1. The model, its tokenizer and its transcoders: one per MLP, each reading the MLP's input (ln2's output) and
//    predicting its output (hook_mlp_out).
let model, _ = ModelFiles.load modelPath device
model.eval ()
let tokenizer = ModelTokenizer.find modelPath
let transcoders =
    CoderFolders.load [ codersPath ] device
    |> List.filter (fun c -> c.Config.Kind = Transcoder)
    |> List.distinctBy (fun c -> c.Config.Layers[0])
    |> List.sortBy (fun c -> c.Config.Layers[0])
let show (id: int) = sprintf "%A" (Tokenizer.decode tokenizer [| id |])
printfn "%d layers, d_model %d; transcoders at layers %A" model.Config.NLayers model.Config.DModel (transcoders |> List.map (fun c -> c.Config.Layers[0]))

// 2. A prompt and a feature: by default the most active feature of a middle-to-late layer at the prompt's last token.
let prompt = PromptTokens.encode tokenizer "Once upon a time, there was a little girl named Lily. She loved to play with her"
let layer = if args.Length > 2 then int args[2] else 2 * model.Config.NLayers / 3
let coder = transcoders |> List.find (fun c -> c.Config.Layers[0] = layer)
let circuit = CircuitModel.create model transcoders            // the model's weights and the transcoders, for attribution
let run = Prompt.run circuit prompt                       // one cached pass over the prompt
let last = prompt.Length - 1
let feature =
    if args.Length > 3 then int args[3]
    else run.ActivationsAt(layer, last) |> Array.mapi (fun i a -> i, a) |> Array.maxBy snd |> fst
printfn "\nfeature mlp%dtc[%d]: activation %.3f at the last token %s" layer feature (FeatureVector.activation run { Layer = layer; Position = last; Feature = feature }) (show prompt[last])

// 3. What the feature responds to: its top examples over held-out text (the shipped validation stories, one
//    paragraph per sequence), with the activating token marked.
let paragraphs =
    Corpus.readStories (Paths.data ("tinystories/" + Corpus.shippedValidationFile))
    |> Seq.collect (fun s -> s.Text.Split("\n\n", StringSplitOptions.RemoveEmptyEntries))
    |> Seq.map (fun p -> Tokenizer.encodeDocument tokenizer true false (p.Trim()))
    |> Seq.truncate 300
let dashboard = FeatureDashboard.compute model tokenizer "walkthrough" coder paragraphs { DashboardOptions.Default with Heads = 0 }
let summary = dashboard.Layers[0].Summaries[feature]
printfn "\nit fires on %d of %d tokens; top examples:" summary.Count summary.Tokens
for e in summary.Top |> Array.truncate 6 do
    let text (ids: int[]) = (Tokenizer.decode tokenizer ids).Replace("\n", " ")
    printfn "  %6.2f  %s[[%s]]%s" e.Activation (text e.Tokens[.. e.Center - 1]) (text [| e.Tokens[e.Center] |]) (text e.Tokens[e.Center + 1 ..])

// 4. Input-invariant: its de-embedding, the tokens whose embeddings drive its encoder directly (W_E·f_enc). It is
//    the whole story only for layer-0 features, but often a good hint for later ones.
let deembedding = Attribution.featureDeembedding circuit layer feature
printfn "\nde-embedding: %s" (String.Join(", ", Attribution.top 8 false deembedding |> List.map (fun (t, v) -> sprintf "%s %.2f" (show t) v)))

// 5. Input-dependent: the computational paths that make it fire on this prompt (Algorithm 1). Each path's
//    attribution is the product of the connections along it, times the activation of its last feature.
let search = PathSearch.find run { PathSearchOptions.Default with Candidates = NodeFilter.ignoreBos } (FeatureVector.ofFeature run { Layer = layer; Position = last; Feature = feature })
printfn "\npaths:"
for p in search.Paths |> List.truncate 8 do printfn "  %+8.4f  %s" p.Attribution (PathSearch.display p)

// 6. The paths merged into one graph (Algorithm 2), with each node's error terms: what the transcoders miss, the
//    biases, and what the pruned paths leave out.
let graph = PathGraph.ofPaths run (search.Paths |> List.truncate 8)
printfn "\n%s" (PathGraph.format graph)

// 7. Testing a path: switch the strongest direct transcoder contributor off (in the real model, with the coders'
//    error terms kept so that nothing else changes) and compare the feature's measured change with the path's
//    prediction (−its attribution). Indirect routes and the nonlinearity make up the difference.
let rm = ReplacementModel.create model transcoders Splicing.WithErrorTerms
let site = Splicing.featureHookName coder 0
let featureWith (interventions: FeatureIntervention list) =
    use _ = torch.no_grad ()
    use scope = torch.NewDisposeScope()
    let r = ReplacementModel.run rm { RunOptions.Default with Hooks = Interventions.featureHooks transcoders interventions; Cache = set [ site ] } (PromptTokens.tensor prompt device)
    let v = r.Cache[site].[0L, int64 last, int64 feature].item<float32> () |> float
    for t in r.Cache.Values do t.Dispose()
    v
let before = featureWith []
match search.Paths |> List.tryPick (fun p -> match p.Nodes with [ _; child ] -> (match child.Component with TranscoderFeature at -> Some(at.Layer, at.Feature, at.Position, p.Attribution) | _ -> None) | _ -> None) with
| Some(l, f, q, attribution) ->
    let after = featureWith [ { Layer = l; Feature = f; Position = At q; Action = Ablate } ]
    printfn "switching off mlp%dtc[%d]@%d: the path predicts %+.3f, measured %+.3f (%.3f → %.3f)" l f q (-attribution) (after - before) before after
| None -> printfn "no direct transcoder contributor among the paths"

(run :> IDisposable).Dispose()
(circuit :> IDisposable).Dispose()
for c in transcoders do (c :> IDisposable).Dispose()
