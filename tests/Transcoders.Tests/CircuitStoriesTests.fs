/// The kinds of result of the transcoder paper and TinyTranscoder on a real model (llama2.c's stories260K, one of the
/// default models) with transcoders trained here on TinyStories: turning a feature on changes the next token to the
/// one its decoder promotes; a later-layer feature traces back to earlier features and heads; the attribution graph
/// reproduces the model and its pruned core explains most of the influence.
module Transcoders.Tests.CircuitStoriesTests

open System
open System.IO
open Expecto
open TorchSharp
open Transcoders.Activations
open Transcoders.Circuits
open Transcoders.Coders
open Transcoders.Files
open Transcoders.Models
open Transcoders.Text
open Transcoders.Tests.Fixtures

let private modelPath = Paths.data "models/stories260K/stories260K.bin"

/// stories260K and a TopK transcoder on each of its five MLPs, trained briefly on shipped TinyStories text
/// (the coders are saved and loaded back, as a user gets them).
let private setup =
    lazy
        (let model, _ = ModelFiles.load modelPath torch.CPU
         model.eval ()
         let tokenizer = ModelTokenizer.find modelPath
         let stories =
             Corpus.readStories (Path.Combine(Paths.data "tinystories", "ts_v2_valid_head_part2.txt.gz"))
             |> Seq.truncate 300 |> Array.ofSeq
             |> Array.map (fun s -> Tokenizer.encodeDocument tokenizer true false s.Text)
         let text =
             { Name = "circuit test stories"; Train = Array.concat stories[.. 259]; Validation = Array.concat stories[260 ..]
               Bos = Tokenizer.bos tokenizer; VocabSize = Tokenizer.vocabSize tokenizer }
         let plan = { CoderPlan.Default with Width = Some 256; Activation = Some(TopK 8); Steps = 150; Batch = 256; Seed = 1L }
         let jobs = CoderPlan.jobs model "stories260K" plan
         let dir = Path.Combine(Path.GetTempPath(), sprintf "transcoders-circuit-tests-%d" Environment.ProcessId)
         let config =
             { JobsConfig.Default dir with
                 Store = CoderPlan.store model (Some 64) plan.Batch (Some 4096L) plan.Seed torch.CPU
                 CheckpointEvery = 0
                 Resume = false
                 Eval = { JobEval.Default with ActivationRows = 0L; SplicedRows = 0 } }
         let result = CoderJobs.run model text jobs config ignore
         let coders = [ for c in result.Coders -> CoderFile.load c.Path torch.CPU ]
         try Directory.Delete(dir, true) with _ -> ()
         model, tokenizer, coders)

/// Token ids [1, p] as one tensor.
module private PromptTokens =
    let prompt (tokens: int[]) =
        let ids : int64[] = tokens |> Array.map int64
        torch.tensor(dataArray = ids, dimensions = ReadOnlySpan<int64>([| 1L; int64 ids.Length |]))

let private prompt = "Once upon a time, there was a little girl named Lily. She loved to play with her"

let private argmaxLast (logits: torch.Tensor) =
    use row = logits.reshape(-1L, logits.shape[logits.shape.Length - 1]).select(0, -1L)
    int (row.argmax().item<int64> ())

let tests =
    testSequenced <| testList "Circuits on stories260K" [
        test "turning a last-layer feature on makes the next token the one its decoder promotes (free and constrained)" {
            let model, tokenizer, coders = setup.Force()
            let tokens = Tokenizer.encodeDocument tokenizer true false prompt
            let last = tokens.Length - 1
            let top = coders |> List.last
            let layer = top.Config.Layers[0]
            Expect.equal layer (model.Config.NLayers - 1) "the last coder is on the last MLP"
            // What a unit of feature f adds to the logits, from the raw weights alone: the final RMSNorm is a
            // positive per-token scale times its weight, so argmax_t ((W_dec[f] ⊙ w_norm) · W_U[t]) is the token a
            // very large activation makes most likely.
            let ps = Transformer.parameters model |> dict
            let wNorm = ps["ln_final.weight"] :> torch.Tensor
            let wU = (if model.Config.TiedUnembed then ps["embed.weight"] else ps["unembed.weight"]) :> torch.Tensor
            let promoted (f: int) =
                use _ = torch.no_grad ()
                use dec = top.WDec[0].select(0, int64 f).select(0, 0L)
                use eff = dec.mul(wNorm).matmul(wU.t())
                int (eff.argmax().item<int64> ())
            use clean = (use _ = torch.no_grad () in use t = PromptTokens.prompt tokens in Transformer.forward model t)
            let cleanTop = argmaxLast clean
            use lr = LocalReplacement.create model coders tokens
            let active =
                use t = PromptTokens.prompt tokens
                use a = FeatureAccess.features model coders (sprintf "M%d" layer) t
                use row = a.select(0, 0L).select(0, int64 last)
                row.data<float32>().ToArray() |> Array.mapi (fun i v -> i, v) |> Array.sortByDescending snd |> Array.truncate 4 |> Array.map fst
            let mutable changed = 0
            for f in active do
                let iv = [ { Layer = layer; Feature = f; Position = At last; Action = SetTo 1e4 } ]
                use free = Interventions.free model coders tokens iv
                use constrained = Interventions.constrained lr iv
                let expected = promoted f
                Expect.equal (argmaxLast free) expected (sprintf "free: mlp%dtc[%d] at 10⁴ makes %A the top token" layer f (Tokenizer.decode tokenizer [| expected |]))
                Expect.equal (argmaxLast constrained) expected (sprintf "constrained: mlp%dtc[%d]" layer f)
                if expected <> cleanTop then changed <- changed + 1
            Expect.isGreaterThan changed 0 "at least one feature changes the model's top next token"
        }

        test "a later-layer feature traces back to earlier transcoder features and attention heads" {
            let model, tokenizer, coders = setup.Force()
            let tokens = Tokenizer.encodeDocument tokenizer true false prompt
            let last = tokens.Length - 1
            use circuit = CircuitModel.create model coders
            use run = Prompt.run circuit tokens
            let layer = model.Config.NLayers - 1
            let acts = run.ActivationsAt(layer, last)
            let f = acts |> Array.mapi (fun i a -> i, a) |> Array.maxBy snd |> fst
            Expect.isGreaterThan acts[f] 0.0 "an active feature at the last position"
            let root = FeatureVector.ofFeature run { FeatureAt.Layer = layer; Position = last; Feature = f }
            let terms = Attribution.direct run root
            let found = PathSearch.find run { PathSearchOptions.Default with Candidates = NodeFilter.ignoreBos } root
            Expect.isNonEmpty found.Paths "paths found"
            let nodes = found.Paths |> List.collect (fun p -> p.Nodes |> List.tail |> List.map (fun n -> n.Component))
            Expect.exists nodes (function TranscoderFeature { Layer = l } -> l < layer | _ -> false) "an earlier-layer feature on the paths"
            Expect.exists nodes (function AttentionHead(l, _, s) -> l <= layer && s <= last | _ -> false) "an attention head on the paths"
            let best = found.Paths.Head
            Expect.isTrue (found.Paths |> List.forall (fun p -> p.Attribution <= best.Attribution + 1e-12)) "best path first"
            ignore terms
        }

        test "the attribution graph reproduces the model; pruning keeps most influence; the graph file round-trips" {
            let model, tokenizer, coders = setup.Force()
            let tokens = Tokenizer.encodeDocument tokenizer true false prompt
            use lr = LocalReplacement.create model coders tokens
            use replayed = LocalReplacement.forward lr
            use clean = (use _ = torch.no_grad () in use t = PromptTokens.prompt tokens in Transformer.forward model t)
            use cleanRows = clean.select(0, 0L)
            Expect.isTrue (torch.allclose(replayed.to_type(torch.float32), cleanRows, 1e-4, 1e-4)) "the local replacement model gives the original logits"
            let graph = AttributionGraph.build model coders tokens GraphConfig.Default
            Expect.equal graph.Logits[0].Token (argmaxLast clean) "the first logit node is the model's prediction"
            let pruned = Pruning.prune PruneConfig.Default graph
            let scores = Pruning.scores graph torch.CPU
            Expect.isTrue (scores.Replacement > 0.0 && scores.Replacement <= 1.0) (sprintf "replacement score in (0, 1]: %g" scores.Replacement)
            Expect.isTrue (scores.Completeness > 0.0 && scores.Completeness <= 1.0) (sprintf "completeness score in (0, 1]: %g" scores.Completeness)
            Expect.isLessThan pruned.KeptNodes.Length graph.NodeCount "pruning drops nodes"
            use dir = new TempDir()
            let file = dir.File "graph.safetensors"
            GraphFile.saveWith file { Scores = Some scores; Description = Map.ofList [ ("prompt", prompt) ] } graph
            let loaded, info = GraphFile.loadWith file
            Expect.equal loaded.Tokens graph.Tokens "tokens"
            Expect.equal loaded.Features graph.Features "feature nodes"
            Expect.equal (Graph.edges loaded |> Seq.length) (Graph.edges graph |> Seq.length) "edges"
            Expect.equal info.Scores (Some scores) "scores"
        }
    ]
