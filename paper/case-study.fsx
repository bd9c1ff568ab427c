#load "common.fsx"
// A circuit case study in the transcoder paper's manner (§4, the walkthrough's mlp8tc[89]), then a prediction
// explained by an attribution graph:
//   1. a transcoder feature chosen by a rule (the live feature whose top examples are most dominated by one token),
//      its top examples and de-embedding; its computational paths on its top example (Algorithm 1), merged into a
//      graph (Algorithm 2); each strongest direct contributor ablated in the real model (error terms kept), the
//      measured change of the feature against the path attribution's prediction;
//   2. the attribution graph of a prompt's next-token prediction (per-layer transcoders), pruned and scored, its
//      strongest supernodes (a feature's nodes merged over positions) listed with their top examples, de-embeddings
//      and logit effects, and the strongest one ablated: the graph's predicted logit change against the measured.
//
//   dotnet build src/Transcoders -c Release
//   dotnet fsi paper/case-study.fsx [MODEL] [CODERS] [options]
//
//   --layer L        the feature's layer (default ⌊2·n_layers/3⌋, the paper's layer 8 of 12)
//   --feature N      study this feature instead of the rule's choice
//   --stories N      held-out stories scanned for top examples (default 400)   --ctx N   tokens per story (default 128)
//   --min-count N    a feature must fire at least this often to be chosen (default 20)
//   --depth N, --branches N, --beam N   the path search (default 3, 5, 15)
//   --prompt TEXT    the second study's prompt (default "Once upon a time, there was a little girl named Lily. She")
//   --greater-than N GPT-2-vocabulary models: the second study on the greater-than task (N prompts for the
//                    probability difference, the first one graphed)
//   --supernodes N   supernodes listed (default 8)
//   --out DIR, --device cpu|cuda|auto, --threads N

open System
open System.Diagnostics
open System.Text
open TorchSharp
open Transcoders.Circuits
open Transcoders.Coders
open Transcoders.Models
open Transcoders.Text
open Transcoders.Views
open Common

let run = setup "case-study" fsi.CommandLineArgs
let args, sw, device, model, tokenizer, modelPath = run.Args, run.Clock, run.Device, run.Model, run.Tokenizer, run.ModelPath
let c = model.Config
let transcoders = transcodersOf (run.Coders())
if transcoders.IsEmpty then failwithf "no per-layer transcoders in %s" (codersPath args)
let layers = transcoders |> List.map (fun x -> x.Config.Layers[0])
let layer = args.Int("layer", (layers |> List.filter (fun l -> l <= 2 * c.NLayers / 3) |> List.tryLast |> Option.defaultValue layers.Head))
let coder = transcoders |> List.tryFind (fun x -> x.Config.Layers[0] = layer) |> Option.defaultWith (fun () -> failwithf "no transcoder at layer %d" layer)
let out = StringBuilder()
let say (s: string) = out.AppendLine s |> ignore; printfn "%s" s
let tok = tokenText tokenizer

// ---- the feature: top examples over held-out stories, chosen by a rule ----
let stories = validationStories tokenizer (args.Int("ctx", min 128 c.NCtx)) 8 (args.Int("stories", 400))
let dashOptions =
    { DashboardOptions.Default with
        Stats = { FeatureStatsOptions.Default with TopExamples = 20; SampleSize = 0; Before = 10; After = 3 }
        Context = args.Int("ctx", min 128 c.NCtx); Heads = 0; TopTokens = 8 }
let dashboards =
    transcoders |> List.map (fun x -> x.Config.Layers[0], FeatureDashboard.compute model tokenizer (sprintf "transcoder-L%d" x.Config.Layers[0]) x stories dashOptions) |> Map.ofList
let summaries = dashboards[layer].Layers[0].Summaries
let minCount = int64 (args.Int("min-count", 20))
let feature, rule =
    match args.TryGet "feature" with
    | Some f -> int f, "given with --feature"
    | None ->
        let live = summaries |> Array.filter (fun s -> s.Count >= minCount && float s.Count < 0.05 * float s.Tokens)
        if live.Length = 0 then failwithf "no feature of layer %d fires %d times (or more, and on under 5%% of tokens) in %d stories: give --stories or --min-count" layer minCount stories.Length
        let best = live |> Array.maxBy (fun s -> let p, _ = tokenPurity s.Top in p, s.Max)
        best.Feature, sprintf "the feature of layer %d (among %d firing at least %d times on under 5%% of %d tokens) whose top %d examples are most dominated by one token (ties: the highest activation)"
                           layer live.Length minCount summaries[0].Tokens dashOptions.Stats.TopExamples
let s = summaries[feature]
let circuit = CircuitModel.create model transcoders
let name = sprintf "mlp%dtc[%d]" layer feature
let purity, commonToken = tokenPurity s.Top
say (sprintf "## 1. The feature %s\n" name)
say (sprintf "Chosen as %s. It fires on %d of %d held-out tokens (%.3f%%), max activation %.2f; %.0f%% of its top examples activate on %s.\n"
        rule s.Count s.Tokens (100.0 * float s.Count / float s.Tokens) s.Max (100.0 * purity) (if commonToken >= 0 then tok commonToken else "–"))
say "Top examples (activating token in [[ ]]):\n"
say (table [ "activation"; "context" ] [ for e in s.Top |> Array.truncate 10 -> [ f3 (float e.Activation); exampleText tokenizer e.Tokens e.Center ] ])
let deemb = Attribution.featureDeembedding circuit layer feature
say "De-embedding (tokens whose embedding drives the feature directly, W_E·f_enc; ignores attention and earlier MLPs):\n"
say (table [ "top tokens"; "score"; "bottom tokens"; "score" ]
        (List.zip (Attribution.top 8 false deemb) (Attribution.top 8 false (deemb |> Array.map (fun v -> -v)))
         |> List.map (fun ((t, v), (b, w)) -> [ tok t; f3 v; tok b; f3 (-w) ])))

// ---- its computational paths on its top example ----
if s.Top.Length = 0 then failwithf "%s never fires on the %d held-out paragraphs scanned: choose another --feature or scan more --stories" name stories.Length
let top = s.Top[0]
let prompt = stories[top.Sequence][.. top.Position]
let position = prompt.Length - 1
let run = Prompt.run circuit prompt
let search =
    let o = PathSearchOptions.Default
    PathSearch.find run { o with Depth = args.Int("depth", o.Depth); Branches = args.Int("branches", o.Branches); Beam = args.Int("beam", o.Beam); Candidates = NodeFilter.ignoreBos }
        (FeatureVector.ofFeature run { Layer = layer; Position = position; Feature = feature })
say (sprintf "### Computational paths (Algorithm 1)\n\nOn its top example (%d tokens, the feature at the last position: activation %.3f), the greedy search (depth %d, %d branches, beam %d, excitatory paths, BOS ignored) finds:\n"
        prompt.Length (FeatureVector.activation run { Layer = layer; Position = position; Feature = feature }) (args.Int("depth", 3)) (args.Int("branches", 5)) (args.Int("beam", 15)))
say (table [ "attribution"; "path" ] [ for p in search.Paths |> List.truncate 12 -> [ f3 p.Attribution; p.Display ] ])
let pathGraph = PathGraph.ofPaths run (search.Paths |> List.truncate 12)
say "### The paths merged into a graph (Algorithm 2)\n"
say (table [ "node"; "contribution"; "transcoder error"; "bias error"; "prune error" ]
        [ for n in pathGraph.Nodes ->
            let e = n.Errors
            [ n.Component.Display; f3 n.Contribution
              (match e with Some e -> f3 e.TranscoderError | None -> "")
              (match e with Some e -> f3 e.BiasError | None -> "")
              (match e with Some e -> f3 e.PruneError | None -> "") ] ])
say (table [ "edge"; "attribution" ] [ for e in pathGraph.Edges |> List.truncate 15 -> [ sprintf "%s → %s" e.Source.Display e.Target.Display; f3 e.Attribution ] ])

// ---- the paths checked by intervention ----
// A direct contributor's path attribution is its linear effect on the feature's pre-activation; zero-ablating it in
// the real model (coders spliced with error terms, so nothing else changes) measures the effect with every indirect
// route and nonlinearity included.
let rm = ReplacementModel.create model transcoders Splicing.WithErrorTerms
let site = Splicing.featureHookName coder 0
let featureAfter (ivs: FeatureIntervention list) =
    use _ = torch.no_grad ()
    use scope = torch.NewDisposeScope()
    let t = PromptTokens.tensor prompt device
    let r = ReplacementModel.run rm { RunOptions.Default with Hooks = Interventions.featureHooks transcoders ivs; Cache = set [ site ] } t
    let v = r.Cache[site].[0L, int64 position, int64 feature].to_type(torch.float64).item<float> ()
    for x in r.Cache.Values do x.Dispose()
    v
let baseline = featureAfter []
let direct =
    search.Paths
    |> List.filter (fun p -> p.Nodes.Length = 2)
    |> List.choose (fun p -> match p.Last.Component with TranscoderFeature at -> Some(at.Layer, at.Feature, at.Position, p.Attribution) | _ -> None)
    |> List.truncate 6
let checks =
    [ for l, f, q, attribution in direct ->
        let after = featureAfter [ { Layer = l; Feature = f; Position = At q; Action = Ablate } ]
        sprintf "mlp%dtc[%d]@%d" l f q, -attribution, after - baseline ]
say (sprintf "### The paths checked by intervention\n\nThe feature's activation is %.3f in the model with error terms. Each direct transcoder contributor zero-ablated:\n" baseline)
say (table [ "ablated"; "predicted change (−path attribution)"; "measured change"; "measured / predicted" ]
        [ for n, p, m in checks -> [ n; f3 p; f3 m; (if abs p > 1e-9 then f3 (m / p) else "–") ] ])
let agree = checks |> List.filter (fun (_, p, m) -> Math.Sign p = Math.Sign m) |> List.length
say (sprintf "Sign agreement: %d of %d.\n" agree checks.Length)

// ---- 2. a prediction explained by an attribution graph ----
let greaterThan = args.Int("greater-than", 0)
let promptText, gtSummary =
    if greaterThan > 0 then
        let prompts = TaskPrompts.greaterThan tokenizer greaterThan 1
        let years = TaskPrompts.yearTokens tokenizer
        let pdOf (model: Transformer) (hooks: (string * Transcoders.Models.HookFn) list) =
            prompts |> Array.averageBy (fun p ->
                use _ = torch.no_grad ()
                use scope = torch.NewDisposeScope()
                let ids = PromptTokens.encode tokenizer p.Text
                let logits = Transformer.runWithHooks model hooks (PromptTokens.tensor ids device)
                let probs = logits[0L, -1L].softmax(-1L).to_type(torch.float64).cpu().data<float>().ToArray()
                TaskPrompts.probabilityDifference false years p.Year probs)
        let clean = pdOf model []
        let spliced = pdOf model (Splicing.hooks transcoders Splicing.WithoutErrorTerms)
        prompts[0].Text,
        sprintf "Greater-than (Hanna et al.): probability difference over %d prompts, clean model %.4f, every MLP replaced by its transcoder %.4f (the transcoder paper: GPT-2 small 0.8829, MLP10 replaced 0.7978).\n"
            prompts.Length clean spliced
    else args.Get("prompt", "Once upon a time, there was a little girl named Lily. She"), ""
let tokens = PromptTokens.encode tokenizer promptText
let graph = AttributionGraph.build model transcoders tokens GraphConfig.Default |> Tracing.withTokenStrings tokenizer
let pruned = Pruning.prune { PruneConfig.Default with Device = device } graph
let scores = Pruning.scores graph device
say (sprintf "## 2. A prediction explained by an attribution graph\n\n%sPrompt: \"%s\" (%d tokens). The model predicts %s.\n"
        gtSummary promptText tokens.Length
        (String.Join(", ", graph.Logits |> Array.truncate 3 |> Array.map (fun l -> sprintf "%s (p = %.3f)" (tok l.Token) l.Probability))))
say (sprintf "Graph: %d nodes (%d active features), %d kept after pruning (%d edges); replacement score %.3f, completeness score %.3f.\n"
        graph.NodeCount graph.Features.Length pruned.KeptNodes.Length pruned.Edges.Length scores.Replacement scores.Completeness)
let supernodes =
    pruned.KeptNodes
    |> Array.filter (fun id -> id < graph.ErrorStart)
    |> Array.groupBy (fun id -> graph.Features[id].Layer, graph.Features[id].Feature)
    |> Array.map (fun ((l, f), ids) -> l, f, ids, ids |> Array.sumBy (fun id -> pruned.NodeInfluence[id]))
    |> Array.sortByDescending (fun (_, _, _, infl) -> infl)
    |> Array.truncate (args.Int("supernodes", 8))
let logitEffects =
    transcoders |> List.map (fun x -> x.Config.Layers[0], FeatureDashboard.logitEffects model x 0 5) |> Map.ofList
say "Strongest supernodes (a feature's kept nodes merged over positions, ranked by their summed influence on the logits), with what a reader needs to name them:\n"
say (table [ "supernode"; "positions (tokens)"; "influence"; "top examples"; "de-embedding"; "promotes" ]
        [ for l, f, ids, infl in supernodes ->
            let positions = ids |> Array.map (fun id -> graph.Features[id].Position) |> Array.sort
            let summary = dashboards[l].Layers[0].Summaries[f]
            let examples = summary.Top |> Array.truncate 3 |> Array.map (fun e -> exampleText tokenizer e.Tokens[max 0 (e.Center - 4) ..] (min e.Center 4))
            let de = Attribution.top 4 false (Attribution.featureDeembedding circuit l f) |> List.map (fst >> tok)
            let promotes =
                match logitEffects[l] with
                | Some effects -> effects[f] |> fst |> Array.truncate 4 |> Array.map (fun t -> tok t.Token) |> String.concat " "
                | None -> ""
            [ sprintf "mlp%dtc[%d]" l f
              String.Join(" ", positions |> Array.map (fun p -> sprintf "%d %s" p (tok tokens[p])))
              f3 infl; String.Join(" · ", examples); String.Join(" ", de); promotes ] ])
match supernodes |> Array.tryHead with
| Some(l, f, ids, _) ->
    let q = ids |> Array.map (fun id -> graph.Features[id].Position) |> Array.max
    use lr = LocalReplacement.create model transcoders tokens
    let effects = Interventions.compareWithGraph lr graph [ { Layer = l; Feature = f; Position = At q; Action = Ablate } ]
    say (sprintf "Ablating the strongest supernode's node mlp%dtc[%d]@%d: the graph's predicted change of each explained logit against the local replacement model (constrained) and the real model (free):\n" l f q)
    say (table [ "logit"; "predicted"; "constrained"; "free" ]
            [ for e in effects |> Array.truncate 5 -> [ tok e.Token; f4 e.Predicted; f4 e.Constrained; f4 e.Free ] ])
| None -> say "No feature node survived pruning."

writeResults args "case-study.md" "Circuit case study" sw (out.ToString()) |> ignore
(run :> IDisposable).Dispose()
(circuit :> IDisposable).Dispose()
