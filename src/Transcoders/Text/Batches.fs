/// Language-model batches from a token stream: (inputs, targets) int64 tensors [B, ctx] with
/// targets = inputs shifted by one. Three ways to draw them:
/// - `randomWindows`: B windows of ctx+1 tokens at random offsets; the offsets are a pure function of
///   (seed, step), so a resumed run draws the same batches (no global random state).
/// - `PackedRows`: documents concatenated (BOS/EOS separators optional) in a seeded per-epoch order, cut into
///   consecutive rows; step s takes rows sB..sB+B−1 of the endless sequence of epochs.
/// - `sequential`: every target of a stream exactly once, in order, for validation loss.
module Transcoders.Text.Batches

open System
open TorchSharp

/// Inputs and targets on one device; dispose to free both.
type Batch =
    { Inputs: torch.Tensor
      Targets: torch.Tensor }
    interface IDisposable with
        member b.Dispose() =
            b.Inputs.Dispose()
            b.Targets.Dispose()

/// A 32-bit seed for System.Random from (seed, step, stream), mixed with SplitMix64 so nearby steps give
/// unrelated draws.
let deriveSeed (seed: int64) (step: int64) (stream: int64) : int =
    let h = Corpus.mix64 (Corpus.mix64 (Corpus.mix64 (uint64 seed) ^^^ uint64 step) ^^^ uint64 stream)
    int (h >>> 33)

let private checkShape (batchSize: int) (ctx: int) =
    if batchSize < 1 then invalidArg "batchSize" (sprintf "batch size %d must be at least 1" batchSize)
    if ctx < 1 then invalidArg "ctx" (sprintf "context length %d must be at least 1" ctx)

/// Builds a batch from rows of ctx+1 tokens (row i = tokens[starts[i] .. starts[i]+ctx]).
let private batchOf (device: torch.Device) (ctx: int) (rows: int[][]) : Batch =
    let b = rows.Length
    let inputs = Array.zeroCreate<int64> (b * ctx)
    let targets = Array.zeroCreate<int64> (b * ctx)
    for r in 0 .. b - 1 do
        let row = rows[r]
        for j in 0 .. ctx - 1 do
            inputs[r * ctx + j] <- int64 row[j]
            targets[r * ctx + j] <- int64 row[j + 1]
    let dims = [| int64 b; int64 ctx |]
    { Inputs = torch.tensor(inputs, ReadOnlySpan dims, device = device)
      Targets = torch.tensor(targets, ReadOnlySpan dims, device = device) }

// ---------------------------------------------------------------------------------------------- (a) random windows

/// The start offsets of step `step`'s windows: `batchSize` draws, uniform over [0, length − ctx − 1], from a
/// System.Random seeded by `deriveSeed seed step`.
let windowStarts (length: int) (batchSize: int) (ctx: int) (seed: int64) (step: int64) : int[] =
    checkShape batchSize ctx
    if length < ctx + 1 then invalidArg "stream" (sprintf "a stream of %d tokens is shorter than one window of ctx+1 = %d" length (ctx + 1))
    let rng = Random(deriveSeed seed step 0L)
    Array.init batchSize (fun _ -> rng.Next(0, length - ctx))

/// Step `step`'s batch of random windows of `stream`, on `device`.
let randomWindows (stream: int[]) (batchSize: int) (ctx: int) (seed: int64) (step: int64) (device: torch.Device) : Batch =
    windowStarts stream.Length batchSize ctx seed step
    |> Array.map (fun s -> Array.sub stream s (ctx + 1))
    |> batchOf device ctx

// ---------------------------------------------------------------------------------------------- (b) packed rows

/// Splits a stream at each `bos` (every document starts with one, as in token shards written with BOS).
/// Tokens before the first BOS form a document of their own.
let splitDocuments (bos: int) (stream: int[]) : int[][] =
    let starts = [| for i in 0 .. stream.Length - 1 do if stream[i] = bos && i > 0 then yield i |]
    let bounds = Array.concat [ [| 0 |]; starts; [| stream.Length |] ]
    [| for k in 0 .. bounds.Length - 2 do
           if bounds[k + 1] > bounds[k] then yield stream[bounds[k] .. bounds[k + 1] - 1] |]

/// The document order of `epoch`: a Fisher–Yates shuffle seeded by (seed, epoch).
let epochOrder (documents: int) (seed: int64) (epoch: int64) : int[] =
    let order = Array.init documents id
    let rng = Random(deriveSeed seed epoch 1L)
    for i in documents - 1 .. -1 .. 1 do
        let j = rng.Next(i + 1)
        let t = order[i]
        order[i] <- order[j]
        order[j] <- t
    order

/// Documents packed into rows: each epoch concatenates all documents (each wrapped as `bos`? doc `eos`?) in
/// the order `epochOrder`, and cuts the result into rows of ctx+1 tokens that overlap by one (row r starts at
/// r·ctx), so every token but an epoch's first is a target exactly once per epoch. A trailing remainder
/// shorter than a row is left out of that epoch. Row g of the endless sequence is row g mod R of epoch g / R
/// (R rows per epoch); step s of a batch size B uses rows sB..sB+B−1. Every row is a pure function of
/// (documents, seed, g). Documents read back from token shards (`splitDocuments`) already start with BOS:
/// pass no `bos` for them.
type PackedRows(documents: int[][], ctx: int, seed: int64, ?bos: int, ?eos: int) =
    do if ctx < 1 then invalidArg "ctx" (sprintf "context length %d must be at least 1" ctx)
    let wrap (d: int[]) =
        [| match bos with Some b -> yield b | None -> ()
           yield! d
           match eos with Some e -> yield e | None -> () |]
    let docs = documents |> Array.map wrap
    let length = docs |> Array.sumBy (fun d -> int64 d.Length)
    let rowsPerEpoch = if length < 1L then 0L else (length - 1L) / int64 ctx
    do if rowsPerEpoch < 1L then
        invalidArg "documents" (sprintf "the documents hold %d tokens with separators, fewer than one row of ctx+1 = %d" length (ctx + 1))
    do if length > int64 Array.MaxLength then invalidArg "documents" (sprintf "%d tokens do not fit one array" length)
    let mutable cachedEpoch = -1L
    let mutable cachedStream : int[] = [||]
    let gate = obj ()
    let epochStream (epoch: int64) =
        lock gate (fun () ->
            if epoch <> cachedEpoch then
                let s = Array.zeroCreate<int> (int length)
                let mutable at = 0
                for i in epochOrder docs.Length seed epoch do
                    Array.blit docs[i] 0 s at docs[i].Length
                    at <- at + docs[i].Length
                cachedStream <- s
                cachedEpoch <- epoch
            cachedStream)
    /// Tokens per epoch, separators included.
    member _.EpochLength = length
    /// Rows (of ctx+1 tokens) per epoch.
    member _.RowsPerEpoch = rowsPerEpoch
    member _.Ctx = ctx
    /// The concatenated tokens of an epoch.
    member _.EpochStream(epoch: int64) = Array.copy (epochStream epoch)
    /// Row `g` (ctx+1 tokens) of the endless sequence of epochs.
    member _.Row(g: int64) : int[] =
        if g < 0L then invalidArg "g" "row index must be non-negative"
        let s = epochStream (g / rowsPerEpoch)
        Array.sub s (int (g % rowsPerEpoch) * ctx) (ctx + 1)
    /// The epoch a step's first row belongs to (for logging).
    member _.EpochOf(step: int64, batchSize: int) = step * int64 batchSize / rowsPerEpoch
    /// Step `step`'s batch of `batchSize` rows, on `device`.
    member this.Batch(step: int64, batchSize: int, device: torch.Device) : Batch =
        checkShape batchSize ctx
        if step < 0L then invalidArg "step" "step must be non-negative"
        Array.init batchSize (fun i -> this.Row(step * int64 batchSize + int64 i)) |> batchOf device ctx

// ---------------------------------------------------------------------------------------------- (c) sequential

/// The windows of a sequential pass: (start, length) of rows of up to ctx+1 tokens starting at 0, ctx, 2ctx, ...
/// The last row may be shorter (at least 2 tokens), so every position 1..length−1 is a target exactly once.
let sequentialWindows (length: int) (ctx: int) : (int * int)[] =
    if ctx < 1 then invalidArg "ctx" (sprintf "context length %d must be at least 1" ctx)
    [| let mutable s = 0
       while s + 1 < length do
           yield s, min (ctx + 1) (length - s)
           s <- s + ctx |]

/// Every target of `stream` once, in order: batches of up to `batchSize` full windows [b, ctx], then (when
/// the stream does not divide evenly) one final [1, r] batch with the remaining r < ctx targets. Deterministic.
let sequential (stream: int[]) (batchSize: int) (ctx: int) (device: torch.Device) : seq<Batch> =
    checkShape batchSize ctx
    let windows = sequentialWindows stream.Length ctx
    let full = windows |> Array.filter (fun (_, n) -> n = ctx + 1)
    let partial = windows |> Array.filter (fun (_, n) -> n < ctx + 1)
    seq {
        for chunk in Array.chunkBySize batchSize full do
            yield chunk |> Array.map (fun (s, n) -> Array.sub stream s n) |> batchOf device ctx
        for s, n in partial do
            yield batchOf device (n - 1) [| Array.sub stream s n |]
    }

/// Number of targets a sequential pass covers (length − 1), for averaging losses.
let sequentialTargets (length: int) = max 0 (length - 1)
