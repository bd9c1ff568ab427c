using System.Collections.Generic;
using System.Linq;
using Transcoders.Text;
using CompactCore = Transcoders.Text.CompactVocab;

namespace Transcoders;

/// <summary>
/// tinymodel's compact vocabulary: the K−4 most frequent GPT-2 tokens of a corpus (ties by ascending GPT-2 id),
/// then <c>[BEGIN]</c>, <c>[END]</c>, <c>[PAD]</c>, <c>[UNK]</c> as ids K−4..K−1. Every other GPT-2 token maps to
/// <c>[UNK]</c>. Use it through <see cref="ToTokenizer"/>.
/// </summary>
public sealed class CompactVocabulary
{
    internal CompactCore.CompactVocab Core { get; }

    internal CompactVocabulary(CompactCore.CompactVocab core) => Core = core;

    /// <summary>A vocabulary of <paramref name="size"/> ids from the most frequent GPT-2 tokens of corpus files (<c>&lt;|endoftext|&gt;</c> is never kept).</summary>
    /// <param name="size">K, the number of ids including the four specials (at least 5).</param>
    /// <param name="corpusFiles">TinyStories-style text files (gzip or plain), e.g. <see cref="Corpus.ShippedFiles"/>.</param>
    public static CompactVocabulary Build(int size, IEnumerable<string> corpusFiles) =>
        new(Text.Corpus.buildCompactVocab(Gpt2Tokenizer.get(), size, corpusFiles));

    /// <summary>A vocabulary keeping exactly these GPT-2 ids, in compact-id order.</summary>
    /// <param name="gpt2Ids">The kept GPT-2 ids (distinct, in 0..50256).</param>
    public static CompactVocabulary FromGpt2Ids(IReadOnlyList<int> gpt2Ids) =>
        new(CompactCore.ofBaseIds("gpt2", Gpt2Tokenizer.VocabSize, Interop.Array(gpt2Ids)));

    /// <summary>Reads and validates a vocabulary file written by <see cref="Save"/>.</summary>
    /// <param name="path">The JSON file.</param>
    public static CompactVocabulary Load(string path) => new(CompactCore.load(path));

    /// <summary>Writes the vocabulary as JSON, atomically.</summary>
    /// <param name="path">The file to write.</param>
    public void Save(string path) => CompactCore.save(path, Core);

    /// <summary>The tokenizer that encodes with GPT-2 and maps to this vocabulary.</summary>
    public TextTokenizer ToTokenizer() => TextTokenizer.Compact(this);

    /// <summary>Name of the base tokenizer ("gpt2").</summary>
    public string BaseName => Core.Base;

    /// <summary>Number of ids of the base tokenizer.</summary>
    public int BaseVocabSize => Core.BaseVocabSize;

    /// <summary>K: kept tokens plus the four specials.</summary>
    public int Size => Core.Size;

    /// <summary>Compact id i (below Size − 4) stands for base id <c>BaseIds[i]</c>.</summary>
    public IReadOnlyList<int> BaseIds => Core.BaseIds.ToArray();

    /// <summary>The id of <c>[BEGIN]</c>.</summary>
    public int Begin => Core.Begin;

    /// <summary>The id of <c>[END]</c>.</summary>
    public int End => Core.End;

    /// <summary>The id of <c>[PAD]</c>.</summary>
    public int Pad => Core.Pad;

    /// <summary>The id of <c>[UNK]</c>.</summary>
    public int Unk => Core.Unk;

    /// <summary>Whether <paramref name="id"/> is one of the four specials.</summary>
    /// <param name="id">A compact id.</param>
    public bool IsSpecial(int id) => Core.IsSpecial(id);

    /// <summary>The name of a special id ("[BEGIN]", ...), or null for an ordinary id.</summary>
    /// <param name="id">A compact id.</param>
    public string? SpecialName(int id) => Interop.OrNull(CompactCore.specialName(Core, id));

    /// <summary>Base ids → compact ids (tokens not kept become <c>[UNK]</c>).</summary>
    /// <param name="baseIds">Base (GPT-2) ids.</param>
    public int[] ToCompact(IReadOnlyList<int> baseIds) => CompactCore.toCompact(Core, Interop.Array(baseIds));

    /// <summary>Compact ids → base ids; a special has no base id and raises an error.</summary>
    /// <param name="ids">Compact ids.</param>
    public int[] ToBase(IReadOnlyList<int> ids) => CompactCore.toBase(Core, Interop.Array(ids));

    /// <summary>Fraction of compact tokens that are not <c>[UNK]</c> (other specials ignored); NaN for none.</summary>
    /// <param name="ids">Compact ids of a corpus.</param>
    public double Coverage(IEnumerable<int> ids) => CompactCore.coverage(Core, ids);
}
