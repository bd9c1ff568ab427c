namespace Transcoders.Activations

open System
open TorchSharp

/// Hook activations flattened to rows: hook name -> [n, d_hook]. Every hook has the same n and row i of
/// every hook comes from the same token, so a coder's input and target rows stay paired.
type Rows = Map<string, torch.Tensor>

/// A batch served to coder training: hook name -> [B, d_hook], rows aligned across hooks as in `Rows`.
/// The tensors belong to the caller: dispose them (`Batch.dispose`) or take the batch inside a dispose scope.
type Batch = Map<string, torch.Tensor>

/// Where a row source stands: `Chunk` counts the units already finished in this epoch (model passes, or
/// cache shards in the epoch's order) and `Row` the rows already taken from the next one. A source
/// created at a position delivers exactly the rows that followed that position the first time.
type Position =
    { Epoch: int64
      Chunk: int64
      Row: int64 }

    /// The beginning of a source.
    static member Start = { Epoch = 0L; Chunk = 0L; Row = 0L }

    override p.ToString() = sprintf "epoch %d, chunk %d, row %d" p.Epoch p.Chunk p.Row

/// A pull source of aligned rows (a model run, a disk cache). Rows come out in the source's own order;
/// `ShuffleBuffer` mixes them.
type IRowSource =
    inherit IDisposable

    /// The hooks every `Rows` carries, in a fixed order.
    abstract Hooks: string list

    /// Between 1 and `maxRows` rows, or None once the source is exhausted (then always None).
    /// The caller owns the returned tensors.
    abstract Read: maxRows: int64 -> Rows option

    /// The position after the rows read so far.
    abstract Position: Position

/// Functions over `Rows`.
module Rows =
    /// Shape [a, b, ...] as text.
    let showShape (shape: int64[]) = "[" + String.Join(", ", shape) + "]"

    /// The number of rows (all hooks agree; see `validate`).
    let count (rows: Rows) =
        if rows.IsEmpty then 0L else (Seq.head rows.Values).shape[0]

    /// Checks that `rows` carries exactly `hooks`, each [n, d] with the same n; returns n.
    /// `what` names the producer in the error message.
    let validate (what: string) (hooks: string list) (rows: Rows) =
        for h in hooks do
            if not (rows.ContainsKey h) then
                invalidArg "rows" (sprintf "%s: rows lack hook '%s' (have: %s)" what h (String.Join(", ", rows.Keys)))
        for KeyValue(h, _) in rows do
            if not (List.contains h hooks) then
                invalidArg "rows" (sprintf "%s: rows carry hook '%s', which is not among %s" what h (String.Join(", ", hooks)))
        let n = count rows
        for KeyValue(h, t) in rows do
            if t.dim() <> 2L then
                invalidArg "rows" (sprintf "%s: hook '%s' rows have shape %s, expected [rows, d]" what h (showShape t.shape))
            if t.shape[0] <> n then
                invalidArg "rows"
                    (sprintf "%s: hook '%s' has %d rows but another hook has %d: rows are not aligned" what h t.shape[0] n)
        n

    /// Disposes every tensor.
    let dispose (rows: Rows) =
        for t in rows.Values do t.Dispose()

/// Functions over `Batch`.
module Batch =
    /// Disposes every tensor of the batch.
    let dispose (batch: Batch) = Rows.dispose batch

    /// The batch's rows of `hook`, failing clearly when the batch does not carry it.
    let hook (name: string) (batch: Batch) =
        match batch.TryFind name with
        | Some t -> t
        | None -> invalidArg "name" (sprintf "the batch has no hook '%s' (has: %s)" name (String.Join(", ", batch.Keys)))
