using System.Collections.Generic;
using System.Linq;
using ShardsCore = Transcoders.Text.TokenShards;

namespace Transcoders;

/// <summary>A source file of a shard folder and its size.</summary>
/// <param name="Path">The file.</param>
/// <param name="Bytes">Its size in bytes.</param>
public sealed record ShardSource(string Path, long Bytes);

/// <summary>One shard file of a folder.</summary>
/// <param name="File">Its file name inside the folder.</param>
/// <param name="Tokens">Its token count.</param>
public sealed record ShardFileInfo(string File, long Tokens);

/// <summary>A token shard folder's <c>meta.json</c>.</summary>
/// <param name="Split">"train" or "validation" (or the name the writer gave).</param>
/// <param name="SplitRule">The rule that made the split, in words.</param>
/// <param name="TokenizerName">A short name of the tokenizer ("gpt2", "llama2c(512)", ...).</param>
/// <param name="TokenizerJson">The tokenizer's full JSON description.</param>
/// <param name="VocabSize">Number of token ids.</param>
/// <param name="DType">The stored element type: "uint16" or "int32".</param>
/// <param name="Bos">Whether each document starts with BOS.</param>
/// <param name="Eos">Whether each document ends with EOS.</param>
/// <param name="Documents">Number of documents.</param>
/// <param name="Tokens">Number of tokens.</param>
/// <param name="Sources">The corpus files it was made from.</param>
/// <param name="Shards">The shard files, in stream order.</param>
public sealed record ShardSetInfo(
    string Split, string SplitRule, string TokenizerName, string TokenizerJson, int VocabSize, string DType,
    bool Bos, bool Eos, long Documents, long Tokens, IReadOnlyList<ShardSource> Sources, IReadOnlyList<ShardFileInfo> Shards)
{
    internal static ShardSetInfo FromCore(ShardsCore.Meta m) =>
        new(m.Split, m.SplitRule, m.TokenizerName, m.TokenizerJson, m.VocabSize, m.DType.Name, m.Bos, m.Eos, m.Documents, m.Tokens,
            m.Sources.Select(s => new ShardSource(s.Path, s.Bytes)).ToList(),
            m.Shards.Select(s => new ShardFileInfo(s.File, s.Tokens)).ToList());
}

/// <summary>
/// Token shard folders (<c>shard_00000.bin</c>, ... and <c>meta.json</c>): one split's documents as one token
/// stream, with the tokenizer recorded. Every header, size and id is validated on reading.
/// </summary>
public static class TokenShards
{
    /// <summary>Reads and validates a folder's <c>meta.json</c>.</summary>
    /// <param name="folder">The shard folder.</param>
    public static ShardSetInfo ReadInfo(string folder) => ShardSetInfo.FromCore(ShardsCore.readMeta(folder));

    /// <summary>A folder's whole token stream (documents one after the other).</summary>
    /// <param name="folder">The shard folder.</param>
    public static int[] ReadTokens(string folder) => ShardsCore.readTokens(folder);

    /// <summary>The tokenizer recorded in a folder.</summary>
    /// <param name="folder">The shard folder.</param>
    public static TextTokenizer ReadTokenizer(string folder) => new(ShardsCore.tokenizerOf(ShardsCore.readMeta(folder)));

    /// <summary>
    /// Writes documents (ids already with BOS/EOS as <paramref name="bos"/>/<paramref name="eos"/> say) to a shard
    /// folder, replacing an older shard folder there; returns its meta.
    /// </summary>
    /// <param name="folder">The folder to write.</param>
    /// <param name="tokenizer">The tokenizer the ids belong to (recorded in meta.json; ids are checked against its size).</param>
    /// <param name="documents">The documents' ids.</param>
    /// <param name="split">The split's name, e.g. "train".</param>
    /// <param name="bos">Whether each document starts with BOS (recorded).</param>
    /// <param name="eos">Whether each document ends with EOS (recorded).</param>
    /// <param name="sourceFiles">The corpus files the documents come from (their sizes are recorded); null for none.</param>
    /// <param name="splitRule">How the split was made, in words (recorded).</param>
    /// <param name="tokensPerShard">Tokens per shard file; null for the default (16M, as <see cref="ShardOptions"/>).</param>
    public static ShardSetInfo Write(string folder, TextTokenizer tokenizer, IEnumerable<int[]> documents, string split = "train",
                                     bool bos = true, bool eos = false, IEnumerable<string>? sourceFiles = null,
                                     string splitRule = "", long? tokensPerShard = null)
    {
        var info = new ShardsCore.ShardInfo(split, splitRule, bos, eos, ShardsCore.sourcesOf(sourceFiles ?? []));
        return ShardSetInfo.FromCore(ShardsCore.write(folder, tokenizer.Core, info, tokensPerShard ?? ShardsCore.PrepareOptions.Default.TokensPerShard, documents));
    }
}
