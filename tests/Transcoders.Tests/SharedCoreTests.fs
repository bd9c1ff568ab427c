/// The core functions the command line and the C# facade share (they used to live in the CLI, some twice): model
/// names, prompts, next-token probabilities, coder folders, activation and kind names, run settings, feature names,
/// path-search roots; and a cross-layer transcoder trained by a plan on stories260K's activations.
module Transcoders.Tests.SharedCoreTests

open System
open System.IO
open Expecto
open TorchSharp
open Transcoders.Circuits
open Transcoders.Coders
open Transcoders.Files
open Transcoders.Models
open Transcoders.Text
open Transcoders.Tests.Fixtures

/// The exception `f` raises (a test failure when it raises none).
let private raised (what: string) (f: unit -> unit) : exn =
    try
        f ()
        failtestf "%s: expected an exception" what
    with
    | :? AssertException -> reraise ()
    | e -> e

let modelTests =
    testList "models" [
        test "ModelName: a file's name without extension, a folder's name as it is (dots kept)" {
            use dir = new TempDir()
            Expect.equal (ModelName.ofPath stories260K) "stories260K" "a llama2.c file"
            let dotted = Path.Combine(dir.Path, "model.v2")
            Directory.CreateDirectory dotted |> ignore
            Expect.equal (ModelName.ofPath dotted) "model.v2" "a folder with a dot"
            Expect.equal (ModelName.ofPath (dotted + string Path.DirectorySeparatorChar)) "model.v2" "a trailing separator"
        }

        test "PromptTokens: BOS first, a [1, p] tensor, single tokens, display strings, clear errors" {
            let model, tokenizer, tokens = PromptTokens.load stories260K "Once upon a time" cpu
            use _m = model
            Expect.equal tokens (Tokenizer.encodeDocument tokenizer true false "Once upon a time") "encodeDocument with BOS"
            Expect.equal tokens[0] (Tokenizer.bos tokenizer).Value "BOS first"
            use t = PromptTokens.tensor tokens cpu
            Expect.sequenceEqual t.shape [| 1L; int64 tokens.Length |] "[1, p]"
            Expect.equal (t.data<int64>().ToArray() |> Array.map int) tokens "the ids"
            let text = [ " the"; "the"; " a"; "a"; "." ] |> List.find (fun t -> (Tokenizer.encode tokenizer t).Length = 1)
            let one = Tokenizer.encode tokenizer text
            Expect.equal (PromptTokens.single tokenizer text) one[0] "single token"
            let e = raised "several tokens" (fun () -> PromptTokens.single tokenizer " time upon a" |> ignore)
            Expect.stringContains e.Message "tokens" "says it is several tokens"
            Expect.equal (PromptTokens.display tokenizer one[0]) (sprintf "%A (%d)" (Tokenizer.decode tokenizer one) one[0]) "quoted text and id"
            Expect.equal (PromptTokens.encode tokenizer "") [| (Tokenizer.bos tokenizer).Value |] "an empty prompt is BOS alone"
        }

        test "NextToken: the softmax of the last position, and the most likely tokens in order" {
            use logits = torch.tensor([| 0.0f; 1.0f; 2.0f; 5.0f; 1.0f; 0.5f |]).reshape(1L, 2L, 3L)
            let p = NextToken.probabilities logits
            let e = [| exp 5.0; exp 1.0; exp 0.5 |]
            let z = Array.sum e
            Expect.isLessThan (maxAbsDiff p (e |> Array.map (fun v -> v / z))) 1e-12 "softmax of the last row in float64"
            Expect.equal (NextToken.top 2 p |> List.map fst) [ 0; 1 ] "most likely first"
            Expect.equal (NextToken.top 10 p).Length 3 "at most the vocabulary"
        }
    ]

let coderTests =
    testList "coders" [
        test "CoderFolders: coder folders or folders of them, sorted; clear errors; names" {
            use dir = new TempDir()
            let save (name: string) (layer: int) =
                use c = Coder.create (CoderConfig.transcoder "m" layer 8 16) cpu
                CoderFile.save (Path.Combine(dir.Path, "coders", name)) c
            save "b-L2" 2
            save "a-L1" 1
            File.WriteAllText(Path.Combine(dir.Path, "coders", "notes.txt"), "not a coder")
            Directory.CreateDirectory(Path.Combine(dir.Path, "coders", "empty")) |> ignore
            let root = Path.Combine(dir.Path, "coders")
            Expect.equal (CoderFolders.find [ root ] |> List.map Path.GetFileName) [ "a-L1"; "b-L2" ] "sub-folders holding coder.json, sorted"
            Expect.equal (CoderFolders.find [ Path.Combine(root, "b-L2") ]) [ Path.Combine(root, "b-L2") ] "a coder folder as it is"
            let loaded = CoderFolders.load [ Path.Combine(root, "b-L2"); Path.Combine(root, "a-L1") ] cpu
            Expect.equal [ for c in loaded -> c.Config.Layers[0] ] [ 1; 2 ] "ordered by layer"
            for c in loaded do (c :> IDisposable).Dispose()
            let e = raised "an empty folder" (fun () -> CoderFolders.find [ Path.Combine(root, "empty") ] |> ignore)
            Expect.stringContains e.Message "holds no coder" "says so"
            let e = raised "a missing path" (fun () -> CoderFolders.find [ Path.Combine(root, "nothing") ] |> ignore)
            Expect.stringContains e.Message "nothing" "names it"
            Expect.equal (CoderFolders.name (Path.Combine(root, "a-L1"))) "a-L1" "a folder's name"
            Expect.equal (CoderFolders.name (Path.Combine(root, "x.safetensors"))) "x" "a file's name without extension"
        }

        test "CoderRun: activation names, kind names (clt too), settings from plain values, the default folder" {
            Expect.equal (CoderRun.activation "TopK" 5) (TopK 5) "topk"
            Expect.equal (CoderRun.activation "batchtopk" 5) (BatchTopK 5.0) "batchtopk"
            Expect.equal (CoderRun.activation "groupmax" 4) (GroupMax 4) "groupmax"
            Expect.equal (CoderRun.activation " relu " 5) ReLU "relu"
            Expect.equal (CoderRun.activation "jumprelu" 5) (JumpReLU JumpReLUSpec.Default) "jumprelu"
            Expect.equal (CoderRun.activationFor "topk" None 64) (TopK 16) "k defaults to d_model / 4"
            let e = raised "an unknown activation" (fun () -> CoderRun.activation "gelu" 1 |> ignore)
            Expect.stringContains e.Message "gelu" "names it"
            let plan = CoderRun.withKinds [ "transcoder"; "clt"; "sae:hook_resid_post" ] CoderPlan.Default
            Expect.equal plan.Kinds [ MlpTranscoder; SaeOn "hook_resid_post" ] "per-layer kinds"
            Expect.isTrue plan.CrossLayer "clt asks for a cross-layer transcoder"
            Expect.equal (CoderRun.kindNames plan) [ "transcoder"; "sae:hook_resid_post"; "clt" ] "names back"
            Expect.equal (CoderRun.defaultOut "m.v2" plan) (Path.Combine("coders", "m.v2-transcoder-sae-hook_resid_post-clt")) "default folder"
            let s = CoderRun.settingsOf [ "clt" ] [ 0; 1 ] (Some 32) "groupmax" (Some 4) 2.0 7 64 3L None "out" None (Some 16) 0 false 100L 2 64
            Expect.equal s.Plan { CoderPlan.Default with
                                    Kinds = []; CrossLayer = true; Layers = [ 0; 1 ]; Width = Some 32; Activation = Some(GroupMax 4)
                                    Lambda = 2.0; Steps = 7; Batch = 64; Seed = 3L } "the plan"
            Expect.equal (s.Out, s.Ctx, s.CheckpointEvery, s.Resume, s.EvalRows, s.SplicedRows) (Some "out", Some 16, 0, false, 100L, 2) "the run"
        }

        test "CoderRun.coderConfig: every kind with every activation; a cross-layer transcoder's decoder norms follow its activation" {
            let activations = [ ReLU; JumpReLU JumpReLUSpec.Default; TopK 4; BatchTopK 4.0; GroupMax 4 ]
            for kind in [ Sae; Transcoder; SkipTranscoder; CrossLayerTranscoder ] do
                for a in activations do
                    let layers = if kind = CrossLayerTranscoder then [| 0; 2 |] else [| 1 |]
                    let c = CoderRun.coderConfig kind "m" layers None 8 16 a
                    Expect.equal (c.Kind, c.Activation, c.Layers, c.DSae) (kind, a, layers, 16) (sprintf "%A %A" kind a)
                    if kind = Sae then Expect.equal c.HookIn [| "blocks.1.hook_mlp_out" |] "an SAE on the MLP output by default"
                    if kind = CrossLayerTranscoder then
                        Expect.equal c.Decoder (match a with JumpReLU _ -> Free | _ -> UnitNorm) "decoder norms"
                    use coder = Coder.create c cpu
                    Expect.equal coder.Config.Kind kind "creates"
            let e = raised "two layers for a transcoder" (fun () -> CoderRun.coderConfig Transcoder "m" [| 0; 1 |] None 8 16 ReLU |> ignore)
            Expect.stringContains e.Message "one layer" "says so"
            let c = CoderRun.coderConfig Sae "m" [| 0 |] (Some "blocks.0.hook_resid_pre") 8 16 ReLU
            Expect.equal c.HookIn [| "blocks.0.hook_resid_pre" |] "an SAE on a given hook"
        }

        test "CoderPlan.jobs: per-layer jobs, then one cross-layer transcoder over the layers" {
            use m = Llama2c.load stories260K cpu
            let plan = { CoderPlan.Default with Layers = [ 2; 0 ]; Width = Some 32; Activation = Some(TopK 4); CrossLayer = true }
            let jobs = CoderPlan.jobs m "stories260K" plan
            Expect.equal [ for j in jobs -> j.Name ] [ "transcoder-L2"; "transcoder-L0"; "clt-L0-2" ] "names"
            let clt = List.last jobs
            Expect.equal (clt.Coder.Kind, clt.Coder.Layers, clt.Coder.DSae, clt.Coder.Activation) (CrossLayerTranscoder, [| 0; 2 |], 32, TopK 4) "the CLT"
            Expect.equal clt.Coder.HookIn [| "blocks.0.ln2.hook_normalized"; "blocks.2.ln2.hook_normalized" |] "reads each layer's MLP input"
            Expect.equal clt.Train.Seed plan.Seed "seeded as the plan"
            let only = CoderPlan.jobs m "stories260K" { plan with Kinds = [] }
            Expect.equal [ for j in only -> j.Name ] [ "clt-L0-2" ] "a CLT alone"
            let e = raised "no kind" (fun () -> CoderPlan.jobs m "stories260K" { plan with Kinds = []; CrossLayer = false } |> ignore)
            Expect.stringContains e.Message "no coder kind" "says so"
            let e = raised "a layer the model lacks" (fun () -> CoderPlan.jobs m "stories260K" { plan with Kinds = []; Layers = [ 0; 9 ] } |> ignore)
            Expect.stringContains e.Message "layer 9" "names it"
        }

        test "a cross-layer transcoder trained by a plan on stories260K's activations: the loss falls; saved, it loads" {
            use dir = new TempDir()
            use model = Llama2c.load stories260K cpu
            model.eval ()
            let tokenizer = ModelTokenizer.find stories260K
            let stories =
                Corpus.readStories (Path.Combine(Paths.data "tinystories", "ts_v2_valid_head_part2.txt.gz"))
                |> Seq.truncate 120 |> Array.ofSeq
                |> Array.map (fun s -> Tokenizer.encodeDocument tokenizer true false s.Text)
            let text =
                { Name = "CLT test stories"; Train = Array.concat stories[.. 99]; Validation = Array.concat stories[100 ..]
                  Bos = Tokenizer.bos tokenizer; VocabSize = Tokenizer.vocabSize tokenizer }
            let settings =
                { CoderRunSettings.Default with
                    Plan = { CoderPlan.Default with Kinds = []; CrossLayer = true; Layers = [ 0; 1; 2 ]; Width = Some 128
                                                    Activation = Some(TopK 8); Steps = 60; Batch = 128; Seed = 5L }
                    Out = Some dir.Path; Ctx = Some 64; BufferRows = Some 2048L; CheckpointEvery = 0; Resume = false
                    EvalRows = 512L; SplicedRows = 4 }
            let losses = Collections.Generic.List<float>()
            let progress = function
                | Trained(_, _, _, logs) -> for _, l in logs do losses.Add l.Loss
                | _ -> ()
            let result = CoderRun.trainOn model "stories260K" text settings cpu progress
            Expect.equal [ for c in result.Coders -> c.Name ] [ "clt-L0-1-2" ] "one CLT"
            Expect.isGreaterThan losses.Count 4 "logged steps"
            let k = losses.Count / 4
            let first = Seq.take k losses |> Seq.average
            let last = Seq.skip (losses.Count - k) losses |> Seq.average
            Expect.isLessThan last (0.8 * first) (sprintf "the loss falls (first quarter %.4f, last quarter %.4f)" first last)
            let r = result.Coders.Head
            Expect.isLessThan r.Metrics.Value.Fvu 1.0 "held-out FVU below 1"
            Expect.isTrue (Double.IsFinite r.Spliced.Value.CeSpliced) "spliced CE evaluated"
            use loaded = CoderFile.load r.Path cpu
            Expect.equal (loaded.Config.Kind, loaded.Config.Layers, loaded.Config.DSae, loaded.Config.Activation)
                (CrossLayerTranscoder, [| 0; 1; 2 |], 128, TopK 8) "the saved config"
            use run = Transformer.runWithCache model (List.ofArray loaded.Config.HookIn) (torch.tensor(Array.map int64 stories[100]).unsqueeze 0L)
            use x = torch.stack([ for h in loaded.Config.HookIn -> run[h] ], 2L)
            use a = loaded.Encode x
            Expect.equal (int64 (a.count_nonzero([| -1L |]).max().item<int64> ())) 8L "TopK 8 per layer on real activations"
            CoderFile.save (Path.Combine(dir.Path, "again")) loaded
            use again = CoderFile.load (Path.Combine(dir.Path, "again")) cpu
            for (n, p), (_, q) in Seq.zip loaded.NamedParameters again.NamedParameters do
                Expect.isTrue (identical p q) (sprintf "%s survives a second save" n)
        }
    ]

let circuitTests =
    testList "circuits" [
        test "Interventions.parseFeature: the paper's names, @last, clear errors" {
            Expect.equal (Interventions.parseFeature 7 "mlp2tc[17]@5") { FeatureAt.Layer = 2; Position = 5; Feature = 17 } "a position"
            Expect.equal (Interventions.parseFeature 7 " mlp0tc[3]@last ") { FeatureAt.Layer = 0; Position = 6; Feature = 3 } "the last position"
            let e = raised "an attention head" (fun () -> Interventions.parseFeature 7 "attn1[0]@2" |> ignore)
            Expect.stringContains e.Message "not a transcoder feature" "says so"
        }

        test "Tracing: settings from their defaults, token strings, path roots from names" {
            let g = Tracing.graphConfig 3 0.5 (Some [| 4 |]) 8 None 2 false (Some 10L) ignore
            Expect.equal (g.MaxLogits, g.DesiredLogitProbability, g.LogitTokens, g.BatchSize, g.MaxFeatureNodes, g.UpdateInterval, g.CausalCone, g.MemoryBudgetBytes)
                (3, 0.5, Some [| 4 |], 8, None, 2, false, Some 10L) "graph config"
            let p = Tracing.pruneConfig 0.5 0.9 cpu
            Expect.equal (p.NodeThreshold, p.EdgeThreshold) (0.5, 0.9) "prune config"
            let s = Tracing.pathSearch 2 3 4 5 true true true
            Expect.equal s { PathSearchOptions.Default with Depth = 2; PerLayer = 3; Branches = 4; Beam = 5; Ranking = Magnitude; IncludeErrors = true; Candidates = NodeFilter.ignoreBos } "path search"
            use model = randomModel 3 { randomConfig 3 GptLike with NLayers = 2; Dropout = 0.0 }
            let coders = [ for l in 0 .. 1 -> randomCoder (40 + l) (coderConfig (Random l) model.Config Transcoder [| l |]) ]
            try
                let tokens = [| 1; 2; 3; 1 |] |> Array.map (fun t -> t % model.Config.VocabSize)
                use circuit = CircuitModel.create model coders
                use run = Prompt.run circuit tokens
                let f = Tracing.root run (Component.parse "logit[2]@3")
                Expect.equal f.Component (TokenLogit(2, 3)) "a logit root"
                let f = Tracing.root run (TranscoderFeature { FeatureAt.Layer = 1; Position = 2; Feature = 0 })
                Expect.equal f.Component (TranscoderFeature { FeatureAt.Layer = 1; Position = 2; Feature = 0 }) "a feature root"
                let e = raised "an embedding" (fun () -> Tracing.root run (Component.Embedding 0) |> ignore)
                Expect.stringContains e.Message "embed@0" "names it"
                let tok = Tokenizer.gpt2 ()
                let graph = AttributionGraph.build model coders tokens { GraphConfig.Default with MaxFeatureNodes = Some 5 }
                let labelled = Tracing.withTokenStrings tok graph
                Expect.equal labelled.TokenStrings (tokens |> Array.map (fun t -> Tokenizer.decode tok [| t |])) "token strings"
            finally
                for c in coders do (c :> IDisposable).Dispose()
        }
    ]

let tests = testList "Shared core (CLI and C#)" [ modelTests; coderTests; circuitTests ]
