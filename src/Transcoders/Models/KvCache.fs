namespace Transcoders.Models

open TorchSharp

/// Keys and values of the positions already processed, one preallocated buffer per layer
/// [batch, n_kv_heads, capacity, d_head], so that decoding one more token costs one position of work.
/// Keys are stored after rotation. Meant for inference (under `torch.no_grad()`); the cache owns its
/// buffers: dispose it when done.
type KvCache(nLayers: int, batch: int, nKvHeads: int, dHead: int, capacity: int, device: torch.Device) =
    do
        if nLayers <= 0 || batch <= 0 || nKvHeads <= 0 || dHead <= 0 || capacity <= 0 then
            invalidArg "KvCache" (sprintf "every size must be positive: layers %d, batch %d, kv heads %d, d_head %d, capacity %d" nLayers batch nKvHeads dHead capacity)
    let buffer () =
        torch.zeros([| int64 batch; int64 nKvHeads; int64 capacity; int64 dHead |], device = device).DetachFromDisposeScope()
    let keys = Array.init nLayers (fun _ -> buffer ())
    let values = Array.init nLayers (fun _ -> buffer ())
    let mutable length = 0

    /// Positions stored so far (the position of the next token).
    member _.Length = length
    member _.Capacity = capacity
    member _.Batch = batch
    member _.Layers = nLayers

    /// Stores layer `layer`'s keys and values [batch, n_kv_heads, n, d_head] of the n new positions
    /// (at Length .. Length+n−1) and returns views of all keys and values so far [.., Length+n, ..].
    member _.Append(layer: int, k: torch.Tensor, v: torch.Tensor) : torch.Tensor * torch.Tensor =
        let n = int k.shape.[2]
        if k.shape.[0] <> int64 batch then
            invalidArg "k" (sprintf "KV cache made for batch %d got a batch of %d" batch k.shape.[0])
        if length + n > capacity then
            invalidOp (sprintf "KV cache full: %d positions stored, %d more do not fit in its capacity %d" length n capacity)
        keys.[layer].narrow(2, int64 length, int64 n).copy_(k) |> ignore
        values.[layer].narrow(2, int64 length, int64 n).copy_(v) |> ignore
        keys.[layer].narrow(2, 0L, int64 (length + n)), values.[layer].narrow(2, 0L, int64 (length + n))

    /// Marks n more positions as stored (the model calls this once all layers have appended).
    member _.Advance(n: int) = length <- length + n

    /// Forgets every position (the buffers are reused).
    member _.Reset() = length <- 0

    interface System.IDisposable with
        member _.Dispose() =
            for t in Array.append keys values do t.Dispose()
