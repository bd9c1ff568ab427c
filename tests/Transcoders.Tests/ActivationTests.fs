/// Activations: passes to rows, the shuffle buffer, the disk cache, statistics.
/// Most tests run a synthetic model whose rows say who they are: hook "in" holds a token's id in
/// column 0, "out" = 2·in + 1, and the 4-D hook "z" holds −id in its first element, so any misalignment,
/// loss or duplication of rows shows.
module Transcoders.Tests.ActivationTests

open System
open System.IO
open System.IO.Compression
open Expecto
open TorchSharp
open Transcoders.Activations
open Transcoders.Files
open Transcoders.Tests.Fixtures

/// A synthetic model: `Passes` passes of [B, P] tokens; token (p, b, pos) has id p·B·P + b·P + pos.
type Synthetic =
    { B: int; P: int; D: int; Passes: int; Seed: int }

    member s.Tokens = s.B * s.P * s.Passes

let hooks = [ "in"; "out"; "z" ]

let private gaussian (rng: Random) =
    sqrt (-2.0 * log (1.0 - rng.NextDouble())) * cos (2.0 * Math.PI * rng.NextDouble())

/// The "in" values of pass p, [B, P, D] row-major.
let inputValues (s: Synthetic) (p: int) =
    let rng = Random(s.Seed * 7919 + p)
    Array.init (s.B * s.P * s.D) (fun k ->
        let token, j = k / s.D, k % s.D
        if j = 0 then float32 (p * s.B * s.P + token) else float32 (3.0 * gaussian rng))

let makePass (s: Synthetic) (p: int) : Pass =
    let v = inputValues s p
    let B, P = int64 s.B, int64 s.P
    let input = torch.tensor(v).reshape(B, P, int64 s.D)
    let output = torch.tensor(v |> Array.map (fun x -> 2.0f * x + 1.0f)).reshape(B, P, int64 s.D)
    let z =
        torch.tensor(Array.init (s.B * s.P * 4) (fun k -> if k % 4 = 0 then -float32 (p * s.B * s.P + k / 4) else float32 k))
            .reshape(B, P, 2L, 2L)
    Pass.ofMap (Map.ofList [ "in", input; "out", output; "z", z ])

/// A producer starting at pass `first`.
let producer (s: Synthetic) (first: int64) =
    let mutable p = int first
    fun () ->
        if p >= s.Passes then None
        else
            p <- p + 1
            Some(makePass s (p - 1))

let passSource (s: Synthetic) (bos: BosFilter) (start: Position) =
    new PassSource(hooks, bos, producer s start.Chunk, start) :> IRowSource

/// Ids the synthetic source yields, in order.
let expectedIds (s: Synthetic) (bos: BosFilter) =
    [ for t in 0 .. s.Tokens - 1 do
          if not (bos = DropFirstPosition && t % s.P = 0) then int64 t ]

/// Column 0 of rows [n, d] as ids.
let idsOf (t: torch.Tensor) =
    use c = t.select(1L, 0L).to_type(torch.ScalarType.Float64).cpu()
    c.data<float>().ToArray() |> Array.map int64

/// Checks out = 2·in + 1 and z = −id exactly; returns the ids.
let checkAligned (rows: Rows) =
    let input, output, z = rows["in"], rows["out"], rows["z"]
    use expected = input.mul(torch.tensor 2.0f).add(torch.tensor 1.0f)
    Expect.isTrue (output.eq(expected).all().item<bool>()) "out = 2·in + 1 row by row"
    use negated = z.select(1L, 0L).neg()
    Expect.isTrue (negated.eq(input.select(1L, 0L)).all().item<bool>()) "z carries the same token as in"
    idsOf input

/// Checks out ≈ 2·in + 1 to bf16 precision; returns the ids (exact while they are below 256).
let checkAlignedBf16 (rows: Rows) =
    use input = rows["in"].to_type(torch.ScalarType.Float64)
    use output = rows["out"].to_type(torch.ScalarType.Float64)
    use err = output.sub(input.mul(torch.tensor 2.0).add(torch.tensor 1.0)).abs()
    use tol = input.abs().mul(torch.tensor 2.0).add(output.abs()).add(torch.tensor 1.0).mul(torch.tensor (2.0 ** -7.0))
    Expect.isTrue (err.le(tol).all().item<bool>()) "out ≈ 2·in + 1 within bf16 rounding"
    idsOf input

/// A batch copied to host arrays (hook -> values), for exact comparisons after disposal.
let snapshot (batch: Batch) =
    batch |> Map.map (fun _ t -> (use c = t.cpu().contiguous() in c.shape, c.to_type(torch.ScalarType.Float32).data<float32>().ToArray()))

/// Every remaining batch, each taken inside its own dispose scope as a training loop would, checked by `check`.
let drainWith (check: Rows -> int64[]) (buffer: ShuffleBuffer) =
    let out = ResizeArray()
    let mutable go = true
    while go do
        use _ = torch.NewDisposeScope()
        match buffer.Next() with
        | Some b -> out.Add(snapshot b, check b)
        | None -> go <- false
    List.ofSeq out

let drain buffer = drainWith checkAligned buffer

let takeWith (check: Rows -> int64[]) (n: int) (buffer: ShuffleBuffer) =
    [ for _ in 1 .. n do
          use _ = torch.NewDisposeScope()
          match buffer.Next() with
          | Some b -> yield snapshot b, check b
          | None -> () ]

let take n buffer = takeWith checkAligned n buffer

let bufferConfig rows batch mix seed =
    { ShuffleBufferConfig.Default with Rows = rows; BatchSize = batch; Mix = mix; Seed = seed }

/// A random small synthetic setup from one seed.
let randomSetup (seed: int) =
    let rng = Random seed
    let s = { B = rng.Next(1, 4); P = rng.Next(1, 6); D = rng.Next(1, 5); Passes = rng.Next(0, 7); Seed = seed }
    let batch = int64 (rng.Next(1, 8))
    let config = bufferConfig (batch * int64 (rng.Next(1, 6))) batch [| 0.0; 0.25; 0.5; 0.9 |].[rng.Next 4] (int64 seed)
    let bos = [| KeepBos; DropFirstPosition |].[rng.Next 2]
    rng, s, config, bos

/// Rows that fail after `failAfter` rows, like a crash in the middle of a cache write.
type Crashing(inner: IRowSource, failAfter: int64) =
    let mutable delivered = 0L
    interface IRowSource with
        member _.Hooks = inner.Hooks
        member _.Position = inner.Position
        member _.Read(maxRows) =
            if delivered >= failAfter then failwith "simulated crash"
            let r = inner.Read(min maxRows (failAfter - delivered))
            r |> Option.iter (fun r -> delivered <- delivered + Rows.count r)
            r
    interface IDisposable with
        member _.Dispose() = (inner :> IDisposable).Dispose()

/// Runs `f` and expects an ActivationFileError whose path ends with `file` and whose problem mentions `keyword`.
let expectFileError (file: string) (keyword: string) (f: unit -> unit) =
    try
        f ()
        failtestf "expected an error about %s mentioning '%s'" file keyword
    with ActivationFileError(path, problem) as e ->
        Expect.equal (Path.GetFileName path) file "the error names the file"
        Expect.stringContains problem keyword "the error says what is wrong"
        Expect.stringContains e.Message file "the message names the file"

let expectArgumentError (keyword: string) (f: unit -> unit) =
    try
        f ()
        failtestf "expected an ArgumentException mentioning '%s'" keyword
    with :? ArgumentException as e -> Expect.stringContains e.Message keyword "the error says what is wrong"

/// Every file of a directory: name -> bytes.
let filesOf (dir: string) =
    Directory.GetFiles dir |> Array.sort |> Array.map (fun f -> Path.GetFileName f, File.ReadAllBytes f) |> List.ofArray

/// All rows of a source in order (hook -> values), plus the ids.
let readAll (source: IRowSource) (step: int64) =
    let chunks = ResizeArray()
    let mutable go = true
    while go do
        use _ = torch.NewDisposeScope()
        match source.Read step with
        | Some r -> chunks.Add(snapshot r)
        | None -> go <- false
    List.ofSeq chunks

let cacheConfig rowsPerShard dtype =
    { CacheConfig.Default with
        RowsPerShard = rowsPerShard; DType = dtype
        Source = Map.ofList [ "model", "synthetic"; "dataset", "ids"; "seed", "7" ] }

let readConfig = { CachedReadConfig.Default with Seed = 3L }

let private flattenTests =
    testList "passes to rows" [
        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 40 } "flatten keeps (row, position) order and aligns hooks" <| fun (seed: int) ->
            let _, s, _, _ = randomSetup seed
            let s = { s with Passes = 1 }
            let pass = makePass s 0
            try
                use _ = torch.NewDisposeScope()
                let rows = PassRows.flatten hooks KeepBos pass
                Expect.equal (checkAligned rows |> List.ofArray) (expectedIds s KeepBos) "ids in row-major order"
                Expect.equal rows["z"].shape [| int64 (s.B * s.P); 4L |] "trailing dims flattened"
                Expect.isTrue (rows["in"].eq(pass.Activations["in"].reshape(-1L, int64 s.D)).all().item<bool>()) "values unchanged"
            finally Pass.dispose pass

        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 40 } "DropFirstPosition removes exactly the position-0 rows" <| fun (seed: int) ->
            let _, s, _, _ = randomSetup seed
            let s = { s with Passes = 1 }
            let pass = makePass s 0
            try
                use _ = torch.NewDisposeScope()
                let ids = PassRows.flatten hooks DropFirstPosition pass |> checkAligned
                Expect.equal (List.ofArray ids) [ for t in 0 .. s.B * s.P - 1 do if t % s.P <> 0 then int64 t ] "all but position 0"
            finally Pass.dispose pass

        test "valid and BOS masks select the same positions in every hook" {
            let s = { B = 2; P = 4; D = 3; Passes = 1; Seed = 1 }
            let pass = makePass s 0
            use valid = torch.tensor([| 1L; 1L; 1L; 0L; 1L; 1L; 0L; 0L |]).reshape(2L, 4L)
            use bos = torch.tensor([| true; false; true; false; true; false; false; false |]).reshape(2L, 4L)
            try
                use _ = torch.NewDisposeScope()
                let marked = { pass with Valid = Some valid; Bos = Some bos }
                Expect.equal (PassRows.flatten hooks DropMarked marked |> checkAligned) [| 1L; 5L |] "valid, not BOS"
                Expect.equal (PassRows.flatten hooks KeepBos marked |> checkAligned) [| 0L; 1L; 2L; 4L; 5L |] "valid only"
                Expect.equal (PassRows.flatten hooks DropFirstPosition marked |> checkAligned) [| 1L; 2L; 5L |] "valid, not position 0"
            finally Pass.dispose pass
        }

        test "bad passes get clear errors" {
            let s = { B = 2; P = 3; D = 2; Passes = 1; Seed = 1 }
            let pass = makePass s 0
            try
                expectArgumentError "no hook 'resid'" (fun () -> PassRows.flatten [ "in"; "resid" ] KeepBos pass |> Rows.dispose)
                use other = torch.zeros(2L, 4L, 2L)
                let mismatched = { pass with Activations = pass.Activations.Add("x", other) }
                expectArgumentError "same B and P" (fun () -> PassRows.flatten [ "in"; "x" ] KeepBos mismatched |> Rows.dispose)
                use mask = torch.ones([| 3L; 2L |], dtype = torch.ScalarType.Bool)
                expectArgumentError "Valid mask has shape [3, 2]" (fun () ->
                    PassRows.flatten hooks KeepBos { pass with Valid = Some mask } |> Rows.dispose)
                expectArgumentError "needs the pass's Bos mask" (fun () -> PassRows.flatten hooks DropMarked pass |> Rows.dispose)
                use flat = torch.zeros(2L, 3L)
                expectArgumentError "expected [B, P, d...]" (fun () ->
                    PassRows.flatten [ "f" ] KeepBos (Pass.ofMap (Map.ofList [ "f", flat ])) |> Rows.dispose)
            finally Pass.dispose pass
        }

        test "an activation spec lists each hook once and one batch feeds every coder" {
            let spec =
                { Coders =
                    [ CoderHooks.sae "sae" "in"
                      CoderHooks.transcoder "tc" "in" "out"
                      CoderHooks.crossLayer "clt" [ "in"; "z" ] [ "out"; "z" ] ] }
            Expect.equal spec.Hooks [ "in"; "out"; "z" ] "hooks in order of first use, once each"
            let s = { B = 2; P = 4; D = 3; Passes = 3; Seed = 18 }
            use b = new ShuffleBuffer(bufferConfig 8L 4L 0.5 1L, PassSource.ForSpec(spec, KeepBos, producer s 0L))
            use _ = torch.NewDisposeScope()
            let batch = (b.Next()).Value
            checkAligned batch |> ignore
            let tc = spec.Coders[1]
            Expect.isTrue (obj.ReferenceEquals((CoderHooks.inputs tc batch).Head, batch["in"])) "transcoder input"
            Expect.isTrue (obj.ReferenceEquals((CoderHooks.targets tc batch).Head, batch["out"])) "transcoder target"
            Expect.equal (CoderHooks.inputs spec.Coders[2] batch |> List.map (fun t -> t.shape[1])) [ 3L; 4L ] "cross-layer inputs"
            expectArgumentError "no hook 'resid'" (fun () -> Batch.hook "resid" batch |> ignore)
            for bad, keyword in
                [ { Coders = [] }, "names no coders"
                  { Coders = [ CoderHooks.sae "a" "in"; CoderHooks.sae "a" "out" ] }, "coder name 'a' appears more than once"
                  { Coders = [ CoderHooks.crossLayer "c" [] [ "out" ] ] }, "coder 'c' has no input hooks"
                  { Coders = [ CoderHooks.transcoder "t" "in" "" ] }, "names an empty hook" ] do
                expectArgumentError keyword (fun () -> bad.Validate())
        }

        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 40 } "a pass source resumed at its position yields the same remaining rows" <| fun (seed: int) ->
            let rng, s, _, bos = randomSetup seed
            let step = int64 (rng.Next(1, 9))
            use whole = passSource s bos Position.Start
            let all = readAll whole step |> List.collect (fun r -> List.ofArray (snd r["in"]))
            use partial = passSource s bos Position.Start
            let skip = rng.Next(0, List.length all / s.D + 1)
            let mutable read = 0L
            while read < int64 skip do
                use _ = torch.NewDisposeScope()
                read <- read + Rows.count (partial.Read(int64 skip - read)).Value
            use resumed = passSource s bos partial.Position
            let rest = readAll resumed (step + 1L) |> List.collect (fun r -> List.ofArray (snd r["in"]))
            Expect.equal rest (List.skip (skip * s.D) all) $"rows after {skip} from ({partial.Position})"
    ]

let private bufferTests =
    testList "shuffle buffer" [
        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 60 } "a finite source has every row served exactly once, aligned" <| fun (seed: int) ->
            let _, s, config, bos = randomSetup seed
            use buffer = new ShuffleBuffer(config, passSource s bos Position.Start)
            let batches = drain buffer
            let ids = batches |> List.collect (snd >> List.ofArray)
            Expect.equal (List.sort ids) (expectedIds s bos) "each row once"
            let sizes = batches |> List.map (fun (b, _) -> (fst b["in"]).[0])
            if not sizes.IsEmpty then
                Expect.allEqual (List.take (sizes.Length - 1) sizes) config.BatchSize "full batches but the last"
                Expect.isTrue (List.last sizes >= 1L && List.last sizes <= config.BatchSize) "last batch size"
            Expect.equal buffer.State.RowsServed (int64 ids.Length) "rows served"
            Expect.equal buffer.State.BatchesServed (int64 batches.Length) "batches served"
            Expect.isNone (buffer.Next()) "stays exhausted"

        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 30 } "DropLast serves only full batches, each row at most once" <| fun (seed: int) ->
            let _, s, config, bos = randomSetup seed
            let config = { config with DropLast = true }
            use buffer = new ShuffleBuffer(config, passSource s bos Position.Start)
            let batches = drain buffer
            let ids = batches |> List.collect (snd >> List.ofArray)
            let total = int64 (expectedIds s bos).Length
            Expect.equal (int64 ids.Length) (total / config.BatchSize * config.BatchSize) "all but the last partial batch"
            Expect.equal (List.distinct ids).Length ids.Length "no row twice"
            Expect.isTrue (ids |> List.forall (fun i -> List.contains i (expectedIds s bos))) "only source rows"

        test "the same seed gives the same batches; another seed another order" {
            let s = { B = 3; P = 5; D = 3; Passes = 6; Seed = 4 }
            let run seed =
                use b = new ShuffleBuffer(bufferConfig 30L 5L 0.5 seed, passSource s KeepBos Position.Start)
                drain b
            let a, b, c = run 11L, run 11L, run 12L
            Expect.equal (List.map fst a) (List.map fst b) "same seed: bit-identical batches"
            Expect.notEqual (List.map snd a) (List.map snd c) "different seed: different order"
            Expect.equal (a |> List.collect (snd >> List.ofArray) |> List.sort) (c |> List.collect (snd >> List.ofArray) |> List.sort) "same rows"
        }

        test "a batch mixes rows from many passes" {
            let s = { B = 2; P = 8; D = 2; Passes = 16; Seed = 5 }
            use b = new ShuffleBuffer(bufferConfig 256L 16L 0.0 1L, passSource s KeepBos Position.Start)
            for (_, ids) in take 4 b do
                let passes = ids |> Array.map (fun i -> i / 16L) |> Array.distinct
                Expect.isGreaterThanOrEqual passes.Length 6 $"passes in a batch of 16 from a pool of 16 passes: {passes.Length}"
        }

        test "bf16 storage keeps rows aligned to bf16 precision" {
            let s = { B = 2; P = 8; D = 5; Passes = 8; Seed = 6 }
            let config = { bufferConfig 64L 8L 0.5 3L with StorageDType = torch.ScalarType.BFloat16 }
            use b = new ShuffleBuffer(config, passSource s KeepBos Position.Start)
            let ids = ResizeArray()
            let mutable go = true
            while go do
                use _ = torch.NewDisposeScope()
                match b.Next() with
                | Some batch ->
                    Expect.equal batch["in"].dtype torch.ScalarType.Float32 "served as float32"
                    ids.AddRange(checkAlignedBf16 batch)
                | None -> go <- false
            Expect.equal (List.sort (List.ofSeq ids)) (expectedIds s KeepBos) "each row once"
            Expect.equal b.MemoryBytes (64L * (5L + 5L + 4L) * 2L) "pool of N·Σd bf16 values"
        }

        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 40 } "resuming from a saved state reproduces the subsequent batches exactly" <| fun (seed: int) ->
            let rng, s, config, bos = randomSetup seed
            let bf16 = rng.Next 2 = 0
            let config = if bf16 then { config with StorageDType = torch.ScalarType.BFloat16 } else config
            let check = if bf16 then checkAlignedBf16 else checkAligned
            let drain = drainWith check
            use dir = new TempDir()
            let full = (use b = new ShuffleBuffer(config, passSource s bos Position.Start) in drain b)
            let k = rng.Next(0, full.Length + 1)
            use first = new ShuffleBuffer(config, passSource s bos Position.Start)
            let served = takeWith check k first
            Expect.equal (List.map fst served) (List.map fst (List.take k full)) "same start"
            let path = dir.File "state.safetensors"
            first.SaveState path
            let state = first.State
            let rest = drain first
            use resumed = ShuffleBuffer.Resume(config, passSource s bos state.SourceAtCycleStart, path)
            Expect.equal resumed.State state "the resumed buffer reports the saved state"
            let again = drain resumed
            Expect.equal (List.map fst again) (List.map fst rest) $"batches after {k}"
            Expect.equal (List.map fst again) (List.map fst (List.skip k full)) "as in an uninterrupted run"
            Expect.equal resumed.State.BatchesServed (int64 full.Length) "batch count continues"
            if state.CarriedIn = 0L then
                use fromState = ShuffleBuffer.Resume(config, passSource s bos state.SourceAtCycleStart, state)
                Expect.equal (List.map fst (drain fromState)) (List.map fst rest) "the small state alone suffices without carried rows"

        test "resuming with another configuration or source position fails clearly" {
            let s = { B = 2; P = 4; D = 2; Passes = 5; Seed = 2 }
            use dir = new TempDir()
            let config = bufferConfig 8L 4L 0.5 9L
            use b = new ShuffleBuffer(config, passSource s KeepBos Position.Start)
            take 3 b |> ignore
            let path = dir.File "state.safetensors"
            b.SaveState path
            let start = b.State.SourceAtCycleStart
            Expect.isGreaterThan b.State.CarriedIn 0L "this state carries rows"
            expectArgumentError "Seed" (fun () ->
                use r = ShuffleBuffer.Resume({ config with Seed = 10L }, passSource s KeepBos start, path)
                r.Next() |> Option.iter Batch.dispose)
            expectArgumentError "StorageDType" (fun () ->
                ShuffleBuffer.Resume({ config with StorageDType = torch.ScalarType.BFloat16 }, passSource s KeepBos start, path) |> ignore)
            expectArgumentError "create the source at that position" (fun () ->
                use r = ShuffleBuffer.Resume(config, passSource s KeepBos Position.Start, path)
                r.Next() |> Option.iter Batch.dispose)
            expectArgumentError "resume from the file" (fun () ->
                ShuffleBuffer.Resume(config, passSource s KeepBos start, b.State) |> ignore)
            File.WriteAllText(path, "garbage")
            Expect.throwsT<Safetensors.SafetensorsError> (fun () ->
                ShuffleBuffer.Resume(config, passSource s KeepBos start, path) |> ignore) "a corrupt state file"
        }

        test "an endless model source serves full batches" {
            let s = { B = 2; P = 3; D = 2; Passes = Int32.MaxValue; Seed = 3 }
            let mutable p = 0
            let run () =
                let pass = makePass s p
                p <- p + 1
                pass.Activations
            use b = new ShuffleBuffer(bufferConfig 12L 4L 0.5 1L, PassSource.OfModel(hooks, DropFirstPosition, run))
            let batches = take 10 b
            Expect.equal batches.Length 10 "ten batches"
            let ids = batches |> List.collect (snd >> List.ofArray)
            Expect.equal (List.distinct ids).Length ids.Length "no row twice"
            Expect.isTrue (ids |> List.forall (fun i -> i % 3L <> 0L)) "no BOS rows"
        }

        test "invalid configurations are refused" {
            let s = { B = 1; P = 1; D = 1; Passes = 1; Seed = 1 }
            for bad, field in [ bufferConfig 10L 4L 0.5 1L, "Rows"; bufferConfig 8L 0L 0.5 1L, "BatchSize"; bufferConfig 8L 4L 1.0 1L, "Mix" ] do
                use src = passSource s KeepBos Position.Start
                expectArgumentError field (fun () -> new ShuffleBuffer(bad, src) |> ignore)
        }
    ]

let private cacheTests =
    testList "disk cache" [
        test "f32 cache holds the source's rows exactly, with a complete manifest" {
            let s = { B = 3; P = 5; D = 4; Passes = 7; Seed = 8 }
            use dir = new TempDir()
            use src = passSource s DropFirstPosition Position.Start
            let m = ActivationCache.write dir.Path (cacheConfig 16L Safetensors.F32) src
            let total = (expectedIds s DropFirstPosition).Length
            Expect.isTrue m.Complete "complete"
            Expect.equal m.TotalRows (int64 total) "total rows"
            Expect.equal m.Shards.Length ((total + 15) / 16) "shards"
            Expect.equal m.Hooks [ { Name = "in"; D = 4L }; { Name = "out"; D = 4L }; { Name = "z"; D = 4L } ] "hooks and widths"
            Expect.equal m.Source["model"] "synthetic" "source description"
            for sh in m.Shards do
                let path = Path.Combine(dir.Path, sh.File)
                Expect.equal sh.Sha256 (ShardCheck.sha256 path) "checksum"
                Expect.equal sh.Bytes (FileInfo(path).Length) "size"
            Expect.equal (CacheManifest.Read dir.Path) m "the manifest on disk"
            use reader = new CachedActivationSource(dir.Path, { readConfig with ShuffleShards = false })
            use original = passSource s DropFirstPosition Position.Start
            Expect.equal (readAll reader 7L |> List.collect (fun r -> List.ofArray (snd r["out"])))
                         (readAll original 7L |> List.collect (fun r -> List.ofArray (snd r["out"]))) "same rows in order"
        }

        test "a cache read through a shuffle buffer serves every row once, aligned" {
            let s = { B = 2; P = 6; D = 3; Passes = 9; Seed = 9 }
            use dir = new TempDir()
            (use src = passSource s KeepBos Position.Start in ActivationCache.write dir.Path (cacheConfig 10L Safetensors.F32) src) |> ignore
            use b = CachedActivationSource.Buffer(dir.Path, readConfig, bufferConfig 20L 4L 0.5 2L)
            let ids = drain b |> List.collect (snd >> List.ofArray)
            Expect.equal (List.sort ids) (expectedIds s KeepBos) "each row once"
            use two = CachedActivationSource.Buffer(dir.Path, { readConfig with Epochs = Some 2L }, bufferConfig 20L 4L 0.5 2L)
            let twice = drain two |> List.collect (snd >> List.ofArray)
            Expect.equal (List.sort twice) (expectedIds s KeepBos |> List.collect (fun i -> [ i; i ])) "two epochs: each row twice"
        }

        test "bf16 and f16 caches keep rows aligned to their precision" {
            let s = { B = 2; P = 8; D = 6; Passes = 10; Seed = 10 }
            for dtype in [ Safetensors.BF16; Safetensors.F16 ] do
                use dir = new TempDir()
                (use src = passSource s KeepBos Position.Start in ActivationCache.write dir.Path (cacheConfig 32L dtype) src) |> ignore
                let m = CacheManifest.Read dir.Path
                Expect.equal m.DType dtype "dtype recorded"
                use reader = new CachedActivationSource(dir.Path, readConfig)
                let ids = ResizeArray()
                let mutable go = true
                while go do
                    use _ = torch.NewDisposeScope()
                    match (reader :> IRowSource).Read 13L with
                    | Some r ->
                        Expect.equal r["in"].dtype dtype.ScalarType "rows in the stored dtype"
                        ids.AddRange(checkAlignedBf16 r)
                    | None -> go <- false
                Expect.equal (List.sort (List.ofSeq ids)) (expectedIds s KeepBos) "each row once (ids < 256 are exact)"
        }

        test "compressed shards read back the same rows as uncompressed ones" {
            let s = { B = 2; P = 8; D = 5; Passes = 6; Seed = 11 }
            let write compression =
                let dir = new TempDir()
                (use src = passSource s KeepBos Position.Start
                 ActivationCache.write dir.Path { cacheConfig 24L Safetensors.BF16 with Compression = compression } src) |> ignore
                dir
            use plain = write NoCompression
            let reference = (use r = new CachedActivationSource(plain.Path, readConfig) in readAll r 9L)
            for c in [ Brotli 1; Brotli 5; Deflate CompressionLevel.Fastest ] do
                use dir = write c
                Expect.equal (CacheManifest.Read dir.Path).Compression c "compression recorded"
                use r = new CachedActivationSource(dir.Path, readConfig)
                Expect.equal (readAll r 9L) reference $"{c.Name}: same rows"
        }

        test "byte shuffling and codecs round-trip random bytes of every element size" {
            let rng = Random 12
            for size in [ 1; 2; 4; 8 ] do
                for count in [ 0; 1; 7; 1000 ] do
                    let data = Array.zeroCreate<byte> (size * count)
                    rng.NextBytes data
                    for c in [ Brotli 0; Brotli 11; Deflate CompressionLevel.Optimal ] do
                        let packed = ShardCompression.compress c size (ReadOnlySpan data)
                        Expect.equal (ShardCompression.decompress c size packed data.Length) data $"{c.Name}, {size}-byte elements × {count}"
            let packed = ShardCompression.compress (Brotli 1) 2 (ReadOnlySpan(Array.init 4000 byte))
            Expect.throwsT<InvalidDataException> (fun () -> ShardCompression.decompress (Brotli 1) 2 packed 3998 |> ignore) "wrong length"
            Expect.throwsT<InvalidDataException> (fun () -> ShardCompression.decompress (Brotli 1) 2 packed[.. packed.Length - 3] 4000 |> ignore) "truncated data"
        }

        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 12 } "an interrupted write resumes and produces the same files" <| fun (seed: int) ->
            let rng = Random seed
            let s = { B = 2; P = rng.Next(2, 6); D = 3; Passes = rng.Next(2, 8); Seed = seed }
            let config = { cacheConfig (int64 (rng.Next(3, 12))) Safetensors.BF16 with Compression = [| NoCompression; Brotli 1 |].[rng.Next 2] }
            use reference = new TempDir()
            (use src = passSource s DropFirstPosition Position.Start in ActivationCache.write reference.Path config src) |> ignore
            use dir = new TempDir()
            let total = (expectedIds s DropFirstPosition).Length
            let crashAt = int64 (rng.Next(0, total))
            Expect.throws (fun () ->
                use src = new Crashing(passSource s DropFirstPosition Position.Start, crashAt)
                ActivationCache.write dir.Path config src |> ignore) "the first write crashes"
            let partial = CacheManifest.Read dir.Path
            Expect.isFalse partial.Complete "an interrupted cache is marked incomplete"
            Expect.equal partial.TotalRows (crashAt / config.RowsPerShard * config.RowsPerShard) "complete shards only"
            expectFileError "manifest.json" "incomplete" (fun () -> new CachedActivationSource(dir.Path, readConfig) |> ignore)
            // Resume either from the source's start (rows are skipped) or from the recorded position.
            let start = if rng.Next 2 = 0 then Position.Start else ActivationCache.resumePosition dir.Path
            (use src = passSource s DropFirstPosition start in ActivationCache.write dir.Path config src) |> ignore
            Expect.equal (filesOf dir.Path) (filesOf reference.Path) $"files after resuming from ({start})"

        test "a damaged shard in the middle is rewritten on resume" {
            let s = { B = 2; P = 4; D = 3; Passes = 6; Seed = 13 }
            let config = cacheConfig 8L Safetensors.F32
            use reference = new TempDir()
            (use src = passSource s KeepBos Position.Start in ActivationCache.write reference.Path config src) |> ignore
            use dir = new TempDir()
            (use src = passSource s KeepBos Position.Start in ActivationCache.write dir.Path config src) |> ignore
            let victim = Path.Combine(dir.Path, "shard_00001.safetensors")
            let bytes = File.ReadAllBytes victim
            bytes[bytes.Length - 3] <- bytes[bytes.Length - 3] ^^^ 0x40uy
            File.WriteAllBytes(victim, bytes)
            File.Delete(Path.Combine(dir.Path, "shard_00002.safetensors"))
            (use src = passSource s KeepBos Position.Start in ActivationCache.write dir.Path config src) |> ignore
            Expect.equal (filesOf dir.Path) (filesOf reference.Path) "the same files as an undamaged write"
        }

        test "MaxRows ends the cache early, progress is reported per shard, and verify finds damage" {
            let s = { B = 2; P = 4; D = 3; Passes = 6; Seed = 19 }
            use dir = new TempDir()
            let reports = ResizeArray()
            let config = { cacheConfig 8L Safetensors.BF16 with MaxRows = Some 20L }
            let m = (use src = passSource s KeepBos Position.Start in ActivationCache.writeWith reports.Add dir.Path config src)
            Expect.equal (m.Shards |> List.map (fun sh -> sh.Rows)) [ 8L; 8L; 4L ] "shards of 8, 8 and 4 rows"
            Expect.isTrue m.Complete "complete at MaxRows"
            Expect.equal [ for r in reports -> r.TotalRows, r.Complete ] [ 8L, false; 16L, false; 20L, true ] "a report per shard"
            Expect.equal (ActivationCache.verify dir.Path) [] "an intact cache"
            let again = (use src = passSource s KeepBos Position.Start in ActivationCache.write dir.Path config src)
            Expect.equal again m "writing a complete cache again changes nothing"
            let path = Path.Combine(dir.Path, "shard_00001.safetensors")
            let bytes = File.ReadAllBytes path
            bytes[bytes.Length - 1] <- bytes[bytes.Length - 1] ^^^ 4uy
            File.WriteAllBytes(path, bytes)
            match ActivationCache.verify dir.Path with
            | [ p, problem ] ->
                Expect.equal p path "names the shard"
                Expect.stringContains problem "checksum mismatch" "says what is wrong"
            | other -> failtestf "expected one problem, got %A" other
        }

        test "shards written but not yet listed (a crash between the two renames) are rewritten" {
            let s = { B = 2; P = 4; D = 3; Passes = 5; Seed = 20 }
            let config = cacheConfig 8L Safetensors.BF16
            use dir = new TempDir()
            let m = (use src = passSource s KeepBos Position.Start in ActivationCache.write dir.Path config src)
            let reference = filesOf dir.Path
            { m with Shards = [ m.Shards.Head ]; TotalRows = m.Shards.Head.Rows; Complete = false }.Write dir.Path
            File.WriteAllText(Path.Combine(dir.Path, ".shard_00003.safetensors.0123abcd.tmp"), "half-written")
            Expect.equal (ActivationCache.resumePosition dir.Path) m.Shards.Head.End "resume after the listed shard"
            (use src = passSource s KeepBos (ActivationCache.resumePosition dir.Path) in ActivationCache.write dir.Path config src) |> ignore
            Expect.equal (filesOf dir.Path) reference "the same files, temporary leftovers removed"
        }

        test "writing into a cache made with other settings fails clearly" {
            let s = { B = 2; P = 4; D = 3; Passes = 3; Seed = 14 }
            use dir = new TempDir()
            (use src = passSource s KeepBos Position.Start in ActivationCache.write dir.Path (cacheConfig 8L Safetensors.F32) src) |> ignore
            for config, field in [ cacheConfig 8L Safetensors.BF16, "dtype"; cacheConfig 4L Safetensors.F32, "rows_per_shard"
                                   { cacheConfig 8L Safetensors.F32 with Source = Map.ofList [ "model", "other" ] }, "source" ] do
                use src = passSource s KeepBos Position.Start
                expectFileError "manifest.json" field (fun () -> ActivationCache.write dir.Path config src |> ignore)
        }

        test "damaged caches are refused with the file named" {
            let s = { B = 2; P = 4; D = 3; Passes = 4; Seed = 15 }
            let make () =
                let dir = new TempDir()
                (use src = passSource s KeepBos Position.Start in ActivationCache.write dir.Path (cacheConfig 8L Safetensors.BF16) src) |> ignore
                dir
            let readEverything (dir: TempDir) =
                use r = new CachedActivationSource(dir.Path, readConfig)
                readAll r 100L |> ignore
            // A flipped byte in the data: same size, wrong checksum, found when the shard is read.
            using (make ()) (fun dir ->
                let path = Path.Combine(dir.Path, "shard_00002.safetensors")
                let bytes = File.ReadAllBytes path
                bytes[bytes.Length - 1] <- bytes[bytes.Length - 1] ^^^ 1uy
                File.WriteAllBytes(path, bytes)
                expectFileError "shard_00002.safetensors" "checksum mismatch" (fun () -> readEverything dir))
            // Truncated or missing shards are found on open.
            using (make ()) (fun dir ->
                let path = Path.Combine(dir.Path, "shard_00001.safetensors")
                File.WriteAllBytes(path, File.ReadAllBytes(path)[.. 99])
                expectFileError "shard_00001.safetensors" "bytes" (fun () -> new CachedActivationSource(dir.Path, readConfig) |> ignore))
            using (make ()) (fun dir ->
                File.Delete(Path.Combine(dir.Path, "shard_00003.safetensors"))
                expectFileError "shard_00003.safetensors" "missing" (fun () -> new CachedActivationSource(dir.Path, readConfig) |> ignore))
            // A shard of the wrong dtype (with its checksum updated, so only the dtype check can catch it).
            using (make ()) (fun dir ->
                let path = Path.Combine(dir.Path, "shard_00000.safetensors")
                let m = CacheManifest.Read dir.Path
                use r = Safetensors.Reader.Open path
                let tensors = [ for e in r.Entries -> e.Name, r.TensorAs(e.Name, torch.ScalarType.Float32) ]
                let metadata = r.Metadata
                (r :> IDisposable).Dispose()
                Safetensors.save path metadata tensors
                for _, t in tensors do t.Dispose()
                let sh = m.Shards.Head
                let fixedUp = { sh with Bytes = FileInfo(path).Length; Sha256 = ShardCheck.sha256 path }
                { m with Shards = fixedUp :: m.Shards.Tail }.Write dir.Path
                expectFileError "shard_00000.safetensors" "the manifest says BF16" (fun () -> readEverything dir))
            // Manifests: not JSON, a wrong field, inconsistent totals, absent.
            for edit, keyword in
                [ (fun (_: string) -> "{ not json"), "not valid JSON"
                  (fun (t: string) -> t.Replace("\"rows_per_shard\": 8", "\"rows_per_shard\": \"8\"")), "rows_per_shard"
                  (fun (t: string) -> t.Replace("\"total_rows\": 32", "\"total_rows\": 33")), "total_rows"
                  (fun (t: string) -> t.Replace("\"dtype\": \"BF16\"", "\"dtype\": \"I64\"")), "dtype"
                  (fun (t: string) -> t.Replace("shard_00001", "../shard_00001")), "expected 'shard_00001.safetensors'" ] do
                using (make ()) (fun dir ->
                    let path = Path.Combine(dir.Path, "manifest.json")
                    let text = File.ReadAllText path
                    let edited = edit text
                    Expect.notEqual edited text "the edit applies"
                    File.WriteAllText(path, edited)
                    expectFileError "manifest.json" keyword (fun () -> new CachedActivationSource(dir.Path, readConfig) |> ignore))
            using (new TempDir()) (fun dir ->
                expectFileError "manifest.json" "no such file" (fun () -> new CachedActivationSource(dir.Path, readConfig) |> ignore))
        }

        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 15 } "reading resumes from a saved position or buffer state exactly" <| fun (seed: int) ->
            let rng = Random seed
            let s = { B = 2; P = rng.Next(2, 6); D = 2; Passes = rng.Next(1, 8); Seed = seed }
            use dir = new TempDir()
            (use src = passSource s KeepBos Position.Start
             ActivationCache.write dir.Path (cacheConfig (int64 (rng.Next(2, 9))) Safetensors.F32) src) |> ignore
            let read = { readConfig with Seed = int64 seed; Epochs = Some 2L }
            // The raw source: position -> same rows.
            let step = int64 (rng.Next(1, 7))
            let all = (use r = new CachedActivationSource(dir.Path, read) in readAll r step |> List.collect (fun c -> List.ofArray (snd c["in"])))
            use partial = new CachedActivationSource(dir.Path, read)
            let skip = rng.Next(0, all.Length / s.D)
            let mutable got = 0L
            while got < int64 skip do
                use _ = torch.NewDisposeScope()
                got <- got + Rows.count ((partial :> IRowSource).Read(int64 skip - got)).Value
            let position = (partial :> IRowSource).Position
            let rest = (use r = new CachedActivationSource(dir.Path, read, position) in readAll r step |> List.collect (fun c -> List.ofArray (snd c["in"])))
            Expect.equal rest (List.skip (skip * s.D) all) $"rows after ({position})"
            // Through a buffer: state file -> same batches.
            let config = bufferConfig (int64 (rng.Next(1, 4) * 4)) 4L [| 0.0; 0.5 |].[rng.Next 2] (int64 seed)
            let full = (use b = CachedActivationSource.Buffer(dir.Path, read, config) in drain b)
            let k = rng.Next(0, full.Length + 1)
            use b = CachedActivationSource.Buffer(dir.Path, read, config)
            take k b |> ignore
            let path = dir.File "state.safetensors"
            b.SaveState path
            use resumed = CachedActivationSource.ResumeBuffer(dir.Path, read, config, path)
            Expect.equal (List.map fst (drain resumed)) (List.map fst (List.skip k full)) $"batches after {k}"

        test "shard order is seeded per epoch and a hook subset can be read" {
            let s = { B = 2; P = 4; D = 3; Passes = 8; Seed = 16 }
            use dir = new TempDir()
            (use src = passSource s KeepBos Position.Start in ActivationCache.write dir.Path (cacheConfig 8L Safetensors.F32) src) |> ignore
            /// The file index of the shards visited, one 8-row shard per read.
            let firstIds (config: CachedReadConfig) =
                use r = new CachedActivationSource(dir.Path, config, hooks = [ "in"; "out" ])
                [ for _ in 1 .. 16 do
                      use _ = torch.NewDisposeScope()
                      let rows = ((r :> IRowSource).Read 8L).Value
                      Expect.equal (rows.Keys |> List.ofSeq) [ "in"; "out" ] "only the selected hooks"
                      yield (idsOf rows["in"]).[0] / 8L ]
            let order = firstIds { readConfig with Epochs = None }
            Expect.equal (List.sort order[..7]) [ 0L .. 7L ] "epoch 0 visits every shard"
            Expect.equal (List.sort order[8..15]) [ 0L .. 7L ] "epoch 1 too"
            Expect.notEqual order[..7] order[8..15] "in another order"
            Expect.equal (firstIds { readConfig with Epochs = None }) order "deterministic"
            Expect.notEqual (firstIds { readConfig with Epochs = None; Seed = 99L }) order "seeded"
            let unshuffled = firstIds { readConfig with Epochs = None; ShuffleShards = false }
            Expect.equal unshuffled[..7] [ 0L .. 7L ] "file order when not shuffled"
        }
    ]

let private statsTests =
    testList "statistics" [
        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 30 } "HookStats match a plain loop and merge like concatenation" <| fun (seed: int) ->
            let rng = Random seed
            let n, d = rng.Next(1, 20), rng.Next(1, 6)
            let values = Array.init (n * d) (fun _ -> 5.0 * gaussian rng + 1.0)
            use x = torch.tensor(values |> Array.map float32).reshape(int64 n, int64 d)
            let stats = HookStats.ofRows x
            let rows = Array.init n (fun i -> Array.init d (fun j -> float (float32 values[i * d + j])))
            let norms = rows |> Array.map (fun r -> sqrt (Array.sumBy (fun v -> v * v) r))
            Expect.equal stats.Count (int64 n) "count"
            Expect.floatClose Accuracy.high stats.MeanNorm (Array.average norms) "E‖x‖"
            Expect.floatClose Accuracy.high stats.MeanSquaredNorm (norms |> Array.averageBy (fun v -> v * v)) "E‖x‖²"
            for j in 0 .. d - 1 do
                Expect.floatClose Accuracy.high stats.Mean[j] (rows |> Array.averageBy (fun r -> r[j])) $"mean[{j}]"
            let cut = rng.Next(1, n + 1)
            use a = x.narrow(0L, 0L, int64 cut)
            let merged = if cut = n then stats else (use b = x.narrow(0L, int64 cut, int64 (n - cut)) in HookStats.merge (HookStats.ofRows a) (HookStats.ofRows b))
            Expect.floatClose Accuracy.high merged.MeanNorm stats.MeanNorm "merged E‖x‖"
            Expect.equal merged.Count stats.Count "merged count"
            use scaled = x.mul(torch.tensor (float32 stats.NormScale))
            Expect.floatClose Accuracy.medium (HookStats.ofRows scaled).MeanNorm (sqrt (float d)) "scaled rows have mean norm √d"

        test "collect reads the first K rows of every hook" {
            let s = { B = 2; P = 5; D = 3; Passes = 4; Seed = 17 }
            use src = passSource s DropFirstPosition Position.Start
            let stats = ActivationStats.collect src 13L
            Expect.equal (stats |> Map.toList |> List.map (fun (h, st) -> h, st.Count)) [ "in", 13L; "out", 13L; "z", 13L ] "13 rows each"
            let ids = expectedIds s DropFirstPosition |> List.take 13
            Expect.floatClose Accuracy.high stats["in"].Mean[0] (ids |> List.averageBy float) "mean of the ids column"
            Expect.floatClose Accuracy.high stats["out"].Mean[0] (ids |> List.averageBy (fun i -> 2.0 * float i + 1.0)) "the target's mean"
            Expect.equal src.Position { Epoch = 0L; Chunk = 1L; Row = 5L } "the source advanced 13 rows (8 per pass)"
        }
    ]

let private shuffleTests =
    testList "seeded permutations" [
        test "SplitMix64 matches the reference vectors" {
            let g = SeededShuffle.SplitMix64 1234567UL
            Expect.equal [ for _ in 1 .. 5 -> g.Next() ]
                [ 6457827717110365317UL; 3203168211198807973UL; 9817491932198370423UL; 4593380528125082431UL; 16408922859458223821UL ]
                "outputs for seed 1234567 (Vigna's splitmix64.c)"
        }
        testProperty "permutations are permutations, seeded and stream-separated" <| fun (seed: int64) (n: byte) ->
            let n = int n
            let p = SeededShuffle.permutation seed "a" 0L n
            Expect.equal (Array.sort p) (Array.init n id) "a permutation"
            Expect.equal (SeededShuffle.permutation seed "a" 0L n) p "deterministic"
            if n >= 20 then
                Expect.notEqual (SeededShuffle.permutation seed "a" 1L n) p "index separates"
                Expect.notEqual (SeededShuffle.permutation seed "b" 0L n) p "stream separates"
                Expect.notEqual (SeededShuffle.permutation (seed + 1L) "a" 0L n) p "seed separates"
        test "Below is unbiased enough to be uniform over a small range" {
            let g = SeededShuffle.SplitMix64.For(5L, "test", 0L)
            let counts = Array.zeroCreate 6
            for _ in 1 .. 60000 do
                let i = int (g.Below 6UL)
                counts[i] <- counts[i] + 1
            for c in counts do Expect.isTrue (abs (c - 10000) < 500) $"each value about 10000 times: {counts}"
        }
    ]

/// The real model: llama2.c's stories260K, cached at layer 0 on random tokens behind a BOS. Its block adds
/// the MLP output to the residual stream in float32, so resid_post = resid_mid + mlp_out holds bit for bit
/// in every served row exactly when rows stay aligned.
let private modelTests =
    testList "with a model" [
        test "stories260K rows stay aligned through the buffer and an f32 cache" {
            let m, _ = Transcoders.Models.ModelFiles.load (Paths.data "models/stories260K/stories260K.bin") torch.CPU
            use _ = m
            let mid, out, post = "blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out", "blocks.0.hook_resid_post"
            let spec = { Coders = [ CoderHooks.transcoder "tc0" mid out; CoderHooks.sae "sae0" post ] }
            let B, P, passes = 4, 16, 5
            let next (first: int) =
                let mutable p = first
                fun () ->
                    if p >= passes then None
                    else
                        let rng = Random(1000 + p)
                        p <- p + 1
                        use tokens = torch.tensor(Array.init (B * P) (fun i -> if i % P = 0 then 1L else int64 (rng.Next 512))).reshape(int64 B, int64 P)
                        let r =
                            Transcoders.Models.Transformer.run m
                                { Transcoders.Models.RunOptions.Default with Cache = set spec.Hooks; StopAtLayer = Some 1 } tokens
                        r.Residual |> Option.iter (fun t -> t.Dispose())
                        Some(Pass.ofMap r.Cache)
            let check (rows: Rows) =
                use sum = rows[mid].add(rows[out])
                Expect.isTrue (rows[post].eq(sum).all().item<bool>()) "resid_post = resid_mid + mlp_out in every row"
                Expect.equal rows[mid].shape[1] 64L "d_model"
                rows[mid].shape[0]
            let served (buffer: ShuffleBuffer) =
                let mutable n = 0L
                let mutable go = true
                while go do
                    use _ = torch.NewDisposeScope()
                    match buffer.Next() with
                    | Some b -> n <- n + check b
                    | None -> go <- false
                n
            let rows = int64 (B * (P - 1) * passes)
            use b = new ShuffleBuffer(bufferConfig 64L 16L 0.5 5L, PassSource.ForSpec(spec, DropFirstPosition, next 0))
            Expect.equal (served b) rows "every non-BOS row served"
            use dir = new TempDir()
            (use src = PassSource.ForSpec(spec, DropFirstPosition, next 0)
             ActivationCache.write dir.Path { cacheConfig 50L Safetensors.F32 with Source = Map.ofList [ "model", "stories260K" ] } src) |> ignore
            use cached = CachedActivationSource.Buffer(dir.Path, readConfig, bufferConfig 64L 16L 0.5 5L)
            Expect.equal (served cached) rows "the same rows from the cache"
            use src = PassSource.ForSpec(spec, DropFirstPosition, next 0)
            let stats = ActivationStats.collect src 100L
            Expect.isTrue (stats[post].NormScale > 0.0 && Double.IsFinite stats[post].NormScale) "a finite norm scale"
        }
    ]

let tests =
    testList "activations" [ shuffleTests; flattenTests; bufferTests; cacheTests; statsTests; modelTests ]
