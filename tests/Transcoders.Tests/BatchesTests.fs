/// Batches for language-model training and evaluation: determinism by (seed, step), targets shifted by one,
/// windows inside the stream, packed rows covering every document, sequential passes covering every target once.
module Transcoders.Tests.BatchesTests

open System
open Expecto
open FsCheck
open FsCheck.FSharp
open TorchSharp
open Transcoders.Text

let private config n = { FsCheckConfig.defaultConfig with maxTest = n }

let private rows (t: torch.Tensor) : int64[][] =
    let b, c = int t.shape[0], int t.shape[1]
    let data = t.data<int64>().ToArray()
    Array.init b (fun i -> data[i * c .. i * c + c - 1])

/// Same shape and same elements.
let private same (a: torch.Tensor) (b: torch.Tensor) =
    a.shape = b.shape && (use e = a.eq b in use all = e.all() in all.item<bool>())

/// A stream whose tokens are distinct positions mod vocab, so a window's place is visible.
let private streamGen =
    gen {
        let! ctx = Gen.choose (1, 16)
        let! extra = Gen.choose (0, 200)
        let! batch = Gen.choose (1, 8)
        let! seed = Gen.choose (-1000, 1000)
        let! step = Gen.choose (0, 100_000)
        return Array.init (ctx + 1 + extra) id, ctx, batch, int64 seed, int64 step
    }

let private randomTests =
    testList "random windows" [
        testPropertyWithConfig (config 60) "targets are inputs shifted by one, and every window lies inside the stream" <| Prop.forAll (Arb.fromGen streamGen) (fun (stream, ctx, batch, seed, step) ->
            use b = Batches.randomWindows stream batch ctx seed step torch.CPU
            let xs, ys = rows b.Inputs, rows b.Targets
            let shapes = b.Inputs.shape = [| int64 batch; int64 ctx |] && b.Targets.shape = b.Inputs.shape
            let dtypes = b.Inputs.dtype = torch.int64 && b.Targets.dtype = torch.int64
            // stream[i] = i, so a window starting at s is s, s+1, ..., s+ctx.
            let inside =
                Array.forall2 (fun (x: int64[]) (y: int64[]) ->
                    let s = x[0]
                    s >= 0L && s + int64 ctx < int64 stream.Length
                    && x = Array.init ctx (fun j -> s + int64 j) && y = Array.init ctx (fun j -> s + 1L + int64 j)) xs ys
            shapes && dtypes && inside)
        testPropertyWithConfig (config 60) "same (seed, step) gives the same batch" <| Prop.forAll (Arb.fromGen streamGen) (fun (stream, ctx, batch, seed, step) ->
            use a = Batches.randomWindows stream batch ctx seed step torch.CPU
            use b = Batches.randomWindows stream batch ctx seed step torch.CPU
            same a.Inputs b.Inputs && same a.Targets b.Targets)
        test "another step or seed gives another batch; starts cover the whole range" {
            let stream = Array.init 10_000 id
            let s0 = Batches.windowStarts stream.Length 16 32 7L 0L
            Expect.notEqual (Batches.windowStarts stream.Length 16 32 7L 1L) s0 "next step"
            Expect.notEqual (Batches.windowStarts stream.Length 16 32 8L 0L) s0 "other seed"
            let starts = [| for step in 0L .. 999L do yield! Batches.windowStarts 100 16 10 3L step |]
            Expect.equal (Array.min starts, Array.max starts) (0, 89) "uniform over 0..length-ctx-1"
        }
        test "a stream shorter than one window is refused" {
            Expect.throwsT<ArgumentException> (fun () -> Batches.windowStarts 8 2 8 0L 0L |> ignore) "8 tokens < ctx+1 = 9"
        }
    ]

let private docsGen =
    gen {
        let! docs = Gen.nonEmptyListOf (Gen.arrayOf (Gen.choose (3, 99)))
        let! ctx = Gen.choose (1, 12)
        let! seed = Gen.choose (0, 1000)
        return List.toArray docs, ctx, int64 seed
    }

let private packedTests =
    testList "packed rows" [
        testPropertyWithConfig (config 60) "each epoch is the documents, with separators, in a seeded order" <| Prop.forAll (Arb.fromGen docsGen) (fun (docs, ctx, seed) ->
            let total = docs |> Array.sumBy (fun d -> d.Length + 2)
            total < ctx + 1 ||
            (let p = Batches.PackedRows(docs, ctx, seed, bos = 1, eos = 2)
             let ok epoch =
                 let s = p.EpochStream epoch
                 let parts = Batches.splitDocuments 1 s |> Array.map (fun d -> d[1 .. d.Length - 2]) |> Array.sort
                 parts = Array.sort docs && s.Length = total
                 && s = Array.concat (Batches.epochOrder docs.Length seed epoch |> Array.map (fun i -> Array.concat [ [| 1 |]; docs[i]; [| 2 |] ]))
             ok 0L && ok 3L))
        testPropertyWithConfig (config 60) "rows overlap by one token, so each epoch's targets are its tokens after the first" <| Prop.forAll (Arb.fromGen docsGen) (fun (docs, ctx, seed) ->
            let total = docs |> Array.sumBy (fun d -> d.Length + 1)
            total < ctx + 1 ||
            (let p = Batches.PackedRows(docs, ctx, seed, bos = 1)
             let r = p.RowsPerEpoch
             let s = p.EpochStream 1L
             let fromRows = [| for g in r .. 2L * r - 1L do yield! (p.Row g)[1..] |]
             r = int64 ((total - 1) / ctx) && fromRows = s[1 .. int r * ctx]))
        test "batches are a pure function of (seed, step) and cross epochs" {
            let docs = [| for i in 0 .. 29 -> Array.init (5 + i % 7) (fun j -> 10 + i * 10 + j) |]
            let p = Batches.PackedRows(docs, 8, 42L, bos = 1)
            let q = Batches.PackedRows(docs, 8, 42L, bos = 1)
            let r = p.RowsPerEpoch
            // step 1 with B = r/2 + 1 takes rows B..2B−1, which straddle the end of epoch 0 (row r−1).
            let bs = int (r / 2L) + 1
            let step = 1L
            Expect.isTrue (int64 bs <= r - 1L && int64 (2 * bs - 1) >= r) "the batch crosses into epoch 1"
            use b1 = p.Batch(step, bs, torch.CPU)
            use b0 = p.Batch(0L, bs, torch.CPU)
            use b2 = q.Batch(step, bs, torch.CPU)
            Expect.isTrue (same b1.Inputs b2.Inputs) "same step, same batch, even from a fresh object"
            Expect.isFalse (same b1.Inputs b0.Inputs) "different step, different batch"
            Expect.isTrue (Batches.PackedRows(docs, 8, 43L, bos = 1).EpochStream 0L <> p.EpochStream 0L) "another seed, another order"
            Expect.isTrue (p.EpochStream 0L <> p.EpochStream 1L) "each epoch is reshuffled"
            let x, y = rows b1.Inputs, rows b1.Targets
            for i in 0 .. bs - 1 do
                let row = p.Row(step * int64 bs + int64 i) |> Array.map int64
                Expect.sequenceEqual x[i] row[.. 7] "inputs are the row's first ctx tokens"
                Expect.sequenceEqual y[i] row[1 ..] "targets are shifted by one"
        }
    ]

let private sequentialTests =
    testList "sequential" [
        testPropertyWithConfig (config 80) "every target once, in order, inputs shifted by one" <| Prop.forAll (Arb.fromGen (Gen.zip3 (Gen.choose (0, 120)) (Gen.choose (1, 20)) (Gen.choose (1, 6)))) (fun (n, ctx, batch) ->
                let stream = Array.init n (fun i -> i * 3 + 1)
                let batches = Batches.sequential stream batch ctx torch.CPU |> Seq.toList
                try
                    let targets = [| for b in batches do for r in rows b.Targets do yield! r |]
                    let pairs = [| for b in batches do for x, y in Array.zip (rows b.Inputs) (rows b.Targets) do yield! Array.zip x y |]
                    targets = (stream |> Array.skip (min 1 n) |> Array.map int64)
                    && targets.Length = Batches.sequentialTargets n
                    && pairs |> Array.forall (fun (x, y) -> y = x + 3L)
                    && batches |> List.forall (fun b -> b.Inputs.shape[0] <= int64 batch && b.Inputs.shape[1] <= int64 ctx)
                finally
                    for b in batches do (b :> IDisposable).Dispose())
    ]

let tests = testList "Text.Batches" [ randomTests; packedTests; sequentialTests ]
