/// The views layer: escaping, the streamed feature statistics against a brute-force pass, circuit-tracer's graph
/// JSON (fields, ids, round trip, files laid out as circuit-tracer writes them), SAELens' coder layout (round trip and
/// hand-made folders), and every page kind made from real output (stories260K with transcoders trained here) opened
/// in headless Chromium with the network off: it must draw (SVG or canvas present, the page's own drawn-marker set)
/// with no script errors.
module Transcoders.Tests.ViewsTests

open System
open System.Diagnostics
open System.IO
open System.Text.Json.Nodes
open System.Text.RegularExpressions
open Expecto
open TorchSharp
open Transcoders.Circuits
open Transcoders.Coders
open Transcoders.Files
open Transcoders.Models
open Transcoders.Text
open Transcoders.Views
open Transcoders.Tests.Fixtures

let private evil = "<script>alert(\"x\")</script>'&"

// ---- headless Chromium ----

let private chromiumPath =
    lazy
        (let path = Environment.GetEnvironmentVariable "PATH"
         if isNull path then None
         else
             [ "chromium"; "chromium-browser"; "google-chrome" ]
             |> List.tryPick (fun name ->
                 path.Split(Path.PathSeparator) |> Array.tryPick (fun d ->
                     let p = Path.Combine(d, name)
                     if File.Exists p then Some p else None)))

/// Runs a test that needs Chromium; without it the test is skipped, except in CI (CI=true), where it fails.
let private withChromium (f: string -> unit) =
    match chromiumPath.Force() with
    | Some c -> f c
    | None ->
        if Environment.GetEnvironmentVariable "CI" = "true" then failwith "chromium is not installed (.ci/run installs Debian's chromium)"
        else skiptest "chromium is not installed: apt-get install chromium to run the render checks"

/// The page's DOM after its scripts ran, with the network off (no proxy reachable, every host unresolvable).
let private dumpDom (chromium: string) (page: string) : string =
    let profile = Path.Combine(Path.GetTempPath(), "transcoders-chromium-" + Guid.NewGuid().ToString("N"))
    let psi =
        ProcessStartInfo(chromium, RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false)
    for a in [ "--headless"; "--no-sandbox"; "--disable-gpu"; "--no-first-run"; "--disable-background-networking"
               "--proxy-server=127.0.0.1:9"; "--host-resolver-rules=MAP * ~NOTFOUND"
               "--user-data-dir=" + profile; "--virtual-time-budget=5000"; "--window-size=1400,1000"; "--dump-dom"
               Uri(Path.GetFullPath page).AbsoluteUri ] do psi.ArgumentList.Add a
    use p = Process.Start psi
    let err = p.StandardError.ReadToEndAsync()
    let out = p.StandardOutput.ReadToEnd()
    if not (p.WaitForExit 120_000) then (p.Kill true; failwithf "chromium did not finish rendering %s" page)
    try Directory.Delete(profile, true) with _ -> ()
    if String.IsNullOrWhiteSpace out then failwithf "chromium rendered nothing for %s: %s" page err.Result
    out

/// Checks a rendered DOM: the page's drawn marker, no recorded script errors, and drawn elements.
let private expectDrawn (dom: string) (marker: string) (element: string) (minimum: int) =
    let errors = Regex.Match(dom, "<pre id=\"page-errors\">(.*?)</pre>", RegexOptions.Singleline)
    Expect.isTrue errors.Success "the page has its error box"
    Expect.equal (errors.Groups[1].Value.Trim()) "" "no script errors"
    Expect.stringContains dom ("data-drawn=\"" ) "the page says it drew"
    Expect.isTrue (Regex.IsMatch(dom, "data-drawn=\"[^\"]*" + marker)) (sprintf "the page drew its %s" marker)
    let n = Regex.Matches(dom, element).Count
    Expect.isGreaterThanOrEqual n minimum (sprintf "at least %d drawn elements matching %s (got %d)" minimum element n)

// ---- real output: stories260K with small transcoders ----

let private modelPath = Paths.data "models/stories260K/stories260K.bin"

let private setup =
    lazy
        (let model, _ = ModelFiles.load modelPath torch.CPU
         model.eval ()
         let tokenizer = ModelTokenizer.find modelPath
         let stories = Interpretability.shippedStories tokenizer 300
         let text =
             { Name = "views test stories"; Train = Array.concat stories[.. 259]; Validation = Array.concat stories[260 ..]
               Bos = Tokenizer.bos tokenizer; VocabSize = Tokenizer.vocabSize tokenizer }
         let plan = { CoderPlan.Default with Width = Some 128; Activation = Some(TopK 8); Steps = 80; Batch = 256; Seed = 3L }
         let dir = Path.Combine(Path.GetTempPath(), sprintf "transcoders-views-tests-%d" Environment.ProcessId)
         let config =
             { JobsConfig.Default dir with
                 Store = CoderPlan.store model (Some 64) plan.Batch (Some 4096L) plan.Seed torch.CPU
                 CheckpointEvery = 0
                 Resume = false
                 Eval = { JobEval.Default with ActivationRows = 2048L; SplicedRows = 0 } }
         let result = CoderJobs.run model text (CoderPlan.jobs model "stories260K" plan) config ignore
         let coders = [ for c in result.Coders -> CoderFile.load c.Path torch.CPU ]
         let logs = [ for c in result.Coders -> c.Name, File.ReadAllText(Path.Combine(c.Path, "log.jsonl")) ]
         let metrics = result.Coders.Head.Metrics
         try Directory.Delete(dir, true) with _ -> ()
         model, tokenizer, coders, logs, metrics)

let private prompt = "Once upon a time, there was a little girl named Lily. She loved to play with her"

/// Every page kind from the real setup, written once into a folder (and the graph used).
let private pages =
    lazy
        (let model, tokenizer, coders, logs, _ = setup.Force()
         let dir = Path.Combine(Path.GetTempPath(), sprintf "transcoders-views-pages-%d" Environment.ProcessId)
         Directory.CreateDirectory dir |> ignore
         let logPaths =
             [ for name, textLog in List.truncate 1 logs ->
                   let p = Path.Combine(dir, name + ".log.jsonl")
                   File.WriteAllText(p, textLog)
                   "training " + name, p ]
         let options =
             { ReportOptions.Create(dir, prompt) with
                 Stories = 80
                 Scan = "stories260K"
                 Dashboard = { DashboardOptions.Default with Texts = [ prompt ] }
                 Graph = { GraphConfig.Default with MaxFeatureNodes = Some 300 }
                 TrainingLogs = logPaths }
         let report = Interpretability.writeAll model tokenizer coders options ignore
         report)

// ---- synthetic data for escaping tests ----

let private syntheticDashboard () : CoderDashboard =
    let tokens = [| 0; 1; 2; 3; 1 |]
    let c = FeatureStatsCollector(3, FeatureStatsOptions.Default)
    let acts = array2D [ [ 0.0f; 1.0f; 0.0f ]; [ 2.0f; 0.0f; 0.5f ]; [ 0.0f; 0.0f; 0.0f ]; [ 1.5f; 3.0f; 0.0f ]; [ 0.2f; 0.0f; 0.0f ] ]
    c.Add(tokens, [ for p in 0 .. 4 do for f in 0 .. 2 do if acts[p, f] > 0.0f then yield p, f, acts[p, f] ], fun p f -> acts[p, f])
    let summaries = c.Summaries()
    let w = { TopLogits = [| { Token = 1; Score = 2.0 } |]; BottomLogits = [| { Token = 3; Score = -1.0 } |]
              Deembedding = [| { Token = 1; Score = 0.5 } |]; Heads = [| 0, 1, 0.3, [| { Token = 2; Score = 0.1 } |] |] }
    { Name = "coder " + evil; Description = "desc " + evil; Model = "model " + evil
      Layers = [| { Layer = 0; Summaries = summaries; Weights = Some (Array.create 3 w)
                    Texts = [| { Text = evil; Tokens = tokens; Active = [| for p in 0 .. 4 -> [| for f in 0 .. 2 do if acts[p, f] > 0.0f then yield f, acts[p, f] |] |] } |] } |]
      Sequences = 1; Tokens = 5L; Seconds = 0.0 }

/// A tokenizer-free token text: token 1 is the evil string.
let private evilText (t: int) = if t = 1 then evil else sprintf "tok%d" t

let private syntheticGraph () : Graph =
    // 2 layers, 3 positions; features at (0, 1, 5) and (1, 2, 7); one logit
    let features : FeatureNode[] = [| { Layer = 0; Position = 1; Feature = 5; Activation = 1.5 }; { Layer = 1; Position = 2; Feature = 7; Activation = 2.0 } |]
    let g0 =
        { Tokens = [| 0; 1; 2 |]; TokenStrings = [| "a"; evil; "c" |]; NLayers = 2; Features = features
          Logits = [| { Token = 1; Probability = 0.9; Logit = 3.0 } |]; Blocks = [||]
          Settings = GraphConfig.Default.Settings
          Stats = { ActiveFeatures = 2; Batches = 1; BuildSeconds = 0.0; RankingSeconds = 0.0; EstimatedBytes = 0L } }
    let f0, f1 = 0, 1
    let tok p = Graph.tokenNode g0 p
    let err l p = Graph.errorNode g0 l p
    let logit = Graph.logitNode g0 0
    { g0 with
        Blocks =
            [| { Targets = [| f0 |]; Sources = [| tok 0; tok 1 |]; Weights = [| 0.4f; 1.2f |] }
               { Targets = [| f1 |]; Sources = [| f0; tok 2; err 0 2 |]; Weights = [| 0.9f; -0.3f; 0.2f |] }
               { Targets = [| logit |]; Sources = [| f1; tok 2; err 1 2 |]; Weights = [| 2.0f; 0.5f; -0.4f |] } |] }

let private randomCoder (cfg: CoderConfig) (seed: int64) =
    torch.manual_seed seed |> ignore
    let nL, dIn, dOut, dSae = int64 cfg.NLayers, int64 cfg.DIn, int64 cfg.DOut, int64 cfg.DSae
    Coder.ofTensors cfg torch.CPU
        [ yield "W_enc", torch.randn(nL, dIn, dSae)
          yield "b_enc", torch.randn(nL, dSae).mul(sc 0.1)
          match cfg.Activation with JumpReLU _ -> yield "log_threshold", torch.full([| nL; dSae |], sc -1.0) | _ -> ()
          yield "W_dec_0", torch.randn(dSae, 1L, dOut)
          yield "b_dec", torch.randn(nL, dOut).mul(sc 0.1)
          if cfg.Kind = SkipTranscoder then yield "W_skip", torch.randn(1L, dOut, dIn).mul(sc 0.1)
          if cfg.InputBias && cfg.Kind <> Sae then yield "b_in", torch.randn(nL, dIn).mul(sc 0.1) ]

let private sameOutputs (a: Coder) (b: Coder) =
    use _ = torch.no_grad ()
    torch.manual_seed 5L |> ignore
    use x = torch.randn(16L, int64 a.Config.DIn)
    use ya = a.Forward x
    use yb = b.Forward x
    let diff = (use d = ya.sub(yb).abs().max() in d.item<float32> ())
    Expect.isLessThan diff 1e-4f "same outputs after the round trip"

let tests =
    testSequenced <| testList "Views" [
        testList "escaping" [
            test "Page.escape escapes the five HTML characters" {
                Expect.equal (Page.escape evil) "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&#39;&amp;" "escaped"
                Expect.equal (Page.escape null) "" "null is empty"
            }
            test "embedded JSON cannot close its script element" {
                let s = Page.json (Page.obj [ "t", Page.str evil ])
                Expect.isFalse (s.Contains "<") "no < in the embedded JSON"
                Expect.isFalse (s.Contains ">") "no > in the embedded JSON"
                let parsed = JsonNode.Parse s
                Expect.equal (parsed["t"].GetValue<string>()) evil "and it parses back to the same string"
            }
            test "every page kind keeps a <script> token out of the markup" {
                let d = syntheticDashboard ()
                let specs =
                    [ "feature", FeatureDashboard.page evilText DashboardOptions.Default d
                      "index", FeatureDashboard.indexPage ("index " + evil) [ d ]
                      "graph", GraphPage.page { GraphPageOptions.Create("graph " + evil, "prompt " + evil, evilText) with MaxNodeThreshold = 1.0; MaxEdgeThreshold = 1.0 } (syntheticGraph ())
                      "plots", Plots.page ("plots " + evil)
                                  [ Plots.heatmap { Layer = 0; Tokens = [| "a"; evil; "a" |]; Features = [| 3 |]; Acts = [| [| 0.0; 1.0; 2.0 |] |] } ] ]
                for name, spec in specs do
                    let html = Page.render spec
                    Expect.isFalse (html.Contains "<script>alert") (sprintf "%s: the token never appears as markup" name)
                    Expect.isFalse (html.Contains "</script>'&") (sprintf "%s: no raw closing tag from data" name)
            }
        ]

        testList "feature statistics" [
            test "streamed top examples, counts and histogram equal a brute-force pass, memory bounded" {
                let rng = Random(7)
                let dSae, nSeq, len = 6, 40, 20
                let opts = { FeatureStatsOptions.Default with TopExamples = 5; SampleSize = 17; Before = 3; After = 2 }
                let c = FeatureStatsCollector(dSae, opts)
                let all = ResizeArray<int * int * int * float32>()
                for s in 0 .. nSeq - 1 do
                    let tokens = Array.init len (fun _ -> rng.Next 50)
                    let acts = Array2D.init len dSae (fun _ _ -> if rng.NextDouble() < 0.2 then float32 (rng.NextDouble() * 10.0) else 0.0f)
                    let active = [ for p in 0 .. len - 1 do for f in 0 .. dSae - 1 do if acts[p, f] > 0.0f then yield p, f, acts[p, f] ]
                    for (p, f, v) in active do all.Add((s, p, f, v))
                    c.Add(tokens, active, fun p f -> acts[p, f])
                let sums = c.Summaries()
                for f in 0 .. dSae - 1 do
                    let mine = all |> Seq.filter (fun (_, _, g, _) -> g = f) |> Array.ofSeq
                    let s = sums[f]
                    Expect.equal s.Count (int64 mine.Length) "count"
                    Expect.equal s.Tokens (int64 (nSeq * len)) "tokens"
                    Expect.floatClose Accuracy.high s.Max (mine |> Array.map (fun (_, _, _, v) -> float v) |> Array.max) "max"
                    let expectedTop = mine |> Array.map (fun (_, _, _, v) -> v) |> Array.sortDescending |> Array.truncate 5
                    Expect.sequenceEqual (s.Top |> Array.map (fun e -> e.Activation)) expectedTop "top activations"
                    for e in s.Top do
                        Expect.equal e.Acts[e.Center] e.Activation "the example's centre is its token"
                        Expect.isLessThanOrEqual e.Tokens.Length (opts.Before + opts.After + 1) "window bounded"
                    Expect.equal (Array.sum s.LogHistogram) s.Count "histogram counts every firing"
                    Expect.equal s.Sample.Length (min mine.Length opts.SampleSize) "reservoir bounded"
                    Expect.isTrue (s.Sample |> Array.pairwise |> Array.forall (fun (a, b) -> a.Activation <= b.Activation)) "sample sorted"
                    let bands = FeatureStats.quantileExamples 4 3 s
                    Expect.isTrue (bands |> Array.pairwise |> Array.forall (fun ((lo1, _, _), (lo2, _, _)) -> lo1 > lo2)) "bands highest first"
            }
        ]

        testList "circuit-tracer graph JSON" [
            test "a library graph exports with the schema's fields and circuit-tracer's ids, and round-trips" {
                let model, tokenizer, coders, _, _ = setup.Force()
                let tokens = Tokenizer.encodeDocument tokenizer true false prompt
                let g = AttributionGraph.build model coders tokens { GraphConfig.Default with MaxFeatureNodes = Some 200 }
                use dir = new TempDir()
                let text (t: int) = Tokenizer.tokenText tokenizer t
                let eo = { GraphExportOptions.Create("views-test", "stories260K", prompt, text) with TranscoderList = [ "M0"; "M1" ] }
                let path = GraphJson.export dir.Path eo g
                let root = JsonNode.Parse(File.ReadAllText path).AsObject()
                for k in [ "metadata"; "qParams"; "nodes"; "links" ] do Expect.isTrue (root.ContainsKey k) (sprintf "top-level %s" k)
                let meta = root["metadata"].AsObject()
                for k in [ "slug"; "scan"; "prompt_tokens"; "prompt"; "node_threshold"; "info" ] do Expect.isTrue (meta.ContainsKey k) (sprintf "metadata.%s" k)
                Expect.isNotNull (meta["info"]["generator"]) "metadata.info.generator"
                Expect.equal (meta["prompt_tokens"].AsArray().Count) tokens.Length "prompt tokens"
                let nodes = root["nodes"].AsArray() |> Seq.map (fun n -> n.AsObject()) |> Array.ofSeq
                for n in nodes do
                    for k in [ "node_id"; "feature"; "layer"; "ctx_idx"; "feature_type"; "jsNodeId"; "clerp"; "influence"; "activation"; "token_prob"; "is_target_logit" ] do
                        Expect.isTrue (n.ContainsKey k) (sprintf "node field %s" k)
                let byType t = nodes |> Array.filter (fun n -> n["feature_type"].GetValue<string>() = t)
                let idOf (n: JsonObject) = n["node_id"].GetValue<string>()
                let nL = model.Config.NLayers
                Expect.isNonEmpty (byType "cross layer transcoder") "feature nodes"
                for n in byType "cross layer transcoder" do
                    let l, p = n["layer"].GetValue<string>(), n["ctx_idx"].GetValue<int>()
                    Expect.isTrue (Regex.IsMatch(idOf n, sprintf "^%s_\\d+_%d$" l p)) (sprintf "feature id %s is {layer}_{feature}_{pos}" (idOf n))
                    let f = int ((idOf n).Split('_')[1])
                    Expect.equal (n["feature"].GetValue<int64>()) (GraphJson.cantor (int l) f) "feature = Cantor(layer, index)"
                for n in byType "mlp reconstruction error" do
                    Expect.isTrue (Regex.IsMatch(idOf n, "^\\d+_-1_\\d+$")) (sprintf "error id %s" (idOf n))
                let emb = byType "embedding"
                Expect.equal emb.Length tokens.Length "every token's embedding node"
                for n in emb do
                    let p = n["ctx_idx"].GetValue<int>()
                    Expect.equal (idOf n) (sprintf "E_%d_%d" tokens[p] p) "embedding id E_{token}_{pos}"
                let logits = byType "logit"
                Expect.equal logits.Length g.Logits.Length "every logit"
                for n in logits do Expect.isTrue (Regex.IsMatch(idOf n, sprintf "^%d_\\d+_%d$" (nL + 1) (tokens.Length - 1))) "logit id {n_layers+1}_{token}_{pos}"
                let first = logits[0]
                Expect.isTrue (first["is_target_logit"].GetValue<bool>()) "the first logit is the target"
                let index = JsonNode.Parse(File.ReadAllText(Path.Combine(dir.Path, "graph-metadata.json")))
                Expect.equal (index["graphs"].AsArray().Count) 1 "graph-metadata.json lists it"
                // round trip: the graph read back holds the kept features, logits and edges
                let pruned = Pruning.prune PruneConfig.Default g
                let back = GraphJson.toGraph (GraphJson.load path)
                Expect.equal back.NLayers g.NLayers "layers"
                Expect.sequenceEqual back.Tokens g.Tokens "tokens"
                Expect.sequenceEqual (back.Logits |> Array.map (fun l -> l.Token)) (g.Logits |> Array.map (fun l -> l.Token)) "logits"
                let key (gr: Graph) id =
                    match Graph.node gr id with
                    | GraphNode.Feature f -> sprintf "f%d.%d.%d" f.Layer f.Position f.Feature
                    | GraphNode.Error (l, p) -> sprintf "e%d.%d" l p
                    | GraphNode.Token (p, _) -> sprintf "t%d" p
                    | GraphNode.Logit l -> sprintf "l%d" l.Token
                let edgesOf (gr: Graph) (es: seq<int * int * float32>) = es |> Seq.map (fun (t, s, w) -> (key gr t, key gr s), w) |> Map.ofSeq
                let exportedRoot = JsonNode.Parse(File.ReadAllText path)
                let exported = exportedRoot["links"].AsArray().Count
                let original = edgesOf g [ for e in pruned.Edges -> e.Target, e.Source, e.Weight ]
                let read = edgesOf back (Graph.edges back)
                Expect.equal read.Count exported "every link read back"
                for KeyValue(k, w) in read do
                    Expect.floatClose Accuracy.medium (float w) (float original[k]) (sprintf "edge %A" k)
                for f in back.Features do
                    let i = (Graph.featureIndex g)[f.At]
                    Expect.floatClose Accuracy.medium f.Activation g.Features[i].Activation "activation"
            }

            test "a file laid out as circuit-tracer writes it (legacy error ids) reads" {
                let json = """{
  "metadata": {"slug": "ct", "scan": "gemma-2-2b", "transcoder_list": [], "prompt_tokens": ["<bos>", "The", " cat"],
               "prompt": "The cat", "node_threshold": 0.8, "schema_version": 1},
  "qParams": {"pinnedIds": [], "supernodes": [["cats", "1_42_2"]], "linkType": "both", "clickedId": "", "sg_pos": ""},
  "nodes": [
    {"node_id": "1_42_2", "feature": 1033, "layer": "1", "ctx_idx": 2, "feature_type": "cross layer transcoder", "token_prob": 0.0,
     "is_target_logit": false, "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": "1_42-0", "clerp": "", "influence": 0.4, "activation": 3.5},
    {"node_id": "0_1_2", "feature": -1, "layer": "1", "ctx_idx": 2, "feature_type": "mlp reconstruction error", "token_prob": 0.0,
     "is_target_logit": false, "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": "1_2-0", "clerp": "", "influence": 0.6, "activation": null},
    {"node_id": "E_2_0", "feature": 0, "layer": "E", "ctx_idx": 0, "feature_type": "embedding", "token_prob": 0.0, "is_target_logit": false,
     "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": "E_2-0", "clerp": "", "influence": 0.1, "activation": null},
    {"node_id": "E_651_1", "feature": 1, "layer": "E", "ctx_idx": 1, "feature_type": "embedding", "token_prob": 0.0, "is_target_logit": false,
     "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": "E_651-1", "clerp": "", "influence": 0.1, "activation": null},
    {"node_id": "E_4937_2", "feature": 2, "layer": "E", "ctx_idx": 2, "feature_type": "embedding", "token_prob": 0.0, "is_target_logit": false,
     "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": "E_4937-2", "clerp": "", "influence": 0.2, "activation": null},
    {"node_id": "27_603_2", "feature": 603, "layer": "27", "ctx_idx": 2, "feature_type": "logit", "token_prob": 0.7, "is_target_logit": true,
     "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": "L_603-2", "clerp": "Output \" is\" (p=0.700)", "influence": null, "activation": null}
  ],
  "links": [
    {"source": "E_4937_2", "target": "1_42_2", "weight": 1.5},
    {"source": "1_42_2", "target": "27_603_2", "weight": 2.25},
    {"source": "0_1_2", "target": "27_603_2", "weight": -0.5}
  ]
}"""
                let doc = GraphJson.parse "circuit-tracer.json" json
                Expect.equal doc.Scan "gemma-2-2b" "scan"
                let supernodes = doc.QParams["supernodes"].AsArray()
                Expect.equal supernodes.Count 1 "qParams kept"
                let g = GraphJson.toGraph doc
                Expect.equal g.NLayers 26 "n_layers from the logit layer"
                Expect.sequenceEqual g.Tokens [| 2; 651; 4937 |] "token ids from E_{token}_{pos}"
                Expect.equal g.Features.Length 1 "one feature"
                Expect.equal (g.Features[0].Layer, g.Features[0].Feature, g.Features[0].Position) (1, 42, 2) "feature from its id"
                Expect.equal (Graph.edge g (Graph.logitNode g 0) (Graph.errorNode g 1 2)) -0.5f "the error link lands on error (1, 2)"
                Expect.equal (Graph.edge g (Graph.logitNode g 0) 0) 2.25f "feature → logit"
                Expect.equal (GraphJson.uncantor 1033L) (1, 42) |> ignore
            }

            test "legacy error ids that collide with a feature id are refused" {
                // feature 1 of layer 0 at position 2 has the legacy id of error (layer 1, position 2)
                let g = syntheticGraph ()
                let g = { g with Features = [| ({ Layer = 0; Position = 2; Feature = 1; Activation = 1.0 } : FeatureNode); g.Features[1] |] }
                let g = { g with Blocks = [| { Targets = [| 1 |]; Sources = [| 0; Graph.errorNode g 1 2 |]; Weights = [| 1.0f; 1.0f |] }
                                             { Targets = [| Graph.logitNode g 0 |]; Sources = [| 1 |]; Weights = [| 1.0f |] }
                                             { Targets = [| 0 |]; Sources = [| Graph.tokenNode g 2 |]; Weights = [| 1.0f |] } |] }
                let eo = { GraphExportOptions.Create("c", "s", "p", evilText) with ErrorIds = Legacy; NodeThreshold = 1.0; EdgeThreshold = 1.0 }
                Expect.throws (fun () -> GraphJson.toJson eo g |> ignore) "collision refused"
                Expect.equal (GraphJson.uncantor (GraphJson.cantor 7 123)) (7, 123) "Cantor pairing inverts"
            }
        ]

        testList "SAELens layout" [
            test "transcoders and SAEs round-trip through cfg.json + sae_weights.safetensors" {
                use dir = new TempDir()
                let cases =
                    [ "relu transcoder", { CoderConfig.transcoder "m" 2 12 20 with InputBias = false }
                      "jumprelu transcoder", { CoderConfig.transcoder "m" 1 12 20 with InputBias = false; Activation = JumpReLU JumpReLUSpec.Default }
                      "skip transcoder", { CoderConfig.skipTranscoder "m" 0 12 20 with InputBias = false }
                      "relu sae", CoderConfig.sae "m" "blocks.3.hook_resid_pre" 3 12 20
                      "topk sae", { CoderConfig.sae "m" "blocks.3.hook_resid_pre" 3 12 20 with Activation = TopK 4 } ]
                for i, (name, cfg) in List.indexed cases do
                    use c = randomCoder cfg (int64 (10 + i))
                    let folder = SaeLens.export (Path.Combine(dir.Path, sprintf "c%d" i)) c
                    Expect.isTrue (File.Exists(Path.Combine(folder, "cfg.json"))) (name + ": cfg.json")
                    Expect.isTrue (File.Exists(Path.Combine(folder, "sae_weights.safetensors"))) (name + ": sae_weights.safetensors")
                    let cfgJson = JsonNode.Parse(File.ReadAllText(Path.Combine(folder, "cfg.json")))
                    Expect.equal (cfgJson["d_sae"].GetValue<int>()) 20 (name + ": d_sae")
                    use back = SaeLens.import folder torch.CPU
                    Expect.equal back.Config.Kind cfg.Kind (name + ": kind")
                    Expect.equal back.Config.Activation cfg.Activation (name + ": activation")
                    Expect.equal back.Config.HookIn cfg.HookIn (name + ": hook")
                    sameOutputs c back
                use clt = randomCoder { CoderConfig.transcoder "m" 0 4 4 with Activation = TopK 2; InputBias = false } 3L
                Expect.throws (fun () -> SaeLens.export (Path.Combine(dir.Path, "topk-tc")) clt |> ignore) "no SAELens architecture for a TopK transcoder"
            }

            test "a folder laid out as SAELens documents it (top-level hook fields, apply_b_dec_to_input) reads" {
                use dir = new TempDir()
                let dIn, dSae = 8, 16
                torch.manual_seed 9L |> ignore
                let wEnc, bEnc, wDec, bDec = torch.randn(dIn, dSae), torch.randn(dSae), torch.randn(dSae, dIn), torch.randn(dIn)
                Safetensors.save (Path.Combine(dir.Path, "sae_weights.safetensors")) Map.empty [ "W_enc", wEnc; "b_enc", bEnc; "W_dec", wDec; "b_dec", bDec ]
                File.WriteAllText(Path.Combine(dir.Path, "cfg.json"), """{"architecture": "standard", "d_in": 8, "d_sae": 16, "dtype": "float32",
 "device": "cpu", "model_name": "gpt2", "hook_name": "blocks.5.hook_resid_pre", "hook_layer": 5, "hook_head_index": null,
 "activation_fn_str": "relu", "apply_b_dec_to_input": true, "finetuning_scaling_factor": false, "context_size": 128,
 "prepend_bos": true, "normalize_activations": "none"}""")
                use c = SaeLens.import dir.Path torch.CPU
                Expect.equal c.Config.Layers [| 5 |] "layer"
                Expect.equal c.Config.HookIn [| "blocks.5.hook_resid_pre" |] "hook"
                Expect.equal c.Config.Decoder Free "decoder rows that are not unit-norm are not claimed to be (training would renormalise them)"
                use _ = torch.no_grad ()
                use x = torch.randn(4L, int64 dIn)
                // SAELens' forward: relu((x − b_dec) W_enc + b_enc) W_dec + b_dec
                use expected = x.sub(bDec).matmul(wEnc).add(bEnc).relu().matmul(wDec).add(bDec)
                use y = c.Forward x
                Expect.isLessThan (use d = y.sub(expected).abs().max() in d.item<float32> ()) 1e-4f "SAELens' forward reproduced"
                File.WriteAllText(Path.Combine(dir.Path, "cfg.json"), """{"architecture": "standard", "d_in": 8, "d_sae": 16, "hook_name": "blocks.5.hook_resid_pre", "normalize_activations": "expected_average_only_in"}""")
                Expect.throws (fun () -> SaeLens.import dir.Path torch.CPU |> ignore) "a scaling factor outside the weights is refused"
            }

            test "metrics.json has SAELens' names" {
                let _, _, _, _, metrics = setup.Force()
                use dir = new TempDir()
                let spliced : SplicedEval.SplicedMetrics =
                    { Tokens = 10L; Predictions = 10L; CeClean = 2.0; CeSpliced = 2.2; CeAblated = 4.0; CeRecovered = 0.9
                      CeDelta = 0.2; KlToClean = 0.1; KlAblated = 1.0; KlRecovered = 0.9
                      Top1Agreement = 0.8; Top1AgreementAblated = 0.2; LogitCosine = 0.99 }
                let path = SaeLens.writeMetrics dir.Path metrics (Some spliced)
                let o = JsonNode.Parse(File.ReadAllText path).AsObject()
                for k in [ "l0"; "explained_variance"; "mse"; "ce_loss_score"; "kl_div_score" ] do Expect.isTrue (o.ContainsKey k) k
                Expect.floatClose Accuracy.high (o["explained_variance"].GetValue<float>()) (1.0 - metrics.Value.Fvu) "explained variance = 1 − FVU"
            }
        ]

        testList "circuit-tracer layout" [
            testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 12 } "per-layer transcoders and CLTs round-trip through circuit-tracer's files with the same outputs" <| fun (seed: int) ->
                let rng = Random(seed)
                let dIn, dSae = rng.Next(2, 9), rng.Next(2, 17)
                let layer = rng.Next(0, 4)
                let cfg =
                    match rng.Next 6 with
                    | 0 -> CoderConfig.transcoder "m" layer dIn dSae
                    | 1 -> { CoderConfig.transcoder "m" layer dIn dSae with Activation = JumpReLU JumpReLUSpec.Default }
                    | 2 -> { CoderConfig.transcoder "m" layer dIn dSae with Activation = TopK (rng.Next(1, dSae + 1)) }
                    | 3 -> CoderConfig.skipTranscoder "m" layer dIn dSae
                    | 4 -> { CoderConfig.crossLayer "m" (Array.init (rng.Next(1, 4)) id) dIn dSae with Activation = ReLU }
                    | _ -> CoderConfig.crossLayer "m" (Array.init (rng.Next(1, 4)) id) dIn dSae
                torch.manual_seed (int64 seed) |> ignore
                // random parameters everywhere, an input bias and activation scales ≠ 1: both must be folded on export
                use c =
                    Coder.ofTensors cfg torch.CPU
                        [ for name, shape in Coder.ParameterShapes cfg do
                            if name = "log_threshold" then yield name, torch.rand(shape).mul(sc 0.5).add(sc 0.05).log()
                            elif name <> "batchtopk_threshold" then yield name, torch.randn(shape).mul(sc 0.5) ]
                c.SetScale { In = Array.init cfg.NLayers (fun _ -> 0.5 + rng.NextDouble()); Out = Array.init cfg.NLayers (fun _ -> 0.5 + rng.NextDouble()) }
                use dir = new TempDir()
                let folder = CircuitTracer.export (dir.File "ct") "m/test" [ c ]
                let back = CircuitTracer.import folder torch.CPU
                Expect.equal back.Length 1 "one coder back"
                use b = back.Head
                Expect.equal b.Config.Kind cfg.Kind "kind"
                Expect.equal b.Config.Activation cfg.Activation "activation"
                Expect.equal b.Config.Layers cfg.Layers "layers"
                Expect.equal b.Config.HookIn cfg.HookIn "input hooks"
                Expect.equal b.Config.HookOut cfg.HookOut "output hooks"
                use _ = torch.no_grad ()
                let lead = if cfg.Kind = CrossLayerTranscoder then [| 7L; int64 cfg.NLayers; int64 dIn |] else [| 7L; int64 dIn |]
                use x = torch.randn(lead).mul(sc 2.0)
                use ya = c.Forward x
                use yb = b.Forward x
                use scale = ya.abs().max().add(sc 1.0)
                let rel = (use d = ya.sub(yb).abs().max() in d.item<float32> ()) / scale.item<float32> ()
                Expect.isLessThan rel 1e-5f (sprintf "%A: same outputs after the round trip" cfg.Kind)

            test "exported files have circuit-tracer's keys and shapes, and config.yaml its fields" {
                use dir = new TempDir()
                torch.manual_seed 3L |> ignore
                let cfgs = [ for l in 0 .. 1 -> { CoderConfig.skipTranscoder "gpt2" l 6 10 with Activation = JumpReLU JumpReLUSpec.Default } ]
                let coders = [ for cfg in cfgs -> Coder.ofTensors cfg torch.CPU [ for name, shape in Coder.ParameterShapes cfg -> name, torch.randn(shape).mul(sc 0.3) ] ]
                try
                    let folder = CircuitTracer.export (dir.File "set") "gpt2/tc" coders
                    for l in 0 .. 1 do
                        use r = Safetensors.Reader.Open(Path.Combine(folder, sprintf "layer_%d.safetensors" l))
                        let shapes = r.Entries |> List.map (fun e -> e.Name, List.ofArray e.Shape) |> Map.ofList
                        Expect.equal shapes (Map [ "W_enc", [ 10L; 6L ]; "W_dec", [ 10L; 6L ]; "b_enc", [ 10L ]; "b_dec", [ 6L ]
                                                   "activation_function.threshold", [ 10L ]; "W_skip", [ 6L; 6L ] ]) (sprintf "layer_%d keys and shapes" l)
                    let yaml = CircuitTracer.readConfig (Path.Combine(folder, "config.yaml"))
                    Expect.equal (yaml.TryFind "model_kind") (Some "transcoder_set") "model_kind"
                    Expect.equal (yaml.TryFind "feature_input_hook") (Some "ln2.hook_normalized") "input hook without the blocks prefix"
                    Expect.equal (yaml.TryFind "feature_output_hook") (Some "hook_mlp_out") "output hook"
                    Expect.equal (yaml.TryFind "model_name") (Some "gpt2") "model_name"
                    use clt = Coder.ofTensors (CoderConfig.crossLayer "gpt2" [| 0; 1; 2 |] 4 5) torch.CPU
                                [ for name, shape in Coder.ParameterShapes (CoderConfig.crossLayer "gpt2" [| 0; 1; 2 |] 4 5) -> name, torch.randn(shape) ]
                    let cf = CircuitTracer.export (dir.File "clt") "gpt2/clt" [ clt ]
                    for i in 0 .. 2 do
                        use e = Safetensors.Reader.Open(Path.Combine(cf, sprintf "W_enc_%d.safetensors" i))
                        Expect.equal (e.Info(sprintf "W_enc_%d" i)).Shape [| 5L; 4L |] "W_enc_i [F, d]"
                        Expect.equal (e.Info(sprintf "threshold_%d" i)).Shape [| 5L |] "threshold_i"
                        use d = Safetensors.Reader.Open(Path.Combine(cf, sprintf "W_dec_%d.safetensors" i))
                        Expect.equal (d.Info(sprintf "W_dec_%d" i)).Shape [| 5L; int64 (3 - i); 4L |] "W_dec_i [F, L−i, d]"
                    Expect.equal ((CircuitTracer.readConfig (Path.Combine(cf, "config.yaml"))).TryFind "model_kind") (Some "cross_layer_transcoder") "CLT model_kind"
                finally
                    for c in coders do (c :> IDisposable).Dispose()
            }

            test "a transcoder set laid out by hand as circuit-tracer documents it computes act(x·W_encᵀ + b_enc)·W_dec + b_dec + x·W_skipᵀ" {
                use dir = new TempDir()
                let d, f = 5L, 7L
                torch.manual_seed 11L |> ignore
                let layers =
                    [ for l in 0 .. 1 ->
                        torch.randn(f, d), torch.randn(f).mul(sc 0.3), torch.randn(f, d), torch.randn(d), torch.rand(f).mul(sc 0.5).add(sc 0.1), torch.randn(d, d).mul(sc 0.2) ]
                for l, (wEnc, bEnc, wDec, bDec, th, wSkip) in List.indexed layers do
                    Safetensors.save (Path.Combine(dir.Path, sprintf "layer_%d.safetensors" l)) Map.empty
                        [ "W_enc", wEnc; "W_dec", wDec; "b_enc", bEnc; "b_dec", bDec; "activation_function.threshold", th; "W_skip", wSkip ]
                File.WriteAllText(Path.Combine(dir.Path, "config.yaml"), "model_name: \"gpt2\"\nmodel_kind: transcoder_set\nfeature_input_hook: \"ln2.hook_normalized\"\nfeature_output_hook: 'hook_mlp_out'\nscan_name: gpt2/hand\n")
                let coders = CircuitTracer.import dir.Path torch.CPU
                try
                    Expect.equal coders.Length 2 "two layers"
                    use _ = torch.no_grad ()
                    use x = torch.randn(9L, d)
                    for l, ((wEnc, bEnc, wDec, bDec, th, wSkip), c) in List.indexed (List.zip layers coders) do
                        Expect.equal c.Config.Kind SkipTranscoder "W_skip present: skip transcoder"
                        Expect.equal c.Config.HookIn [| sprintf "blocks.%d.ln2.hook_normalized" l |] "input hook"
                        Expect.equal c.Config.HookOut [| sprintf "blocks.%d.hook_mlp_out" l |] "output hook"
                        Expect.equal c.Config.Model "gpt2" "model"
                        use pre = x.matmul(wEnc.t()).add(bEnc)
                        use a = pre.mul(pre.gt(th))
                        use expected = a.matmul(wDec).add(bDec).add(x.matmul(wSkip.t()))
                        use y = c.Forward x
                        Expect.isLessThan (use e = y.sub(expected).abs().max() in e.item<float32> ()) 1e-4f (sprintf "layer %d: circuit-tracer's forward reproduced" l)
                        use acts = c.Encode x
                        Expect.isLessThan (use e = acts.sub(a).abs().max() in e.item<float32> ()) 1e-5f (sprintf "layer %d: JumpReLU activations" l)
                finally
                    for c in coders do (c :> IDisposable).Dispose()
                // TopK named in config.yaml, as circuit-tracer's load_transcoder_set reads it
                use topDir = new TempDir()
                let wEnc, bEnc, wDec, bDec = torch.randn(f, d), torch.randn(f), torch.randn(f, d), torch.randn(d)
                Safetensors.save (Path.Combine(topDir.Path, "layer_0.safetensors")) Map.empty [ "W_enc", wEnc; "W_dec", wDec; "b_enc", bEnc; "b_dec", bDec ]
                File.WriteAllText(Path.Combine(topDir.Path, "config.yaml"), "model_name: gpt2\nmodel_kind: transcoder_set\nfeature_input_hook: hook_resid_mid\nfeature_output_hook: hook_mlp_out\nactivation: topk\nk: 3\n")
                use top = (CircuitTracer.import topDir.Path torch.CPU).Head
                Expect.equal top.Config.Activation (TopK 3) "TopK from config.yaml"
                use _ = torch.no_grad ()
                use x = torch.randn(9L, d)
                use pre = x.matmul(wEnc.t()).add(bEnc)
                let struct (vals, idx) = pre.topk(3, dim = -1)
                use vals = vals
                use idx = idx
                // ours keeps the k largest ReLU'd pre-activations (the same as circuit-tracer's when they are ≥ 0)
                use a = torch.zeros_like(pre).scatter(-1L, idx, vals.relu())
                use expected = a.matmul(wDec).add(bDec)
                use y = top.Forward x
                Expect.isLessThan (use e = y.sub(expected).abs().max() in e.item<float32> ()) 1e-4f "TopK forward"
            }

            test "a CLT laid out by hand as circuit-tracer documents it computes ŷ_ℓ = Σ_{i≤ℓ} a_i·W_dec_i[:, ℓ−i] + b_dec_ℓ" {
                use dir = new TempDir()
                let n, d, f = 3, 4L, 6L
                torch.manual_seed 12L |> ignore
                let enc = [ for _ in 0 .. n - 1 -> torch.randn(f, d), torch.randn(f).mul(sc 0.3), torch.randn(d), torch.rand(f).mul(sc 0.5).add(sc 0.1) ]
                let dec = [ for i in 0 .. n - 1 -> torch.randn(f, int64 (n - i), d) ]
                for i in 0 .. n - 1 do
                    let wEnc, bEnc, bDec, th = enc[i]
                    Safetensors.save (Path.Combine(dir.Path, sprintf "W_enc_%d.safetensors" i)) Map.empty
                        [ sprintf "W_enc_%d" i, wEnc; sprintf "b_enc_%d" i, bEnc; sprintf "b_dec_%d" i, bDec; sprintf "threshold_%d" i, th ]
                    Safetensors.save (Path.Combine(dir.Path, sprintf "W_dec_%d.safetensors" i)) Map.empty [ sprintf "W_dec_%d" i, dec[i] ]
                File.WriteAllText(Path.Combine(dir.Path, "config.yaml"), "model_name: gpt2\nmodel_kind: cross_layer_transcoder\nfeature_input_hook: ln2.hook_normalized\nfeature_output_hook: hook_mlp_out\n")
                use c = (CircuitTracer.import dir.Path torch.CPU).Head
                Expect.equal c.Config.Kind CrossLayerTranscoder "CLT"
                Expect.equal c.Config.Layers [| 0; 1; 2 |] "layers"
                use _ = torch.no_grad ()
                use x = torch.randn(5L, int64 n, d)
                let acts =
                    [ for i in 0 .. n - 1 ->
                        let wEnc, bEnc, _, th = enc[i]
                        let pre = x.select(1, int64 i).matmul(wEnc.t()).add(bEnc)
                        pre.mul(pre.gt(th)) ]
                use y = c.Forward x
                for l in 0 .. n - 1 do
                    let _, _, bDec, _ = enc[l]
                    let mutable expected = bDec.expand(5L, d)
                    for i in 0 .. l do expected <- expected.add(acts[i].matmul(dec[i].select(1, int64 (l - i))))
                    Expect.isLessThan (use e = y.select(1, int64 l).sub(expected).abs().max() in e.item<float32> ()) 1e-4f (sprintf "layer %d output" l)
            }

            test "damaged folders give errors naming the file and the tensor or field" {
                let throwsWith (f: unit -> Coder list) (fragments: string list) =
                    match (try Ok (f ()) with e -> Error e.Message) with
                    | Ok cs ->
                        for c in cs do (c :> IDisposable).Dispose()
                        failtest "expected an error"
                    | Error msg -> for fragment in fragments do Expect.stringContains msg fragment "error names it"
                let d, f = 4L, 6L
                let write (dir: string) (tensors: (string * torch.Tensor) list) =
                    Safetensors.save (Path.Combine(dir, "layer_0.safetensors")) Map.empty tensors
                    File.WriteAllText(Path.Combine(dir, "config.yaml"), "model_name: gpt2\nmodel_kind: transcoder_set\nfeature_input_hook: ln2.hook_normalized\nfeature_output_hook: hook_mlp_out\n")
                    Path.Combine(dir, "layer_0.safetensors")
                let good () = [ "W_enc", torch.randn(f, d); "W_dec", torch.randn(f, d); "b_enc", torch.randn(f); "b_dec", torch.randn(d) ]
                use missing = new TempDir()
                let p = write missing.Path (good () |> List.filter (fun (n, _) -> n <> "W_dec"))
                throwsWith (fun () -> CircuitTracer.import missing.Path torch.CPU) [ p; "'W_dec'"; "missing" ]
                use transposed = new TempDir()
                let p = write transposed.Path (good () |> List.map (fun (n, t) -> if n = "W_enc" then n, t.t().contiguous() else n, t))
                throwsWith (fun () -> CircuitTracer.import transposed.Path torch.CPU) [ p; "'W_enc'"; "[4, 6]"; "[6, 4]" ]
                use nanDir = new TempDir()
                let p = write nanDir.Path (good () |> List.map (fun (n, t) -> if n = "b_enc" then n, t.index_fill(0L, torch.tensor([| 2L |]), sc Double.NaN) else n, t))
                throwsWith (fun () -> CircuitTracer.import nanDir.Path torch.CPU) [ p; "'b_enc'"; "non-finite" ]
                use extra = new TempDir()
                let p = write extra.Path (good () @ [ "b_dec_out", torch.randn(d) ])
                throwsWith (fun () -> CircuitTracer.import extra.Path torch.CPU) [ p; "'b_dec_out'" ]
                use noConfig = new TempDir()
                write noConfig.Path (good ()) |> ignore
                File.Delete(Path.Combine(noConfig.Path, "config.yaml"))
                throwsWith (fun () -> CircuitTracer.import noConfig.Path torch.CPU) [ Path.Combine(noConfig.Path, "config.yaml") ]
                use noKind = new TempDir()
                write noKind.Path (good ()) |> ignore
                File.WriteAllText(Path.Combine(noKind.Path, "config.yaml"), "model_name: gpt2\nfeature_input_hook: ln2.hook_normalized\nfeature_output_hook: hook_mlp_out\n")
                throwsWith (fun () -> CircuitTracer.import noKind.Path torch.CPU) [ "config.yaml"; "'model_kind'" ]
                use clt = new TempDir()
                for i in 0 .. 1 do
                    Safetensors.save (Path.Combine(clt.Path, sprintf "W_enc_%d.safetensors" i)) Map.empty
                        [ sprintf "W_enc_%d" i, torch.randn(f, d); sprintf "b_enc_%d" i, torch.randn(f); sprintf "b_dec_%d" i, torch.randn(d) ]
                Safetensors.save (Path.Combine(clt.Path, "W_dec_0.safetensors")) Map.empty [ "W_dec_0", torch.randn(f, 1L, d) ]
                File.WriteAllText(Path.Combine(clt.Path, "config.yaml"), "model_name: gpt2\nmodel_kind: cross_layer_transcoder\nfeature_input_hook: ln2.hook_normalized\nfeature_output_hook: hook_mlp_out\n")
                throwsWith (fun () -> CircuitTracer.import clt.Path torch.CPU) [ "W_dec_1.safetensors" ]
                Safetensors.save (Path.Combine(clt.Path, "W_dec_1.safetensors")) Map.empty [ "W_dec_1", torch.randn(f, 1L, d) ]
                throwsWith (fun () -> CircuitTracer.import clt.Path torch.CPU) [ Path.Combine(clt.Path, "W_dec_0.safetensors"); "'W_dec_0'"; "[6, 2, 4]" ]
            }

            test "coders circuit-tracer cannot read are refused on export with the reason" {
                use dir = new TempDir()
                let refused (cfg: CoderConfig) (fragment: string) =
                    use c = Coder.ofTensors cfg torch.CPU [ for name, shape in Coder.ParameterShapes cfg -> name, torch.randn(shape) ]
                    let msg = (try CircuitTracer.export (dir.File "x") "s" [ c ] |> ignore; "" with e -> e.Message)
                    Expect.stringContains msg fragment (sprintf "%A refused" cfg.Kind)
                refused (CoderConfig.sae "m" "blocks.0.hook_resid_pre" 0 4 6) "SAE"
                refused { CoderConfig.transcoder "m" 0 4 6 with Activation = BatchTopK 2.0 } "BatchTopK"
                refused (CoderConfig.crossLayer "m" [| 1; 2 |] 4 6) "0..L−1"
                refused { CoderConfig.transcoder "m" 0 4 6 with DOut = 5 } "d_in 4 ≠ d_out 5"
            }
        ]

        test "the C# facade writes plots, graph pages, graph JSON and SAELens folders" {
            use dir = new TempDir()
            let log = dir.File "log.jsonl"
            File.WriteAllText(log, "{\"step\": 1, \"loss\": 2.0, \"lr\": 0.001}\n{\"step\": 2, \"loss\": 1.5, \"lr\": 0.002}\n")
            let plots = Transcoders.Pages.Plots(dir.File "plots.html", [| log |], null)
            Expect.stringContains (File.ReadAllText plots) "Plotly.newPlot" "a chart"
            GraphFile.saveWith (dir.File "g.safetensors") { GraphFileInfo.Empty with Description = Map.ofList [ "prompt", "a b c" ] } (syntheticGraph ())
            let page = Transcoders.Pages.GraphPage(dir.File "g.safetensors", dir.File "g.html", null)
            Expect.isTrue (File.Exists page && File.Exists(Path.ChangeExtension(page, ".json"))) "graph page and its data"
            let json = Transcoders.Pages.ExportGraphJson(dir.File "g.safetensors", dir.File "ct", "toy", null)
            Expect.isTrue (File.Exists(Path.Combine(dir.File "ct", "graph-metadata.json"))) (json + " with its index")
            use c = randomCoder { CoderConfig.transcoder "m" 0 6 10 with InputBias = false } 4L
            let folder = Transcoders.Pages.ExportSaeLens(new Transcoders.SparseCoder(c), dir.File "sl")
            use back = Transcoders.Pages.ImportSaeLens(folder, null)
            Expect.equal back.Core.Config.DSae 10 "read back"
        }

        test "the C# facade exports and imports circuit-tracer's layout and loads a model with TransformerLens processing" {
            use dir = new TempDir()
            let cfgs = [ for l in 0 .. 1 -> { CoderConfig.transcoder "m" l 6 10 with Activation = JumpReLU JumpReLUSpec.Default } ]
            let coders = [ for i, cfg in List.indexed cfgs -> new Transcoders.SparseCoder(randomCoder cfg (int64 (20 + i))) ]
            let folder = Transcoders.Pages.ExportCircuitTracer(ResizeArray coders, dir.File "ct", "m/tc")
            let back = Transcoders.Pages.ImportCircuitTracer(folder, null)
            Expect.equal back.Count 2 "two layers back"
            for a, b in Seq.zip coders back do sameOutputs a.Core b.Core
            use m = Transcoders.LanguageModel.Load(fixture "hf-gpt2-tiny", null, true)
            Expect.isFalse m.Core.Config.TiedUnembed "processed (untied unembedding with a bias)"
            for c in Seq.append (Seq.map (fun (c: Transcoders.SparseCoder) -> c.Core) coders) (Seq.map (fun (c: Transcoders.SparseCoder) -> c.Core) back) do
                (c :> IDisposable).Dispose()
        }

        testList "pages render in headless Chromium with the network off" [
            test "feature page, index, graph page and plots draw with no script errors" {
                withChromium (fun chromium ->
                    let r = pages.Force()
                    let feature = dumpDom chromium r.FeaturePages.Head
                    expectDrawn feature "feature" "<rect" 5
                    Expect.stringContains feature "Top activations" "top examples shown"
                    Expect.isGreaterThan (Regex.Matches(feature, "class=\"tok").Count) 20 "token spans drawn"
                    let index = dumpDom chromium r.Index
                    expectDrawn index "index" "<rect" 5
                    let graph = dumpDom chromium r.GraphPage.Value
                    expectDrawn graph "graph" "class=\"node " 10
                    Expect.isGreaterThan (Regex.Matches(graph, "class=\"edge").Count) 10 "edges drawn"
                    let plots = dumpDom chromium r.Plots
                    expectDrawn plots "plots" "class=\"main-svg\"" 4
                    for page in r.All |> List.filter (fun p -> p.EndsWith ".html") do
                        let html = File.ReadAllText page
                        Expect.isFalse (Regex.IsMatch(html, "<script[^>]*\ssrc=")) (sprintf "%s: no external script" page)
                        Expect.isFalse (Regex.IsMatch(html, "<link[^>]*href=\"http")) (sprintf "%s: no external stylesheet" page))
            }

            test "a <script> token renders as text on every page kind" {
                withChromium (fun chromium ->
                    use dir = new TempDir()
                    let d = syntheticDashboard ()
                    let pagesWritten =
                        [ "feature", Page.write (dir.File "f.html") (FeatureDashboard.page evilText DashboardOptions.Default d)
                          "graph", GraphPage.write (dir.File "g.html") { GraphPageOptions.Create("g", evil, evilText) with MaxNodeThreshold = 1.0; MaxEdgeThreshold = 1.0; NodeThreshold = 1.0; EdgeThreshold = 1.0 } (syntheticGraph ())
                          "plots", Plots.write (dir.File "p.html") evil [ Plots.heatmap { Layer = 0; Tokens = [| "a"; evil |]; Features = [| 1 |]; Acts = [| [| 0.5; 1.0 |] |] } ]
                          "index", Page.write (dir.File "i.html") (FeatureDashboard.indexPage evil [ d ]) ]
                    for name, p in pagesWritten do
                        let dom = dumpDom chromium p
                        Expect.equal (Regex.Match(dom, "<pre id=\"page-errors\">(.*?)</pre>", RegexOptions.Singleline).Groups[1].Value) "" (name + ": no script errors (no injected script ran)")
                        Expect.stringContains dom "&lt;script&gt;alert" (name + ": the token shows as text")
                        Expect.isFalse (dom.Contains "<script>alert") (name + ": never as an element"))
            }
        ]
    ]
