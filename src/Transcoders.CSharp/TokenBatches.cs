using System;
using System.Collections.Generic;
using System.Linq;
using TorchSharp;
using BatchesCore = Transcoders.Text.Batches;

namespace Transcoders;

/// <summary>A language-model batch: inputs and targets, int64 [batch, ctx], targets = inputs shifted by one. Dispose to free both.</summary>
public sealed class TokenBatch : IDisposable
{
    internal TokenBatch(BatchesCore.Batch core)
    {
        Inputs = core.Inputs;
        Targets = core.Targets;
    }

    /// <summary>Input ids [batch, ctx].</summary>
    public torch.Tensor Inputs { get; }

    /// <summary>Target ids [batch, ctx]: the next token of each input position.</summary>
    public torch.Tensor Targets { get; }

    /// <summary>Frees both tensors.</summary>
    public void Dispose()
    {
        Inputs.Dispose();
        Targets.Dispose();
    }
}

/// <summary>Language-model batches from a token stream: random windows and sequential passes (see also <see cref="PackedRows"/>).</summary>
public static class TokenBatches
{
    /// <summary>
    /// Step <paramref name="step"/>'s batch of <paramref name="batchSize"/> windows of ctx+1 tokens at random offsets;
    /// the offsets are a pure function of (seed, step), so a resumed run draws the same batches.
    /// </summary>
    /// <param name="stream">The token stream.</param>
    /// <param name="batchSize">Windows per batch.</param>
    /// <param name="ctx">Positions per window.</param>
    /// <param name="seed">The run's seed.</param>
    /// <param name="step">The step.</param>
    /// <param name="device">Where to put the tensors.</param>
    public static TokenBatch RandomWindows(int[] stream, int batchSize, int ctx, long seed, long step, torch.Device device) =>
        new(BatchesCore.randomWindows(stream, batchSize, ctx, seed, step, device));

    /// <summary>The start offsets of step <paramref name="step"/>'s random windows.</summary>
    /// <param name="length">Length of the stream.</param>
    /// <param name="batchSize">Windows per batch.</param>
    /// <param name="ctx">Positions per window.</param>
    /// <param name="seed">The run's seed.</param>
    /// <param name="step">The step.</param>
    public static int[] WindowStarts(int length, int batchSize, int ctx, long seed, long step) =>
        BatchesCore.windowStarts(length, batchSize, ctx, seed, step);

    /// <summary>
    /// Every target of <paramref name="stream"/> once, in order (for validation loss): batches of up to
    /// <paramref name="batchSize"/> full windows, then one final [1, r] batch with the remaining targets. Streamed.
    /// </summary>
    /// <param name="stream">The token stream.</param>
    /// <param name="batchSize">Windows per batch.</param>
    /// <param name="ctx">Positions per window.</param>
    /// <param name="device">Where to put the tensors.</param>
    public static IEnumerable<TokenBatch> Sequential(int[] stream, int batchSize, int ctx, torch.Device device) =>
        BatchesCore.sequential(stream, batchSize, ctx, device).Select(b => new TokenBatch(b));

    /// <summary>Number of targets a sequential pass over a stream of <paramref name="length"/> tokens covers.</summary>
    /// <param name="length">Length of the stream.</param>
    public static int SequentialTargets(int length) => BatchesCore.sequentialTargets(length);

    /// <summary>Splits a stream at each <paramref name="bos"/> (documents of shards written with BOS).</summary>
    /// <param name="bos">The BOS id.</param>
    /// <param name="stream">The token stream.</param>
    public static int[][] SplitDocuments(int bos, int[] stream) => BatchesCore.splitDocuments(bos, stream);
}

/// <summary>
/// Documents packed into rows: each epoch concatenates all documents (optionally wrapped in BOS/EOS) in a
/// seeded order and cuts them into rows of ctx+1 tokens overlapping by one; step s of batch size B uses rows
/// sB..sB+B−1 of the endless sequence of epochs. Every row is a pure function of (documents, seed, row).
/// </summary>
public sealed class PackedRows
{
    private readonly BatchesCore.PackedRows core;

    /// <summary>Packs <paramref name="documents"/> into rows of <paramref name="ctx"/>+1 tokens.</summary>
    /// <param name="documents">The documents' ids (from shards written with BOS, pass no <paramref name="bos"/>).</param>
    /// <param name="ctx">Positions per row (the model's input length).</param>
    /// <param name="seed">Seed of the per-epoch document order.</param>
    /// <param name="bos">An id to put before each document, or null.</param>
    /// <param name="eos">An id to put after each document, or null.</param>
    public PackedRows(IReadOnlyList<int[]> documents, int ctx, long seed, int? bos = null, int? eos = null)
    {
        ArgumentNullException.ThrowIfNull(documents);
        core = new BatchesCore.PackedRows(documents.ToArray(), ctx, seed, Interop.Some(bos), Interop.Some(eos));
    }

    /// <summary>Tokens per epoch, separators included.</summary>
    public long EpochLength => core.EpochLength;

    /// <summary>Rows of ctx+1 tokens per epoch.</summary>
    public long RowsPerEpoch => core.RowsPerEpoch;

    /// <summary>Positions per row (the model's input length).</summary>
    public int Ctx => core.Ctx;

    /// <summary>The concatenated tokens of an epoch.</summary>
    /// <param name="epoch">The epoch.</param>
    public int[] EpochStream(long epoch) => core.EpochStream(epoch);

    /// <summary>Row <paramref name="row"/> (ctx+1 tokens) of the endless sequence of epochs.</summary>
    /// <param name="row">The row's index.</param>
    public int[] Row(long row) => core.Row(row);

    /// <summary>The epoch a step's first row belongs to.</summary>
    /// <param name="step">The step.</param>
    /// <param name="batchSize">Rows per batch.</param>
    public long EpochOf(long step, int batchSize) => core.EpochOf(step, batchSize);

    /// <summary>Step <paramref name="step"/>'s batch of <paramref name="batchSize"/> rows, on <paramref name="device"/>.</summary>
    /// <param name="step">The step.</param>
    /// <param name="batchSize">Rows per batch.</param>
    /// <param name="device">Where to put the tensors.</param>
    public TokenBatch Batch(long step, int batchSize, torch.Device device) => new(core.Batch(step, batchSize, device));
}
