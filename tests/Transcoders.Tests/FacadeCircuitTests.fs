/// The C# facade's circuits, coder kinds and training: each class compared with the F# functions it wraps
/// (attribution graphs, pruning, scores, graph files, computational paths, interventions, every coder kind and
/// activation, language-model training, a cross-layer transcoder trained from C#, the model-name rule).
module Transcoders.Tests.FacadeCircuitTests

open System
open System.Collections.Generic
open System.IO
open Expecto
open TorchSharp
open Transcoders
open Transcoders.Tests.Fixtures

module CoderCore = Transcoders.Coders.Coder
module CoderConfigCore = Transcoders.Coders.CoderConfig
module CoderFileCore = Transcoders.Coders.CoderFile
module CoderRunCore = Transcoders.Coders.CoderRun
module GraphCore = Transcoders.Circuits.AttributionGraph
module PruningCore = Transcoders.Circuits.Pruning
module PathsCore = Transcoders.Circuits.PathSearch
module InterventionsCore = Transcoders.Circuits.Interventions
module LocalCore = Transcoders.Circuits.LocalReplacement
module TokCore = Transcoders.Text.Tokenizer
type CoderKindCore = Transcoders.Coders.CoderKind
type GraphConfigCore = Transcoders.Circuits.GraphConfig
type PruneConfigCore = Transcoders.Circuits.PruneConfig
type PathSearchCore = Transcoders.Circuits.PathSearchOptions

/// The exception `f` raises (a test failure when it raises none).
let private raised (what: string) (f: unit -> unit) : exn =
    try
        f ()
        failtestf "%s: expected an exception" what
    with
    | :? AssertException -> reraise ()
    | e -> e

/// A small random model with a transcoder on each MLP, as facade objects over the same core objects.
let private circuitSetup (seed: int) =
    let model = randomModel seed { randomConfig seed GptLike with NLayers = 2; Dropout = 0.0; NCtx = 16 }
    let coders =
        [ for l in 0 .. 1 ->
            let cfg = { coderConfig (Random(seed + l)) model.Config Transcoders.Coders.Transcoder [| l |] with Activation = Transcoders.Coders.TopK 3 }
            randomCoder (seed * 7 + l) cfg ]
    let tokens = Array.init 6 (fun i -> (i * 5 + seed) % model.Config.VocabSize)
    new LanguageModel(model, null, None), [ for c in coders -> new SparseCoder(c) ], tokens

let private dispose (model: LanguageModel) (coders: SparseCoder list) =
    for c in coders do c.Dispose()
    model.Dispose()

let private coreCoders (coders: SparseCoder list) = [ for c in coders -> c.Core ]

let graphTests =
    testSequenced <| testList "AttributionGraph, PathFinder, FeatureInterventions" [
        test "AttributionGraph: Build, Prune, Scores, Save and Load give what the core functions give" {
            let model, coders, tokens = circuitSetup 11
            use dir = new TempDir()
            try
                let options = GraphOptions(MaxFeatureNodes = Nullable 20, BatchSize = 4)
                let progress = List<GraphProgress>()
                options.Progress <- Action<GraphProgress>(progress.Add)
                let graph = AttributionGraph.Build(model, coders, tokens, options)
                let core = GraphCore.build model.Core (coreCoders coders) tokens { GraphConfigCore.Default with MaxFeatureNodes = Some 20; BatchSize = 4 }
                Expect.equal graph.NodeCount core.NodeCount "nodes"
                Expect.equal [ for f in graph.Features -> f.Layer, f.Position, f.Feature ] [ for f in core.Features -> f.Layer, f.Position, f.Feature ] "feature nodes"
                Expect.equal [ for l in graph.Logits -> l.Token ] [ for l in core.Logits -> l.Token ] "logit nodes"
                Expect.equal (List.ofSeq graph.Edges |> List.map (fun e -> e.Target, e.Source, e.Weight))
                             (List.ofSeq (Transcoders.Circuits.Graph.edges core)) "edges"
                Expect.isNonEmpty progress "progress reported"
                Expect.equal graph.Features[0].Label (Transcoders.Circuits.Graph.label core 0) "labels"
                Expect.equal (graph.Label(graph.ErrorNode(1, 2))) "tc_error1@2" "error node ids"
                Expect.equal (graph.Label(graph.TokenNode 3)) "embed@3" "token node ids"
                let pruned = graph.Prune(PruneOptions(NodeThreshold = 0.7))
                let corePruned = PruningCore.prune { PruneConfigCore.Default with NodeThreshold = 0.7 } core
                Expect.equal (List.ofSeq pruned.KeptNodes) (List.ofArray corePruned.KeptNodes) "kept nodes"
                Expect.equal pruned.Edges.Count corePruned.Edges.Length "kept edges"
                let scores = graph.Scores()
                let coreScores = PruningCore.scores core cpu
                Expect.equal (scores.Replacement, scores.Completeness) (coreScores.Replacement, coreScores.Completeness) "scores"
                let file = dir.File "g.safetensors"
                graph.Save(file, scores, readOnlyDict [ "prompt", "<b>\"x\"</b>" ])
                let mutable saved : GraphScores = null
                let mutable description : IReadOnlyDictionary<string, string> = null
                let loaded = AttributionGraph.Load(file, &saved, &description)
                Expect.equal loaded.NodeCount graph.NodeCount "nodes survive"
                Expect.equal (List.ofSeq loaded.Edges) (List.ofSeq graph.Edges) "edges survive"
                Expect.equal saved scores "scores survive"
                Expect.equal description["prompt"] "<b>\"x\"</b>" "description survives"
                Expect.equal (AttributionGraph.Load(file).NodeCount) graph.NodeCount "Load without the extras"
                let e = raised "a missing file" (fun () -> AttributionGraph.Load(dir.File "none.safetensors") |> ignore)
                Expect.stringContains e.Message "none.safetensors" "names the file"
                let tooLong = Array.create (model.Config.NCtx + 1) 0
                let e = raised "a prompt beyond the context" (fun () -> AttributionGraph.Build(model, coders, tooLong) |> ignore)
                Expect.stringContains e.Message (string model.Config.NCtx) "names the context"
            finally dispose model coders
        }

        test "PathFinder: the paths, top features and de-embeddings of the core functions" {
            let model, coders, tokens = circuitSetup 12
            try
                use finder = new PathFinder(model, coders, tokens)
                use circuit = Transcoders.Circuits.CircuitModel.create model.Core (coreCoders coders)
                use run = Transcoders.Circuits.Prompt.run circuit tokens
                let last = tokens.Length - 1
                let token = (Transcoders.Models.NextToken.top 1 (run.LogitsAt last)) |> List.head |> fst
                let settings = PathSearchSettings(Depth = 2, Beam = 6, IgnoreBos = true)
                let paths = finder.FindToLogit(token, settings)
                let expected =
                    PathsCore.find run { PathSearchCore.Default with Depth = 2; Beam = 6; Candidates = Transcoders.Circuits.NodeFilter.ignoreBos }
                        (Transcoders.Circuits.FeatureVector.ofLogit run token last)
                Expect.equal [ for p in paths -> string p ] [ for p in expected.Paths -> p.Display ] "paths to the logit"
                Expect.equal [ for p in paths -> p.Attribution ] [ for p in expected.Paths -> p.Attribution ] "attributions"
                Expect.equal (finder.Find(sprintf "logit[%d]@%d" token last, settings) |> Seq.map string |> List.ofSeq) [ for p in paths -> string p ] "by name"
                let top = PathFinder.TopFeatures(paths, 3)
                let coreTop = PathsCore.topNodes 3 (Transcoders.Circuits.OfKind Transcoders.Circuits.FeatureComponent) expected.Paths
                Expect.equal [ for kv in top -> kv.Key, kv.Value ] [ for c, v in coreTop -> c.Display, v ] "top features"
                let toFeature = finder.FindToFeature(1, 0, last)
                Expect.equal (toFeature |> Seq.map string |> List.ofSeq)
                    [ for p in (PathsCore.find run PathSearchCore.Default (Transcoders.Circuits.FeatureVector.ofFeature run { Transcoders.Circuits.FeatureAt.Layer = 1; Position = last; Feature = 0 })).Paths -> p.Display ] "paths to a feature"
                Expect.equal (List.ofSeq (finder.FeatureDeembedding(0, 1))) (List.ofArray (Transcoders.Circuits.Attribution.featureDeembedding circuit 0 1)) "de-embedding"
                Expect.equal (List.ofSeq (finder.Activations(1, last))) (List.ofArray (run.ActivationsAt(1, last))) "activations"
                let e = raised "an embedding as root" (fun () -> finder.Find("embed@0") |> ignore)
                Expect.stringContains e.Message "embed@0" "names it"
                let e = raised "a malformed name" (fun () -> finder.Find("mlp0tc[x]") |> ignore)
                Expect.stringContains e.Message "mlp0tc[x]" "names it"
            finally dispose model coders
        }

        test "FeatureInterventions: constrained, free, the graph comparison and generation of the core functions" {
            let model, coders, tokens = circuitSetup 13
            try
                let graph = AttributionGraph.Build(model, coders, tokens, GraphOptions(MaxFeatureNodes = Nullable()))
                let node = graph.Features |> Seq.maxBy (fun f -> f.Activation)
                let iv = FeatureIntervention.Parse(node.Label, tokens.Length, InterventionAction.Set, 3.0 * node.Activation)
                Expect.equal (iv.Layer, iv.Feature, iv.Position) (node.Layer, node.Feature, node.Position) "parsed"
                Expect.equal (FeatureIntervention.Parse("mlp1tc[2]@last", tokens.Length).Position) (tokens.Length - 1) "@last"
                let core : Transcoders.Circuits.FeatureIntervention list =
                    [ { Layer = node.Layer; Feature = node.Feature; Position = Transcoders.Circuits.At node.Position
                        Action = Transcoders.Circuits.SetTo(3.0 * node.Activation) } ]
                use lr = LocalCore.create model.Core (coreCoders coders) tokens
                use ivs = new FeatureInterventions(model, coders, tokens)
                use clean = ivs.Clean()
                use coreClean = LocalCore.forward lr
                Expect.isTrue (identical clean coreClean) "clean"
                use constrained = ivs.Constrained([ iv ])
                use coreConstrained = InterventionsCore.constrained lr core
                Expect.isTrue (identical constrained coreConstrained) "constrained"
                use free = ivs.Free([ iv ])
                use coreFree = InterventionsCore.free model.Core (coreCoders coders) tokens core
                Expect.isTrue (identical free coreFree) "free"
                let effects = ivs.CompareWithGraph(graph, [ iv ])
                let coreEffects = InterventionsCore.compareWithGraph lr graph.Core core
                Expect.equal [ for e in effects -> e.Token, e.Predicted, e.Constrained, e.Free ] [ for e in coreEffects -> e.Token, e.Predicted, e.Constrained, e.Free ] "graph comparison"
                for e in effects do
                    Expect.floatClose { absolute = 1e-5; relative = 1e-3 } e.Predicted e.Constrained "the graph predicts the direct effect"
                let steer = FeatureIntervention(iv.Layer, iv.Feature, iv.Position, iv.Action, iv.Value, true)
                let g = FeatureInterventions.Generate(model, coders, tokens[.. 2], [ steer ], GenerationSettings.Greedy 3)
                let coreG =
                    InterventionsCore.generate model.Core (coreCoders coders) { Transcoders.Models.Generation.GenerateOptions.Greedy with MaxNewTokens = 3 } tokens[.. 2]
                        [ { core.Head with Position = Transcoders.Circuits.From node.Position } ]
                Expect.equal (List.ofArray g.Tokens) (List.ofArray coreG.Tokens) "generation"
                let e = raised "a layer without a transcoder" (fun () -> ivs.Free([ FeatureIntervention(5, 0, 0) ]) |> ignore)
                Expect.stringContains e.Message "5" "names the layer"
            finally dispose model coders
        }
    ]

let coderTests =
    testSequenced <| testList "SparseCoder kinds, CoderTrainer CLT, LanguageModelTrainer" [
        test "SparseCoder.Create makes every kind with every activation, as the core's CoderRun.coderConfig" {
            let activations =
                [ SparseCoderActivation.ReLU, "ReLU"; SparseCoderActivation.JumpReLU, "JumpReLU"; SparseCoderActivation.TopK, "TopK 4"
                  SparseCoderActivation.BatchTopK, "BatchTopK 4"; SparseCoderActivation.GroupMax, "GroupMax 4" ]
            let kinds =
                [ SparseCoderKind.Sae, CoderKindCore.Sae; SparseCoderKind.Transcoder, CoderKindCore.Transcoder
                  SparseCoderKind.SkipTranscoder, CoderKindCore.SkipTranscoder; SparseCoderKind.CrossLayerTranscoder, CoderKindCore.CrossLayerTranscoder ]
            use dir = new TempDir()
            for kind, coreKind in kinds do
                for activation, shown in activations do
                    let layers = if kind = SparseCoderKind.CrossLayerTranscoder then [| 0; 1; 3 |] else [| 2 |]
                    use coder = SparseCoder.Create(kind, "m", layers, 8, 16, activation, 4)
                    let expected = CoderRunCore.coderConfig coreKind "m" layers None 8 16 (CoderRunCore.activation (string activation) 4)
                    Expect.equal coder.ConfigJson (CoderConfigCore.toJson expected) (sprintf "%A %A: the core's config" kind activation)
                    Expect.equal (coder.Kind, coder.Activation, List.ofSeq coder.Layers) (kind, shown, List.ofArray layers) "described"
                    let path = dir.File(sprintf "%A-%A" kind activation)
                    coder.Save path
                    use loaded = SparseCoder.Load path
                    Expect.equal loaded.Kind kind "saves and loads"
                    let shape = if kind = SparseCoderKind.CrossLayerTranscoder then [| 5L; 3L; 8L |] else [| 5L; 8L |]
                    use x = torch.randn(shape)
                    use y = coder.Forward x
                    Expect.sequenceEqual y.shape shape "forward"
            use sae = SparseCoder.Create(SparseCoderKind.Sae, "m", [| 1 |], 8, 16, SparseCoderActivation.ReLU, hook = "blocks.1.hook_resid_post")
            Expect.equal (List.ofSeq sae.HookIn) [ "blocks.1.hook_resid_post" ] "an SAE on a given hook"
            let e = raised "k above the width" (fun () -> SparseCoder.Create(SparseCoderKind.Transcoder, "m", [| 0 |], 8, 16, SparseCoderActivation.TopK, 17) |> ignore)
            Expect.stringContains e.Message "TopK" "names the field"
            let e = raised "two layers for a transcoder" (fun () -> SparseCoder.Create(SparseCoderKind.Transcoder, "m", [| 0; 1 |], 8, 16) |> ignore)
            Expect.stringContains e.Message "one layer" "says so"
        }

        test "CoderTrainer trains a cross-layer transcoder on stories260K; a dotted model folder keeps its name" {
            use dir = new TempDir()
            let options =
                CoderTrainingOptions(
                    Kinds = ResizeArray [ "clt" ], Layers = ResizeArray [ 0; 1 ], Features = Nullable 64, K = Nullable 4,
                    Steps = 4, Batch = 128, Out = dir.File "clt", CheckpointEvery = 0, EvalRows = 256L, SplicedRows = 2)
            let r = CoderTrainer.Train(stories260K, options)
            Expect.equal [ for c in r.Coders -> c.Name ] [ "clt-L0-1" ] "one CLT over layers 0 and 1"
            Expect.isTrue (Double.IsFinite r.Coders[0].Fvu && Double.IsFinite r.Coders[0].CeRecovered) "evaluated"
            use clt = SparseCoder.Load r.Coders[0].Path
            Expect.equal (clt.Kind, List.ofSeq clt.Layers, clt.Activation) (SparseCoderKind.CrossLayerTranscoder, [ 0; 1 ], "TopK 4") "saved"
            Expect.stringContains r.MetricsMarkdown "| clt-L0-1 | cross_layer_transcoder | 0-1 | 64 | k=4 |" "the metrics table"
            // The model-name rule is the core's: a folder's name keeps its dots (the facade used to cut at the dot).
            use model = LanguageModel.Load stories260K
            model.Tokenizer <- TextTokenizer.Llama2c(Transcoders.Files.Paths.data "models/stories260K/tok512.bin", model.Config.VocabSize)
            let dotted = dir.File "stories.v2"
            model.Save dotted
            let small =
                CoderTrainingOptions(Layers = ResizeArray [ 1 ], Features = Nullable 64, K = Nullable 4, Steps = 2, Batch = 64,
                                     Out = dir.File "dotted", CheckpointEvery = 0, EvalRows = 0L, SplicedRows = 0)
            let r = CoderTrainer.Train(dotted, small)
            Expect.equal (CoderFileCore.loadConfig r.Coders[0].Path).Model "stories.v2" "the model's name in the coder's config"
        }

        test "LanguageModelTrainer trains train-lm's recipe: a model with its tokenizer, saved; TinyStoriesGpt's settings" {
            use dir = new TempDir()
            let stories = dir.File "stories.txt"
            let texts =
                Transcoders.Text.Corpus.readStories (Transcoders.Files.Paths.data "tinystories/ts_v2_valid_head_part2.txt.gz")
                |> Seq.truncate 200 |> Seq.map (fun s -> s.Text)
            File.WriteAllText(stories, String.Join("\n<|endoftext|>\n", texts))
            let options =
                LanguageModelTrainingOptions(
                    Files = ResizeArray [ stories ], VocabSize = 300, CorpusFolder = dir.File "corpus", Layers = 1, DModel = 16,
                    Heads = 2, Ctx = 16, Batch = 4, Steps = 5, Warmup = 1, EvalEvery = 0, CheckpointEvery = 0, Out = dir.File "lm")
            let r = LanguageModelTrainer.TrainTinyStories options
            use model = r.Model
            Expect.equal r.Steps 5 "steps"
            Expect.equal r.Losses.Count 5 "a loss per step"
            Expect.isTrue (Double.IsFinite r.ValidationLoss) "validation loss at the end"
            Expect.equal (model.Config.NLayers, model.Config.DModel, model.Config.NCtx) (1, 16, 16) "the shape asked for"
            Expect.equal model.Tokenizer.VocabSize model.Config.VocabSize "the tokenizer comes with the model"
            Expect.equal r.CorpusFolder (dir.File "corpus") "the shards where asked"
            Expect.isTrue (Directory.Exists(Path.Combine(r.CorpusFolder, "train"))) "train shards"
            use reloaded = LanguageModel.Load r.ModelDir
            use a = model.Logits([| 1; 2; 3 |])
            use b = reloaded.Logits([| 1; 2; 3 |])
            Expect.isTrue (identical a b) "the saved model is the trained one"
            let defaults = LanguageModelTrainingOptions()
            let d = Transcoders.Models.TinyStoriesGpt.Settings.Default
            Expect.equal (defaults.Layers, defaults.DModel, defaults.Steps, defaults.LearningRate, defaults.Out) (d.Layers, d.DModel, d.Steps, d.Lr, d.Out) "train-lm's defaults"
            let e = raised "an output folder that holds checkpoints" (fun () ->
                LanguageModelTrainer.TrainTinyStories(LanguageModelTrainingOptions(
                    Files = ResizeArray [ stories ], VocabSize = 300, CorpusFolder = dir.File "corpus", Layers = 1, DModel = 16, Heads = 2,
                    Ctx = 16, Batch = 4, Steps = 5, Out = dir.File "lm")).Model.Dispose())
            Expect.stringContains e.Message "checkpoints" "refused without Resume"
        }
    ]

let tests = testList "C# facade: circuits and training" [ graphTests; coderTests ]
