/// Training coders on a model: the activation store against the model's own hooks, one pass for many coders,
/// seeds; end-to-end runs on stories260K (files, metrics, exact resume, divergence); coders that do not fit; the
/// sweep's frontier.
module Transcoders.Tests.CoderJobTests

open System
open System.IO
open System.Text.Json
open Expecto
open TorchSharp
open Transcoders.Activations
open Transcoders.Coders
open Transcoders.Files
open Transcoders.Models
open Transcoders.Text
open Transcoders.Tests.Fixtures

let private modelPath = Paths.data "models/stories260K/stories260K.bin"

/// stories260K (loaded once; tests only read it).
let private model = lazy (let m, _ = ModelFiles.load modelPath torch.CPU in m.eval (); m)

/// A small text in stories260K's tokenizer: the first 200 stories of a shipped TinyStories file for training,
/// the next 40 for validation (BOS before each).
let private text =
    lazy
        (let tokenizer = ModelTokenizer.find modelPath
         let stories =
             Corpus.readStories (Path.Combine(Paths.data "tinystories", "ts_v2_valid_head_part2.txt.gz"))
             |> Seq.truncate 240 |> Array.ofSeq
             |> Array.map (fun s -> Tokenizer.encodeDocument tokenizer true false s.Text)
         { Name = "test stories"; Train = Array.concat stories[.. 199]; Validation = Array.concat stories[200 ..]
           Bos = Tokenizer.bos tokenizer; VocabSize = Tokenizer.vocabSize tokenizer })

let private bufferConfig rows batch seed =
    { ShuffleBufferConfig.Default with Rows = rows; BatchSize = batch; Seed = seed }

let private storeConfig ctx passRows rows batch seed =
    { StoreConfig.Default with Ctx = ctx; PassRows = passRows; TextSeed = seed; Buffer = bufferConfig rows batch seed }

/// A tensor's values as float32 (the activations' own precision), row-major.
let private values32 (t: torch.Tensor) =
    use c = t.detach().cpu().to_type(torch.float32).contiguous()
    c.data<float32>().ToArray()

/// Every batch of a buffer as hook -> values, up to `n` batches.
let private drain (buffer: ShuffleBuffer) (n: int) =
    [ for _ in 1 .. n do
        use _ = torch.NewDisposeScope()
        match buffer.Next() with
        | Some b -> yield b |> Map.map (fun _ t -> values32 t)
        | None -> () ]

let private mid l = sprintf "blocks.%d.hook_resid_mid" l
let private post l = sprintf "blocks.%d.hook_resid_post" l

let private storeTests =
    testList "activation store" [
        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 6 } "rows are the model's own hook activations, BOS left out" <| fun (seed: int) ->
            let m = model.Force()
            let rng = Random seed
            let ctx, passRows = 8 + rng.Next 40, 1 + rng.Next 4
            let layer = rng.Next m.Config.NLayers
            let spec = { Coders = [ CoderHooks.transcoder "tc" (CoderConfig.mlpInHook layer) (CoderConfig.mlpOutHook layer) ] }
            let store = ActivationStore(m, text.Force().Train, text.Force().Bos, spec, storeConfig ctx passRows 64L 16L (int64 seed))
            Expect.equal store.StopAtLayer (Some(layer + 1)) "the model stops after the coder's layer"
            let pass = int64 (rng.Next 50)
            use source = store.Source { Position.Start with Chunk = pass }
            use _ = torch.NewDisposeScope()
            let rows = (source.Read 100000L).Value
            use tokens = store.TokenRows pass
            use direct = Transformer.runWithCache m spec.Hooks tokens
            let keep = tokens.ne(torch.tensor(int64 (text.Force().Bos.Value))).reshape(-1L).nonzero().reshape(-1L)
            for h in spec.Hooks do
                let expected = direct[h].reshape(-1L, int64 m.Config.DModel).index_select(0L, keep)
                Expect.equal (values32 rows[h]) (values32 expected) (sprintf "%s rows equal runWithCache's, BOS positions dropped" h)
            Expect.equal (Rows.count rows) keep.shape[0] "one row per non-BOS token of the pass"

        test "input and target rows stay paired through the shuffle buffer" {
            let m = model.Force()
            let spec = { Coders = [ CoderHooks.transcoder "tc1" (mid 1) (CoderConfig.mlpOutHook 1); CoderHooks.sae "sae1" (post 1) ] }
            let store = ActivationStore(m, text.Force().Train, text.Force().Bos, spec, storeConfig 32 4 256L 32L 5L)
            use buffer = store.OpenBuffer()
            for b in drain buffer 20 do
                let sum = Array.map2 (+) b[mid 1] b[CoderConfig.mlpOutHook 1]
                Expect.equal b[post 1] sum "resid_post = resid_mid + mlp_out in every served row"
        }

        test "one model pass feeds every coder of every layer" {
            let m = model.Force()
            let t = text.Force()
            let multi =
                { Coders =
                    [ CoderHooks.transcoder "tc0" (CoderConfig.mlpInHook 0) (CoderConfig.mlpOutHook 0)
                      CoderHooks.transcoder "tc2" (CoderConfig.mlpInHook 2) (CoderConfig.mlpOutHook 2)
                      CoderHooks.sae "sae2" (CoderConfig.mlpOutHook 2)
                      CoderHooks.sae "res1" (post 1) ] }
            let single = { Coders = [ CoderHooks.sae "sae2" (CoderConfig.mlpOutHook 2) ] }
            let config = storeConfig 16 4 128L 16L 3L
            let a = ActivationStore(m, t.Train, t.Bos, multi, config)
            let b = ActivationStore(m, t.Train, t.Bos, single, config)
            Expect.equal a.StopAtLayer (Some 3) "stop after the last layer any coder needs"
            Expect.equal a.Hooks.Length 5 "mlp_out 2 is served once for the transcoder and the SAE"
            let batchesA = (use buf = a.OpenBuffer() in drain buf 30)
            let batchesB = (use buf = b.OpenBuffer() in drain buf 30)
            Expect.equal a.PassesRun b.PassesRun "four coders at three layers cost no more passes than one coder"
            Expect.isGreaterThan a.PassesRun 0L "passes ran"
            Expect.equal (batchesA |> List.map (fun x -> x[CoderConfig.mlpOutHook 2])) (batchesB |> List.map (fun x -> x[CoderConfig.mlpOutHook 2]))
                "the shared hook's batches are the same as with one coder"
        }

        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 4 } "batches are a function of the seeds" <| fun (seed: int) ->
            let m = model.Force()
            let t = text.Force()
            let spec = { Coders = [ CoderHooks.transcoder "tc" (CoderConfig.mlpInHook 1) (CoderConfig.mlpOutHook 1) ] }
            let rows = if seed % 2 = 0 then Packed else RandomWindows
            let config = { storeConfig 24 2 96L 12L (int64 seed) with Rows = rows }
            let run (c: StoreConfig) = (use buf = ActivationStore(m, t.Train, t.Bos, spec, c).OpenBuffer() in drain buf 12)
            let first = run config
            Expect.equal (run config) first "the same seeds give the same batches"
            Expect.notEqual (run { config with TextSeed = config.TextSeed + 1L }) first "another text seed gives other batches"
            Expect.notEqual (run { config with Buffer = { config.Buffer with Seed = config.Buffer.Seed + 1L } }) first
                "another buffer seed gives other batches"

        test "a disk cache is written once and then serves without the model" {
            let m = model.Force()
            let t = text.Force()
            use dir = new TempDir()
            let spec = { Coders = [ CoderHooks.transcoder "tc" (CoderConfig.mlpInHook 0) (CoderConfig.mlpOutHook 0) ] }
            let config = storeConfig 16 4 64L 16L 9L
            let cache = { Dir = dir.Path; Settings = { CacheConfig.Default with RowsPerShard = 100L; DType = Safetensors.F32 } }
            let first = ActivationStore(m, t.Train, t.Bos, spec, config)
            let a = (use buf = first.OpenBuffer(cache, 300L) in drain buf 10)
            Expect.isGreaterThan first.PassesRun 0L "the first run computes the activations"
            let second = ActivationStore(m, t.Train, t.Bos, spec, config)
            let b = (use buf = second.OpenBuffer(cache, 300L) in drain buf 10)
            Expect.equal second.PassesRun 0L "the second run reads the cache"
            Expect.equal b a "and gets the same batches"
            Expect.equal (CacheManifest.Read dir.Path).TotalRows 300L "the cache holds the rows asked for"
            let other = ActivationStore(m, t.Train, t.Bos, spec, { config with TextSeed = 10L })
            Expect.throws (fun () -> (other.OpenBuffer(cache, 300L) :> IDisposable).Dispose()) "a cache of other text is refused"
        }
    ]

// ---------------------------------------------------------------------------------------------- end to end

let private tinyJobs (steps: int) =
    let d = model.Force().Config.DModel
    let tc = { CoderConfig.transcoder "stories260K" 1 d 128 with Activation = TopK 8 }
    let sae = CoderConfig.sae "stories260K" (CoderConfig.mlpOutHook 1) 1 d 128
    [ { Name = "tc1"; Coder = tc; Train = { CoderDefaults.forCoder tc 0.0 steps 64 with LogEvery = 2 } }
      { Name = "sae1"; Coder = sae; Train = { CoderDefaults.forCoder sae 0.3 steps 64 with LogEvery = 2 } } ]

let private tinyRun (out: string) =
    { JobsConfig.Default out with
        Store = storeConfig 32 4 512L 64L 1L
        CheckpointEvery = 5
        Eval = { ActivationRows = 512L; SplicedRows = 6; SplicedBatch = 3; Joint = true } }

let private expectJobError (keywords: string list) (f: unit -> unit) =
    try
        f ()
        failtestf "expected a CoderJobError mentioning %A" keywords
    with CoderJobError msg ->
        for k in keywords do Expect.stringContains msg k "the error says what is wrong"

let private finite (v: float) = not (Double.IsNaN v || Double.IsInfinity v)

let private runTests =
    testList "train on a model" [
        test "a tiny run writes loadable coders, logs and metrics" {
            use dir = new TempDir()
            let jobs = tinyJobs 12
            let r = CoderJobs.run (model.Force()) (text.Force()) jobs (tinyRun dir.Path) ignore
            Expect.equal r.Steps 12 "steps"
            Expect.equal r.Tokens (12L * 64L) "tokens per coder"
            for j, res in List.zip jobs r.Coders do
                Expect.equal res.Name j.Name "results in job order"
                use c = CoderFile.load res.Path torch.CPU
                Expect.equal c.Config.DSae 128 "the saved coder's width"
                Expect.equal c.Config.HookOut j.Coder.HookOut "the saved coder's hooks"
                Expect.isTrue (c.Config.Scale.IsOne && c.Config.FoldedScale.IsSome) "the normalisation scale is folded into the weights"
                let m = res.Metrics.Value
                Expect.equal m.Tokens 512L "held-out rows"
                Expect.isTrue (finite m.Fvu && m.Fvu > 0.0 && finite m.L0 && m.L0 > 0.0) "finite FVU and L0"
                let s = res.Spliced.Value
                Expect.isTrue (finite s.CeSpliced && s.CeClean < s.CeAblated) "spliced CE, and ablation hurts"
                Expect.equal s.Predictions (6L * 31L) "every validation row's predictions"
                let log = File.ReadAllLines(Path.Combine(res.Path, "log.jsonl"))
                Expect.equal log.Length 7 "steps 0, 2, …, 10 and the last one (11) are logged"
                use e = JsonDocument.Parse(File.ReadAllText(Path.Combine(res.Path, "eval.json")))
                Expect.equal (e.RootElement.GetProperty("activations").GetProperty("fvu").GetDouble()) m.Fvu "eval.json holds the metrics"
            Expect.equal r.Coders[0].Metrics.Value.L0 8.0 "a TopK-8 coder has L0 8"
            Expect.isNone r.Joint "one transcoder: no joint replacement"
            let csv = File.ReadAllLines(Path.Combine(dir.Path, "metrics.csv"))
            Expect.equal csv.Length 3 "a header and one row per coder"
            Expect.stringContains (File.ReadAllText(Path.Combine(dir.Path, "metrics.md"))) "| tc1 | transcoder | 1 | 128 | k=8 |" "the markdown table"
        }

        test "an interrupted run resumes from its checkpoint bit for bit" {
            use straight = new TempDir()
            use broken = new TempDir()
            let jobs = tinyJobs 12
            CoderJobs.run (model.Force()) (text.Force()) jobs { tinyRun straight.Path with Eval = { JobEval.Default with ActivationRows = 0L; SplicedRows = 0 } } ignore |> ignore
            let crash = function
                | Trained(8, _, _, _) -> failwith "simulated crash"
                | _ -> ()
            Expect.throws (fun () -> CoderJobs.run (model.Force()) (text.Force()) jobs { tinyRun broken.Path with Eval = { JobEval.Default with ActivationRows = 0L; SplicedRows = 0 } } crash |> ignore)
                "the run stops at step 8"
            let r = CoderJobs.run (model.Force()) (text.Force()) jobs { tinyRun broken.Path with Eval = { JobEval.Default with ActivationRows = 0L; SplicedRows = 0 } } ignore
            Expect.equal r.ResumedFrom (Some 5) "resumed from the checkpoint at step 5"
            for j in jobs do
                let bytes (root: string) name = File.ReadAllBytes(Path.Combine(root, j.Name, name))
                Expect.equal (bytes broken.Path "coder.safetensors") (bytes straight.Path "coder.safetensors") (sprintf "%s: the same weights" j.Name)
                Expect.equal (bytes broken.Path "log.jsonl") (bytes straight.Path "log.jsonl") (sprintf "%s: the same log" j.Name)
            let changed = { tinyRun broken.Path with Store = { (tinyRun broken.Path).Store with TextSeed = 2L } }
            expectJobError [ "checkpoint of another run"; "text_seed" ] (fun () -> CoderJobs.run (model.Force()) (text.Force()) jobs changed ignore |> ignore)
        }

        test "coder runs keep several checkpoints; a damaged newest one is skipped, named, and the run resumes exactly" {
            use straight = new TempDir()
            use broken = new TempDir()
            let jobs = tinyJobs 12
            let noEval (d: string) = { tinyRun d with Eval = { JobEval.Default with ActivationRows = 0L; SplicedRows = 0 }; CheckpointEvery = 3 }
            CoderJobs.run (model.Force()) (text.Force()) jobs (noEval straight.Path) ignore |> ignore
            let crash = function
                | Trained(11, _, _, _) -> failwith "simulated crash"
                | _ -> ()
            Expect.throws (fun () -> CoderJobs.run (model.Force()) (text.Force()) jobs (noEval broken.Path) crash |> ignore) "the run stops at step 11"
            let root = Path.Combine(broken.Path, "checkpoint")
            Expect.equal (Transcoders.Training.Checkpointing.list root |> List.map fst) [ 3; 6; 9 ] "the newest three checkpoints are kept"
            let damaged = Path.Combine(root, "step_000009", "buffer.safetensors")
            let bytes = File.ReadAllBytes damaged
            bytes[bytes.Length - 5] <- bytes[bytes.Length - 5] ^^^ 0x01uy
            File.WriteAllBytes(damaged, bytes)
            let messages = Collections.Generic.List<string>()
            let r = CoderJobs.run (model.Force()) (text.Force()) jobs (noEval broken.Path) (function Preparing m -> messages.Add m | _ -> ())
            Expect.equal r.ResumedFrom (Some 6) "resumed from the newest intact checkpoint"
            let skipped = messages |> Seq.filter (fun m -> m.Contains "skipped checkpoint") |> List.ofSeq
            Expect.equal skipped.Length 1 "one checkpoint skipped"
            Expect.stringContains skipped.Head "step_000009" "names it"
            Expect.stringContains skipped.Head "buffer.safetensors" "names the damaged file"
            Expect.stringContains skipped.Head "SHA-256" "says what is wrong"
            for j in jobs do
                let bytes (root: string) name = File.ReadAllBytes(Path.Combine(root, j.Name, name))
                Expect.equal (bytes broken.Path "coder.safetensors") (bytes straight.Path "coder.safetensors") (sprintf "%s: the same weights" j.Name)
                Expect.equal (bytes broken.Path "log.jsonl") (bytes straight.Path "log.jsonl") (sprintf "%s: the same log" j.Name)
            // nothing intact: an error naming the checkpoint folder
            for (_, d) in Transcoders.Training.Checkpointing.list root do File.Delete(Path.Combine(d, "manifest.json"))
            expectJobError [ "no intact checkpoint"; "checkpoint" ] (fun () ->
                CoderJobs.run (model.Force()) (text.Force()) jobs (noEval broken.Path) ignore |> ignore)
        }

        test "a diverging coder stops the run and keeps the last good checkpoint" {
            use dir = new TempDir()
            let jobs = tinyJobs 12 |> List.map (fun j -> if j.Name = "sae1" then { j with Train = { j.Train with Lr = 1e30 } } else j)
            try
                CoderJobs.run (model.Force()) (text.Force()) jobs (tinyRun dir.Path) ignore |> ignore
                failtest "expected the run to stop"
            with CoderJobError msg ->
                Expect.stringContains msg "coder 'sae1' stopped" "names the coder"
                Expect.stringContains msg "diverged" "says what happened"
                Expect.stringContains msg "checkpoint" "says where the last good state is"
        }
    ]

// ---------------------------------------------------------------------------------------------- misfits

let private misfitTests =
    testList "coders that do not fit" [
        test "wrong width, unknown hook, hook at another layer, mismatched batch size, text of another tokenizer" {
            let m = model.Force()
            let t = text.Force()
            use dir = new TempDir()
            let config = tinyRun dir.Path
            let ok = (tinyJobs 4).Head
            let run jobs = CoderJobs.run m t jobs config ignore |> ignore
            expectJobError [ "coder 'wide'"; "d_in is 128"; "blocks.1.ln2.hook_normalized"; "width 64" ] (fun () ->
                run [ { ok with Name = "wide"; Coder = { ok.Coder with DIn = 128; DOut = 128 } } ])
            expectJobError [ "coder 'deep'"; "blocks.9.ln2.hook_normalized"; "not a hook point"; "5 layers" ] (fun () ->
                run [ { ok with Name = "deep"; Coder = CoderConfig.transcoder "stories260K" 9 64 128 } ])
            expectJobError [ "coder 'mixed'"; "in block 2"; "layer 0 is 1" ] (fun () ->
                run [ { ok with Name = "mixed"; Coder = { ok.Coder with HookOut = [| CoderConfig.mlpOutHook 2 |] } } ])
            expectJobError [ "coder 'tc1'"; "BatchSize 32" ] (fun () -> run [ { ok with Train = { ok.Train with BatchSize = 32 } } ])
            expectJobError [ "'tc1' is used 2 times" ] (fun () -> run [ ok; ok ])
            try
                CoderJobs.run m { t with VocabSize = 4096 } [ ok ] config ignore |> ignore
                failtest "expected an error about the text's vocabulary"
            with :? ArgumentException as e -> Expect.stringContains e.Message "tokenize it with the model's tokenizer" "text in another vocabulary"
            Expect.isFalse (Directory.Exists(Path.Combine(dir.Path, "tc1"))) "nothing ran"
        }
    ]

// ---------------------------------------------------------------------------------------------- sweep tables

let private frontierTests =
    testList "sweep frontier" [
        testProperty "Pareto flags mark exactly the undominated points of each series" <| fun (points: (bool * int * int * int) list) ->
            let point (a, l0, ce, fvu) =
                let kind = if a then MlpTranscoder else MlpOutSae
                let cfg = LayerCoder.config "m" 8 kind 0 16 (TopKLevel 2)
                let job = { Name = "p"; Coder = cfg; Train = TrainConfig.Paper }
                let metrics : EvalResult =
                    { Tokens = 1L; L0 = float ((l0 % 7 + 7) % 7); L0PerLayer = [||]; Mse = 0.0; MsePerLayer = [||]; NormalizedMse = 0.0
                      Fvu = float ((fvu % 5 + 5) % 5); FvuPerLayer = [||]; VarianceExplained = 0.0; CosineSimilarity = 0.0; DeadFraction = 0.0
                      L1 = 0.0; L2Ratio = 0.0; DeadFractionPerLayer = [||]; DenseFraction = 0.0; Frequencies = [||]; Histogram = { Edges = [||]; Counts = [||]; Dead = 0 } }
                let spliced : SplicedEval.SplicedMetrics =
                    { Tokens = 1L; Predictions = 1L; CeClean = 0.0; CeSpliced = float ((ce % 5 + 5) % 5); CeAblated = 9.0
                      CeRecovered = 0.0; CeDelta = 0.0; KlToClean = 0.0; KlAblated = 0.0; KlRecovered = 0.0; Top1Agreement = 0.0
                      Top1AgreementAblated = 0.0; LogitCosine = 0.0 }
                { Kind = kind; Layer = 0; Width = 16; Level = TopKLevel 2; Job = job },
                { Name = "p"; Path = ""; Config = cfg; Train = None; LastLog = None; Metrics = Some metrics; Spliced = Some spliced }
            let rows = Sweep.frontier (points |> List.map point)
            Expect.equal rows.Length points.Length "one row per point"
            for r in rows do
                let series = rows |> List.filter (fun x -> x.Series = r.Series)
                let dominates (v: FrontierRow -> float) (b: FrontierRow) = b.L0 <= r.L0 && v b <= v r && (b.L0 < r.L0 || v b < v r)
                Expect.equal r.ParetoCe (not (series |> List.exists (dominates (fun x -> x.CeSpliced)))) "CE frontier"
                Expect.equal r.ParetoFvu (not (series |> List.exists (dominates (fun x -> x.Fvu)))) "FVU frontier"
            for _, series in rows |> List.groupBy (fun r -> r.Series) do
                Expect.isTrue (series |> List.pairwise |> List.forall (fun (a, b) -> a.L0 <= b.L0)) "each series sorted by L0"
    ]

let tests = testList "coder jobs" [ storeTests; runTests; misfitTests; frontierTests ]
