/// The attribution-graph benchmark: build time of `Transcoders.Circuits.AttributionGraph.build` against prompt
/// length, against the same batched-backward algorithm in PyTorch (bench/pytorch/graph_build.py) reading the same
/// model and transcoder files, interleaved in one run; the scaling exponent of each side; and the agreement of the
/// two adjacency matrices on the shortest prompt.
module Transcoders.Bench.GraphBench

open System
open System.Diagnostics
open System.IO
open System.Text.Json
open TorchSharp
open Transcoders.Models
open Transcoders.Coders
open Transcoders.Circuits
open Transcoders.Bench.Stats

/// The small model and transcoders the benchmark makes when no files are given.
type FixtureConfig =
    { Layers: int
      DModel: int
      Heads: int
      Context: int
      Vocab: int
      /// Features per transcoder.
      DSae: int
      /// TopK's k (0: ReLU).
      K: int
      /// ReLU only: shift every encoder bias so that about this many features fire per token (calibrated on a
      /// random prompt through the model); 0 leaves the random coder as it is (about half its features fire).
      Active: int
      Seed: int64 }

    static member Default = { Layers = 4; DModel = 128; Heads = 4; Context = 256; Vocab = 4096; DSae = 1024; K = 16; Active = 0; Seed = 0L }

    /// GPT-2 small's shape (12 layers, d 768, 12 heads, vocabulary 50,257, context 1,024) with per-layer ReLU
    /// transcoders of 24,576 features, about 32 active per token and layer; random weights.
    static member Gpt2Small =
        { Layers = 12; DModel = 768; Heads = 12; Context = 1024; Vocab = 50257; DSae = 24576; K = 0; Active = 32; Seed = 0L }

/// Benchmark settings.
type Options =
    { /// Our checkpoint folder; None: make one (FixtureConfig) in a temporary folder.
      Model: string option
      /// Transcoder files (one per layer, or one cross-layer transcoder); empty: made with the model.
      Coders: string list
      Fixture: FixtureConfig
      Lengths: int list
      Rounds: int
      Warmup: int
      Threads: int
      Device: string
      /// Targets per backward pass.
      BatchSize: int
      /// Influence-ordered cap on feature nodes (None: every active feature).
      MaxFeatureNodes: int option
      /// Each backward pass over its batch's causal cone only (GraphConfig.CausalCone), on both sides; false: one
      /// forward over the whole prompt and model shared by every pass (circuit-tracer's way).
      CausalCone: bool
      /// Also prune each graph (0.8 of node influence, 0.98 of edge influence), timed separately.
      Prune: bool
      /// Zero coder activations and errors at position 0 on both sides (GraphConfig.Default's ZeroPositions = [0],
      /// circuit-tracer's default); false keeps every position.
      ZeroFirst: bool
      /// Check, at every length, that both sides' adjacencies and pruned graphs agree (one untimed build each).
      Agreement: bool
      /// Also measure the bf16 backward against float32 on our side (error and time, shortest prompt).
      Bf16: bool
      Python: string
      Script: string
      /// Where the fixture and the Python adjacency go (None: a fresh temporary folder).
      WorkDir: string option }

    static member Default =
        { Model = None
          Coders = []
          Fixture = FixtureConfig.Default
          Lengths = [ 16; 64; 256 ]
          Rounds = 3
          Warmup = 1
          Threads = 2
          Device = "cpu"
          BatchSize = GraphConfig.Default.BatchSize
          MaxFeatureNodes = GraphConfig.Default.MaxFeatureNodes
          CausalCone = GraphConfig.Default.CausalCone
          Prune = true
          ZeroFirst = true
          Agreement = true
          Bf16 = true
          Python = "/usr/bin/python3"
          Script = "bench/pytorch/graph_build.py"
          WorkDir = None }

/// Writes a seeded random GPT-2-style model (pre-LN LayerNorm, learned positions, gelu_new, tied embedding) and
/// one seeded TopK (or ReLU) transcoder per layer into `dir` in our formats; returns (model folder, coder folders).
/// Random weights are enough for timing and for checking that two implementations agree.
let makeFixture (dir: string) (f: FixtureConfig) : string * string list =
    let device = torch.CPU
    Transcoders.Tensors.Device.seed f.Seed
    let config =
        { TransformerConfig.gpt2 with
            DModel = f.DModel; NLayers = f.Layers; NHeads = f.Heads; NKvHeads = f.Heads; DMlp = 4 * f.DModel
            NCtx = f.Context; VocabSize = f.Vocab; Dropout = 0.0 }
    let modelDir = Path.Combine(dir, "model")
    use m = Transformer.create config device
    m.eval ()
    Checkpoint.save modelDir Checkpoint.Metadata.Empty m
    // MLP inputs of a random prompt, to calibrate ReLU biases
    let calibration =
        if f.K = 0 && f.Active > 0 then
            use _ = torch.no_grad ()
            let rng = Random(int f.Seed + 17)
            let n = min f.Context 128
            use tokens = torch.tensor(Array.init (4 * n) (fun _ -> int64 (rng.Next f.Vocab))).reshape(4L, int64 n)
            use run = Transformer.runWithCache m [ for l in 0 .. f.Layers - 1 -> HookNames.mlpIn l ] tokens
            Some [| for l in 0 .. f.Layers - 1 -> run[HookNames.mlpIn l].reshape(-1L, int64 f.DModel).clone() |]
        else None
    let coders =
        [ for l in 0 .. f.Layers - 1 ->
            let cfg =
                { CoderConfig.transcoder "graph-bench" l f.DModel f.DSae with
                    Activation = (if f.K > 0 then TopK f.K else ReLU) }
            let path = Path.Combine(dir, sprintf "transcoder-%d" l)
            use c = Coder.create cfg device
            match calibration with
            | Some xs ->
                // shift b_enc by the (1 − Active/d_sae) quantile of the pre-activations: ~Active features fire per token
                use _ = torch.no_grad ()
                use pre = c.PreActivations(xs[l].unsqueeze 0)
                use flat = pre.reshape(-1L)
                let keep = int64 f.Active * xs[l].shape[0]
                let struct (top, topIdx) = flat.topk(int keep)
                use top = top
                use topIdx = topIdx
                let tau = top.min().item<float32> ()
                c.BEnc.sub_(Scalar.op_Implicit (float tau)) |> ignore
            | None -> ()
            CoderFile.save path c
            path ]
    calibration |> Option.iter (Array.iter (fun t -> t.Dispose()))
    modelDir, coders

/// Their side: graph_build.py in server mode, one JSON command per line.
type Theirs(o: Options, model: string, coders: string list) =
    let psi =
        ProcessStartInfo(
            o.Python,
            [ yield o.Script
              yield! [ "--server"; "--model"; model; "--coders" ]
              yield! coders
              yield! [ "--device"; o.Device; "--threads"; string o.Threads; "--batch-size"; string o.BatchSize
                       "--max-feature-nodes"; string (defaultArg o.MaxFeatureNodes 0)
                       // our token nodes are the whole embedding (token + learned position), hook_resid_pre 0
                       "--embed-with-positions" ]
              if o.Prune then yield "--prune"
              if o.ZeroFirst then yield "--zero-first-position"
              if o.CausalCone then yield "--causal-cone" ],
            RedirectStandardInput = true,
            RedirectStandardOutput = true,
            UseShellExecute = false)
    do
        psi.Environment["OMP_WAIT_POLICY"] <- "PASSIVE"
        if not (File.Exists o.Script) then failwithf "cannot find %s (run from the repository root or pass --script)" o.Script
    let proc = Process.Start psi
    let readJson () =
        match proc.StandardOutput.ReadLine() with
        | null -> failwithf "%s exited (code %s) without answering" o.Script (if proc.HasExited then string proc.ExitCode else "?")
        | line ->
            let e = JsonDocument.Parse(line).RootElement.Clone()
            match e.TryGetProperty "error" with
            | true, msg -> failwithf "%s: %s" o.Script (msg.GetString())
            | _ -> e
    let hello = readJson ()
    let ask (cmd: string) =
        proc.StandardInput.WriteLine cmd
        proc.StandardInput.Flush()
        readJson ()
    member _.Info = hello
    /// Builds the graph `reps` times; the answer has "seconds" and the graph's counts.
    /// `maxFeatures` overrides the server's cap for this build (Some 0: every active feature).
    member _.Build(tokens: int[], reps: int, save: string option, ?maxFeatures: int) =
        let save = match save with Some p -> JsonSerializer.Serialize p | None -> "null"
        let cap = match maxFeatures with Some m -> sprintf ", \"max_feature_nodes\": %d" m | None -> ""
        ask (sprintf """{"cmd": "build", "tokens": %s, "reps": %d, "save": %s%s}""" (JsonSerializer.Serialize tokens) reps save cap)
    member _.Matmul(n: int, reps: int) =
        let r = ask (sprintf """{"cmd": "matmul", "n": %d, "reps": %d}""" n reps)
        [| for s in r.GetProperty("gflops").EnumerateArray() -> s.GetDouble() |]
    member _.Memory() = ask """{"cmd": "memory"}"""
    /// Resets the child's resident high-water mark (VmHWM).
    member _.ResetPeak() = ask """{"cmd": "reset_peak"}""" |> ignore
    interface IDisposable with
        member _.Dispose() =
            try
                proc.StandardInput.WriteLine """{"cmd": "quit"}"""
                proc.StandardInput.Flush()
                if not (proc.WaitForExit 10_000) then proc.Kill()
            with _ -> ()
            proc.Dispose()

/// A seeded random prompt of `n` token ids below `vocab`.
let prompt (seed: int) (vocab: int) (n: int) = let r = Random(seed) in Array.init n (fun _ -> r.Next vocab)

/// Least-squares fit of log t = log c + α·log n: (α, c).
let powerFit (points: (float * float) list) =
    let xs = points |> List.map (fst >> log) |> Array.ofList
    let ys = points |> List.map (snd >> log) |> Array.ofList
    let n = float xs.Length
    let mx, my = Array.average xs, Array.average ys
    let sxy = Array.fold2 (fun acc x y -> acc + (x - mx) * (y - my)) 0.0 xs ys
    let sxx = xs |> Array.sumBy (fun x -> (x - mx) ** 2.0)
    if n < 2.0 || sxx = 0.0 then nan, nan
    else
        let a = sxy / sxx
        a, exp (my - a * mx)

let private sync (device: torch.Device) =
    if device.``type`` = DeviceType.CUDA then torch.cuda.synchronize device

/// Resident memory (VmRSS) or its high-water mark since the last reset (VmHWM) of this process, in MiB.
let procStatusMiB (field: string) =
    File.ReadLines "/proc/self/status"
    |> Seq.tryFind (fun l -> l.StartsWith(field + ":"))
    |> Option.map (fun l -> float (l.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1]) / 1024.0)
    |> Option.defaultValue nan

/// Resets this process's resident high-water mark (VmHWM) to its current resident size.
let resetPeak () = try File.WriteAllText("/proc/self/clear_refs", "5") with _ -> ()

/// Our side: the model and coders loaded once; `AttributionGraph.build` per prompt.
type Ours(o: Options, modelPath: string, coderPaths: string list, device: torch.Device) =
    let model, _ = ModelFiles.load modelPath device
    let coders = coderPaths |> List.map (fun p -> CoderFile.load p device)
    let config maxFeatures =
        { GraphConfig.Default with
            BatchSize = o.BatchSize; MaxFeatureNodes = maxFeatures; CausalCone = o.CausalCone; MemoryBudgetBytes = None
            ZeroPositions = (if o.ZeroFirst then [ 0 ] else []) }
    member _.Model = model
    member _.Coders = coders
    member _.Config(maxFeatures: int option) = config maxFeatures
    /// Builds the graph once: (seconds, graph).
    member _.Build(tokens: int[], ?maxFeatures: int option, ?dtype: torch.ScalarType) =
        let cfg = { config (defaultArg maxFeatures o.MaxFeatureNodes) with BackwardDType = dtype }
        sync device
        let sw = Stopwatch.StartNew()
        let g = AttributionGraph.build model coders tokens cfg
        sync device
        sw.Elapsed.TotalSeconds, g
    /// Prunes a graph with circuit-tracer's thresholds on the benchmark's device: (seconds, pruned graph).
    member _.Prune(g: Graph) =
        sync device
        let sw = Stopwatch.StartNew()
        let pg = Pruning.prune { PruneConfig.Default with Device = device } g
        sync device
        sw.Elapsed.TotalSeconds, pg
    interface IDisposable with
        member _.Dispose() =
            for c in coders do (c :> IDisposable).Dispose()
            model.Dispose()

/// Edges of a graph: the non-zero weights of its blocks.
let edgeCount (g: Graph) : int64 =
    g.Blocks |> Array.sumBy (fun b -> b.Weights |> Array.sumBy (fun w -> if w <> 0.0f then 1L else 0L))

/// How far the PyTorch adjacency (saved by graph_build.py) is from ours: nodes are matched by (layer, position,
/// feature), error and token nodes by (layer, position), logits by token. Returns (max |Δ| / max |A|, the largest
/// relative error among entries of at least 1e-3·max |A|, entries compared, whether the pruned graphs keep the same
/// nodes and edges, and a note on any mismatch).
let agreement (g: Graph) (pruned: PrunedGraph option) (theirsPath: string) =
    use reader = Transcoders.Files.Safetensors.Reader.Open theirsPath
    use adjT = reader.Tensor("adjacency").to_type(torch.float64)
    use featT = reader.Tensor("features")
    use logitT = reader.Tensor("logit_tokens")
    let n = int adjT.shape[0]
    let theirs = adjT.data<float>().ToArray()
    let feats = featT.data<int64>().ToArray()
    let nF = int featT.shape[0]
    let logitTokens = logitT.data<int64>().ToArray() |> Array.map int
    let p, nL = g.NPositions, g.NLayers
    let index = Graph.featureIndex g
    let notes = ResizeArray<string>()
    if nF <> g.Features.Length then notes.Add(sprintf "feature nodes: ours %d, PyTorch %d" g.Features.Length nF)
    if logitTokens <> (g.Logits |> Array.map (fun l -> l.Token)) then
        notes.Add(sprintf "logit tokens: ours %A, PyTorch %A" (g.Logits |> Array.map (fun l -> l.Token)) logitTokens)
    // their node id -> ours (or -1)
    let toOurs =
        Array.init n (fun i ->
            if i < nF then
                match index.TryGetValue({ Layer = int feats[3 * i]; Position = int feats[3 * i + 1]; Feature = int feats[3 * i + 2] }) with
                | true, j -> j
                | _ -> -1
            elif i < nF + (nL + 1) * p then g.ErrorStart + (i - nF)
            else
                let k = i - nF - (nL + 1) * p
                match g.Logits |> Array.tryFindIndex (fun l -> l.Token = logitTokens[k]) with
                | Some j -> g.LogitStart + j
                | None -> -1)
    let unmatched = toOurs |> Array.filter ((=) -1) |> Array.length
    if unmatched > 0 then notes.Add(sprintf "%d PyTorch nodes have no counterpart in our graph" unmatched)
    let ours = Graph.toDense g
    let maxAbs = theirs |> Array.fold (fun m v -> max m (abs v)) 0.0
    let mutable maxDiff, maxRel, compared = 0.0, 0.0, 0L
    for t in 0 .. n - 1 do
        let ot = toOurs[t]
        if ot >= 0 then
            for s in 0 .. n - 1 do
                let os = toOurs[s]
                if os >= 0 then
                    let a, b = float ours[ot, os], theirs[t * n + s]
                    let d = abs (a - b)
                    compared <- compared + 1L
                    maxDiff <- max maxDiff d
                    if abs b >= 1e-3 * maxAbs then maxRel <- max maxRel (d / abs b)
    let samePruned =
        match pruned with
        | Some pg when reader.Entries |> Seq.exists (fun e -> e.Name = "pruned_nodes") ->
            use kn = reader.Tensor("pruned_nodes")
            use ke = reader.Tensor("pruned_edges")
            let theirNodes = kn.data<int64>().ToArray() |> Array.map (fun i -> toOurs[int i]) |> Set.ofArray
            let e = ke.data<int64>().ToArray()
            let theirEdges = Set.ofSeq (seq { for k in 0 .. e.Length / 2 - 1 -> toOurs[int e[2 * k]], toOurs[int e[2 * k + 1]] })
            let ourNodes = Set.ofArray pg.KeptNodes
            let ourEdges = pg.Edges |> Array.map (fun x -> x.Target, x.Source) |> Set.ofArray
            let nodesSame, edgesSame = theirNodes = ourNodes, theirEdges = ourEdges
            if not nodesSame then notes.Add(sprintf "pruned nodes differ: %d only ours, %d only PyTorch" (Set.difference ourNodes theirNodes).Count (Set.difference theirNodes ourNodes).Count)
            if not edgesSame then notes.Add(sprintf "pruned edges differ: %d only ours, %d only PyTorch" (Set.difference ourEdges theirEdges).Count (Set.difference theirEdges ourEdges).Count)
            Some (nodesSame && edgesSame)
        | _ -> None
    (if maxAbs > 0.0 then maxDiff / maxAbs else 0.0), maxRel, compared, samePruned, String.concat "; " notes

/// max |a − b| / max |b| over two graphs with the same nodes (ours in two dtypes), and the median relative error of
/// entries of at least 1e-3·max |b|.
let dtypeError (a: Graph) (b: Graph) =
    let da, db = Graph.toDense a, Graph.toDense b
    let maxAbs = db |> Seq.cast<float32> |> Seq.fold (fun m v -> max m (abs v)) 0.0f |> float
    let mutable maxDiff = 0.0
    let rels = ResizeArray<float>()
    for t in 0 .. Array2D.length1 db - 1 do
        for s in 0 .. Array2D.length2 db - 1 do
            let x, y = float da[t, s], float db[t, s]
            maxDiff <- max maxDiff (abs (x - y))
            if abs y >= 1e-3 * maxAbs then rels.Add(abs (x - y) / abs y)
    maxDiff / maxAbs, median rels

/// Runs the comparison and prints the table.
let run (o: Options) : int =
    let device = Transcoders.Tensors.Device.resolve (Transcoders.Tensors.Device.parse o.Device)
    torch.set_num_threads o.Threads
    let work =
        match o.WorkDir with
        | Some d -> Directory.CreateDirectory d |> ignore; d
        | None -> Directory.CreateTempSubdirectory("graph-bench-").FullName
    let modelPath, coderPaths =
        match o.Model with
        | Some m ->
            if o.Coders.IsEmpty then failwith "--model needs --coders (the transcoders of that model)"
            m, o.Coders
        | None ->
            let f = o.Fixture
            printfn "fixture (seed %d): %d layers, d_model %d, %d heads, context %d, vocab %d; transcoders d_sae %d, %s; in %s"
                f.Seed f.Layers f.DModel f.Heads f.Context f.Vocab f.DSae
                (if f.K > 0 then sprintf "TopK k=%d" f.K elif f.Active > 0 then sprintf "ReLU, ~%d active per token (calibrated)" f.Active else "ReLU") work
            let existing = Path.Combine(work, "model", "config.json")
            if File.Exists existing then
                printfn "  (reusing the fixture already in %s)" work
                Path.Combine(work, "model"), [ for l in 0 .. f.Layers - 1 -> Path.Combine(work, sprintf "transcoder-%d" l) ]
            else makeFixture work f
    use ours = new Ours(o, modelPath, coderPaths, device)
    let vocab, ctx = ours.Model.Config.VocabSize, ours.Model.Config.NCtx
    match o.Lengths |> List.tryFind (fun n -> n < 1 || n > ctx) with
    | Some n -> failwithf "prompt length %d is outside 1..%d (the model's context)" n ctx
    | None -> ()
    use theirs = new Theirs(o, modelPath, coderPaths)
    printfn "graph build: batch %d targets per backward pass, feature cap %s, causal cones %b, zeroed position 0 %b, %s, %d threads; OMP_WAIT_POLICY=%s"
        o.BatchSize (match o.MaxFeatureNodes with Some n -> string n | None -> "none") o.CausalCone o.ZeroFirst (string device) o.Threads
        (Environment.GetEnvironmentVariable "OMP_WAIT_POLICY")
    printfn "PyTorch: %s" (theirs.Info.ToString())
    let matmulLine =
        let theirsRate = median (theirs.Matmul(1024, 5))
        let oursRate =
            use a = torch.randn(1024L, 1024L, device = device)
            use b = torch.randn(1024L, 1024L, device = device)
            (use w = a.matmul(b) in ())
            median [ for _ in 1 .. 5 ->
                        sync device
                        let sw = Stopwatch.StartNew()
                        use c = a.matmul(b)
                        sync device
                        2.0 * 1024.0 ** 3.0 / sw.Elapsed.TotalSeconds / 1e9 ]
        sprintf "matmul 1024³ fp32 (before the rounds): ours %.1f GFLOP/s, PyTorch %.1f GFLOP/s" oursRate theirsRate
    printfn "%s" matmulLine
    // agreement on the shortest prompt, every active feature (no influence-ordered cap, so the node sets are equal)
    let shortest = List.min o.Lengths
    let agreementLine =
        let tokens = prompt shortest vocab shortest
        let path = Path.Combine(work, sprintf "pytorch-adjacency-%d-all.safetensors" shortest)
        let _, g = ours.Build(tokens, None)
        theirs.Build(tokens, 1, Some path, 0) |> ignore
        let dMax, rel, compared, _, notes = agreement g None path
        File.Delete path
        sprintf "agreement (%d tokens, all %d active features, %d entries): max |ours − PyTorch| / max |A| = %s; largest relative error among entries ≥ 1e-3·max |A|: %s%s"
            shortest g.Features.Length compared (dMax.ToString "0.0e+0") (rel.ToString "0.0e+0") (if notes = "" then "" else "; " + notes)
    printfn "%s" agreementLine
    Console.Out.Flush()
    let bf16Line =
        if not o.Bf16 then None
        else
            let tokens = prompt shortest vocab shortest
            let s32, g32 = ours.Build(tokens, None)
            let s16, g16 = ours.Build(tokens, None, torch.bfloat16)
            let s32b, _ = ours.Build(tokens, None)
            let err, med = dtypeError g16 g32
            Some (sprintf "bf16 backward (%d tokens, all features): max |bf16 − fp32| / max |A| = %s, median relative error of entries ≥ 1e-3·max |A| = %s; build %.3f s vs fp32 %.3f s"
                    shortest (err.ToString "0.0e+0") (med.ToString "0.0e+0") s16 (min s32 s32b))
    bf16Line |> Option.iter (printfn "%s")
    let rows = ResizeArray()
    for n in o.Lengths do
        let tokens = prompt n vocab n
        for _ in 1 .. o.Warmup do
            ours.Build tokens |> ignore
            theirs.Build(tokens, 1, None) |> ignore
        let so, st, ratios, po, pt = ResizeArray(), ResizeArray(), ResizeArray(), ResizeArray(), ResizeArray()
        let mutable last = None
        let mutable lastPruned = None
        let mutable info = None
        GC.Collect()
        resetPeak ()
        theirs.ResetPeak()
        let rssBefore, theirsBefore = procStatusMiB "VmRSS", theirs.Memory().GetProperty("rss_mib").GetDouble()
        for r in 1 .. o.Rounds do
            let runOurs () =
                last <- None
                lastPruned <- None
                let s, g = ours.Build tokens
                last <- Some g
                if o.Prune then
                    let sp, pg = ours.Prune g
                    po.Add sp
                    lastPruned <- Some pg
                s
            let runTheirs () =
                let answer = theirs.Build(tokens, 1, None)
                info <- Some answer
                let total = answer.GetProperty("seconds").Item(0).GetDouble()
                if o.Prune then
                    let sp = answer.GetProperty("phases").GetProperty("prune").GetDouble()
                    pt.Add sp
                    total - sp
                else total
            let a, b = if r % 2 = 1 then let a = runOurs () in a, runTheirs () else let b = runTheirs () in runOurs (), b
            so.Add a; st.Add b; ratios.Add(b / a)
            printfn "  %d tokens, round %d: build ours %.3f s, PyTorch %.3f s, ratio %.2f%s; ours resident %.0f MiB"
                n r a b (b / a) (if o.Prune then sprintf "; prune ours %.3f s, PyTorch %.3f s" po[po.Count - 1] pt[pt.Count - 1] else "")
                (procStatusMiB "VmRSS")
            Console.Out.Flush()
        let peakOurs = procStatusMiB "VmHWM"
        let peakTheirs = theirs.Memory().GetProperty("peak_rss_mib").GetDouble()
        let g, info = last.Value, info.Value
        let pruned =
            match lastPruned with
            | Some pg ->
                Some(pg.KeptNodes.Length, pg.Edges.Length, info.GetProperty("pruned_nodes").GetInt32(),
                     info.GetProperty("pruned_edges").GetInt32(), median po, median pt)
            | None -> None
        // agreement at this length (one more, untimed build on their side that saves its adjacency)
        let agree =
            if not o.Agreement then None
            else
                let path = Path.Combine(work, sprintf "pytorch-adjacency-%d.safetensors" n)
                theirs.Build(tokens, 1, Some path) |> ignore
                let dMax, rel, _, same, notes = agreement g lastPruned path
                File.Delete path
                Some (dMax, rel, same, notes)
        rows.Add((n, g.Stats.ActiveFeatures, g.Features.Length, g.NodeCount, edgeCount g,
                  info.GetProperty("nodes").GetInt32(), info.GetProperty("edges").GetInt64(), median so, median st, median ratios),
                 pruned, (rssBefore, peakOurs, theirsBefore, peakTheirs), agree)
        last <- None
        lastPruned <- None
    printfn ""
    let both (ours: int64) (py: int64) = if ours = py then string ours else sprintf "%d (PyTorch %d)" ours py
    printfn "| tokens | active features | feature nodes | nodes | edges | build ours (s) | build PyTorch (s) | PyTorch / ours | peak RSS ours (MiB) | peak RSS PyTorch (MiB) |%s%s"
        (if o.Prune then " pruned nodes | pruned edges | prune ours (s) | prune PyTorch (s) |" else "")
        (if o.Agreement then " max Δ / max A | same pruned graph |" else "")
    printfn "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|%s%s" (if o.Prune then "---:|---:|---:|---:|" else "") (if o.Agreement then "---:|---|" else "")
    for (n, active, fnodes, nodes, edges, pyNodes, pyEdges, a, b, r), pruned, (_, peakO, _, peakT), agree in rows do
        let pruneCells =
            match pruned with
            | Some (kn, ke, pkn, pke, sa, sb) -> sprintf " %s | %s | %.3f | %.3f |" (both kn pkn) (both ke pke) sa sb
            | None -> ""
        let agreeCells =
            match agree with
            | Some (d, _, same, notes) ->
                sprintf " %s | %s |" (d.ToString "0.0e+0")
                    (match same with Some true -> "yes" | Some false -> "no" | None -> "–")
                + (if notes = "" then "" else " (" + notes + ")")
            | None -> ""
        printfn "| %d | %d | %d | %s | %s | %.3f | %.3f | %.2f | %.0f | %.0f |%s%s" n active fnodes (both nodes pyNodes) (both edges pyEdges) a b r peakO peakT pruneCells agreeCells
    printfn ""
    let fit (pick: _ -> float) =
        powerFit [ for (n, _, _, _, _, _, _, _, _, _), _, _, _ as row in rows -> float n, pick row ]
    let ao, co = fit (fun ((_, _, _, _, _, _, _, a, _, _), _, _, _) -> a)
    let at, ct = fit (fun ((_, _, _, _, _, _, _, _, b, _), _, _, _) -> b)
    printfn "scaling of the build, time ≈ c·tokens^α (least squares on log-log over %s tokens): ours α = %.2f (c = %.2e s), PyTorch α = %.2f (c = %.2e s)"
        (o.Lengths |> List.map string |> String.concat ", ") ao co at ct
    printfn "%s" agreementLine
    bf16Line |> Option.iter (printfn "%s")
    printfn "%s" matmulLine
    for (n, _, _, _, _, _, _, _, _, _), _, (rb, po, tb, pt), _ in rows do
        printfn "resident memory at %d tokens: ours %.0f MiB before the rounds, peak %.0f MiB; PyTorch %.0f MiB before, peak %.0f MiB; peak ratio ours / PyTorch %.2f"
            n rb po tb pt (po / pt)
    let wholeTheirs = theirs.Memory().GetProperty("max_rss_mib").GetDouble()
    printfn "whole processes: ours peak %.0f MiB, PyTorch peak %.0f MiB" (peakWorkingSetMiB ()) wholeTheirs
    printfn "medians over %d rounds after %d warm-up build(s) per side; ratio column: median of paired rounds; peaks: VmHWM over that length's rounds (reset before them)" o.Rounds o.Warmup
    0

/// Memory over repeated builds in one process: resident memory after each of `builds` builds of the same prompt, no
/// collection forced and after one (settled), and the tensors alive on this thread (a tensor left to the finaliser counts).
let memory (o: Options) (length: int) (builds: int) : int =
    let device = Transcoders.Tensors.Device.resolve (Transcoders.Tensors.Device.parse o.Device)
    torch.set_num_threads o.Threads
    let work =
        match o.WorkDir with
        | Some d -> Directory.CreateDirectory d |> ignore; d
        | None -> Directory.CreateTempSubdirectory("graph-memory-").FullName
    let modelPath, coderPaths =
        match o.Model with
        | Some m -> m, o.Coders
        | None ->
            let existing = Path.Combine(work, "model", "config.json")
            if File.Exists existing then Path.Combine(work, "model"), [ for l in 0 .. o.Fixture.Layers - 1 -> Path.Combine(work, sprintf "transcoder-%d" l) ]
            else makeFixture work o.Fixture
    use ours = new Ours(o, modelPath, coderPaths, device)
    let tokens = prompt length ours.Model.Config.VocabSize length
    let live () = TorchSharp.DisposeScopeManager.Statistics.ThreadTotalLiveCount
    let samples = ResizeArray<float>()
    let live0 = live ()
    printfn "graph-memory: %d builds of a %d-token prompt (+ pruning); after each, resident memory as it stands, then after a managed collection and malloc_trim (settled), and the tensors alive on this thread" builds length
    let raw = ResizeArray<float>()
    for i in 1 .. builds do
        let s, sp, nF, kept =
            let s, g = ours.Build tokens
            let sp, pg = ours.Prune g
            s, sp, g.Features.Length, pg.KeptNodes.Length
        let rss = procStatusMiB "VmRSS"
        raw.Add rss
        // the graphs are managed arrays (about 100 MB at 256 tokens) that the GC frees when it likes, and glibc keeps
        // freed chunks in its arenas: settle both before the sample that must stay flat
        GC.Collect()
        GC.WaitForPendingFinalizers()
        GC.Collect()
        Transcoders.Native.Malloc.trim () |> ignore
        let settled = procStatusMiB "VmRSS"
        samples.Add settled
        printfn "  build %2d: %.2f s (+ prune %.2f s), %d feature nodes, %d kept; resident %.0f MiB, settled %.0f MiB, peak %.0f MiB; tensors alive on this thread %+d"
            i s sp nF kept rss settled (procStatusMiB "VmHWM") (live () - live0)
        Console.Out.Flush()
    // build 1 also warms libtorch's and glibc's caches: the trend is measured from build 2 on, as the mean of the
    // last three settled samples against the mean of the first three after the warm-up
    let after = samples |> Seq.skip (min 1 (samples.Count - 1)) |> Array.ofSeq
    let m = min 3 after.Length
    let early, late = Array.average after[.. m - 1], Array.average after[after.Length - m ..]
    let trend = late / early - 1.0
    let lo, hi = Array.min after, Array.max after
    let ok = abs trend <= 0.05 && live () = live0
    printfn "settled resident memory: build 1 %.0f MiB (warm-up); builds 2–%d %.0f–%.0f MiB; mean of the last %d %.0f MiB against the first %d after the warm-up %.0f MiB: %+.1f%%; unsettled %.0f–%.0f MiB"
        samples[0] builds lo hi m late m early (100.0 * trend) (Seq.min raw) (Seq.max raw)
    printfn "tensors alive on this thread after the builds: %+d against before (0: every tensor disposed) -> %s" (live () - live0) (if ok then "flat (trend within ±5%), nothing left to finalizers" else "NOT flat or tensors left")
    if ok then 0 else 1

/// Long prompts, our side only: for each length the memory estimate (printed before the build), the build's time
/// and peak resident memory, the graph's size, and pruning.
let long (o: Options) : int =
    let device = Transcoders.Tensors.Device.resolve (Transcoders.Tensors.Device.parse o.Device)
    torch.set_num_threads o.Threads
    let work =
        match o.WorkDir with
        | Some d -> Directory.CreateDirectory d |> ignore; d
        | None -> Directory.CreateTempSubdirectory("graph-long-").FullName
    let f = o.Fixture
    let modelPath, coderPaths =
        match o.Model with
        | Some m -> m, o.Coders
        | None ->
            printfn "fixture (seed %d): %d layers, d_model %d, %d heads, context %d, vocab %d; transcoders d_sae %d, %s; in %s"
                f.Seed f.Layers f.DModel f.Heads f.Context f.Vocab f.DSae (if f.K > 0 then sprintf "TopK k=%d" f.K else "ReLU") work
            let existing = Path.Combine(work, "model", "config.json")
            if File.Exists existing then Path.Combine(work, "model"), [ for l in 0 .. f.Layers - 1 -> Path.Combine(work, sprintf "transcoder-%d" l) ]
            else makeFixture work f
    use ours = new Ours(o, modelPath, coderPaths, device)
    let model, coders = ours.Model, ours.Coders
    printfn "graph-long: batch %d, feature cap %s, causal cones %b, %d threads" o.BatchSize (match o.MaxFeatureNodes with Some n -> string n | None -> "none") o.CausalCone o.Threads
    let rows = ResizeArray()
    for n in o.Lengths do
        let tokens = prompt n model.Config.VocabSize n
        // the previous length's graph and tensors: freed by the GC and handed back by glibc before the baseline, so
        // that the build's peak above it counts what the build takes, not what it reuses from earlier builds
        GC.Collect()
        GC.WaitForPendingFinalizers()
        GC.Collect()
        Transcoders.Native.Malloc.trim () |> ignore
        let baseline = procStatusMiB "VmRSS"
        resetPeak ()
        let config = ours.Config o.MaxFeatureNodes
        let sw = Stopwatch.StartNew()
        use lr = LocalReplacement.create model coders tokens
        let setup = sw.Elapsed.TotalSeconds
        let est = AttributionGraph.estimateFor lr config
        let mib (b: int64) = float b / 1048576.0
        printfn "  %d tokens: estimate %.0f MiB (clean run and tables %.0f, widest batch %.0f, adjacency, ranking and graph copy %.0f; bound %.0f) above the %.0f MiB resident before the build"
            n (mib est.TotalBytes) (mib est.CleanRunBytes) (mib est.BatchBytes) (mib est.AdjacencyBytes) (mib est.BoundBytes) baseline
        Console.Out.Flush()
        let g = AttributionGraph.buildFrom lr config
        let build = sw.Elapsed.TotalSeconds
        let peakBuild = procStatusMiB "VmHWM"
        let sp, pg = ours.Prune g
        let peakAll = procStatusMiB "VmHWM"
        let used = peakBuild - baseline
        printfn "  %d tokens: built in %.1f s (clean run %.1f s, ranking %.1f s), %d of %d features, %d edges; pruned in %.1f s to %d nodes, %d edges; peak %.0f MiB (%.0f above the baseline: %.2f of the estimate), with pruning %.0f MiB"
            n build setup g.Stats.RankingSeconds g.Features.Length g.Stats.ActiveFeatures (edgeCount g) sp pg.KeptNodes.Length pg.Edges.Length
            peakBuild used (used / mib est.TotalBytes) peakAll
        Console.Out.Flush()
        rows.Add((n, g.Stats.ActiveFeatures, g.Features.Length, g.NodeCount, edgeCount g, mib est.TotalBytes, used, build, g.Stats.RankingSeconds, sp, pg.KeptNodes.Length, pg.Edges.Length, peakAll - baseline))
    printfn ""
    printfn "| tokens | active features | feature nodes | nodes | edges | estimate (MiB) | build peak above baseline (MiB) | measured / estimate | build (s) | of which ranking (s) | prune (s) | pruned nodes | pruned edges | peak with pruning (MiB) |"
    printfn "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for (n, act, fn, nodes, edges, est, used, build, rank, sp, kn, ke, withPrune) in rows do
        printfn "| %d | %d | %d | %d | %d | %.0f | %.0f | %.2f | %.1f | %.1f | %.1f | %d | %d | %.0f |" n act fn nodes edges est used (used / est) build rank sp kn ke withPrune
    let ta, _ = powerFit [ for (n, _, _, _, _, _, _, build, _, _, _, _, _) in rows -> float n, build ]
    let ma, _ = powerFit [ for (n, _, _, _, _, _, used, _, _, _, _, _, _) in rows -> float n, max 1.0 used ]
    printfn "growth over %s tokens: time ≈ c·tokens^%.2f, build memory ≈ c·tokens^%.2f" (o.Lengths |> List.map string |> String.concat ", ") ta ma
    0
