using System.Collections.Generic;
using Transcoders.Text;
using TokenizerCore = Transcoders.Text.TokenizerModule;

namespace Transcoders;

/// <summary>
/// A tokenizer: GPT-2's byte-level BPE, a compact vocabulary over GPT-2 (tinymodel style), or llama2.c's
/// SentencePiece BPE. Encodes text to ids and decodes ids to text exactly as the reference implementations
/// (tiktoken, llama2.c's run.c). Thread-safe.
/// </summary>
public sealed class TextTokenizer
{
    internal Tokenizer Core { get; }

    internal TextTokenizer(Tokenizer core) => Core = core;

    /// <summary>The shipped GPT-2 tokenizer (50,257 ids; also GPT-Neo's and the TinyStories models').</summary>
    public static TextTokenizer Gpt2() => new(TokenizerCore.gpt2());

    /// <summary>A llama2.c tokenizer file (e.g. <c>tok512.bin</c>) holding <paramref name="vocabSize"/> pieces.</summary>
    /// <param name="path">The tokenizer file.</param>
    /// <param name="vocabSize">Number of pieces; take it from the model (<c>model.Config.VocabSize</c>).</param>
    public static TextTokenizer Llama2c(string path, int vocabSize) => new(TokenizerCore.llama2c(path, vocabSize));

    /// <summary>A compact vocabulary over the shipped GPT-2 tokenizer.</summary>
    /// <param name="vocabulary">The vocabulary (see <see cref="Transcoders.CompactVocabulary.Build"/>).</param>
    public static TextTokenizer Compact(CompactVocabulary vocabulary) => new(TokenizerCore.compact(vocabulary.Core));

    /// <summary>Reads a tokenizer description written by <see cref="Save"/> (any of the three kinds), validating it.</summary>
    /// <param name="path">The JSON file.</param>
    public static TextTokenizer Load(string path) => new(TokenizerCore.load(path));

    /// <summary>Writes the tokenizer's self-describing JSON (see <see cref="ToJson"/>), atomically.</summary>
    /// <param name="path">The file to write.</param>
    public void Save(string path) => TokenizerCore.save(path, Core);

    /// <summary>The self-describing JSON: <c>{"kind":"gpt2"}</c>, the compact vocabulary, or the whole llama2.c vocabulary.</summary>
    public string ToJson() => TokenizerCore.toJson(Core).ToJsonString();

    /// <summary>Number of ids (the embedding's row count).</summary>
    public int VocabSize => TokenizerCore.vocabSize(Core);

    /// <summary>The id that starts a document, or null when the tokenizer has none.</summary>
    public int? Bos => Interop.Nullable(TokenizerCore.bos(Core));

    /// <summary>The id that ends a document, or null when the tokenizer has none.</summary>
    public int? Eos => Interop.Nullable(TokenizerCore.eos(Core));

    /// <summary>The padding id, or null when the tokenizer has none.</summary>
    public int? Pad => Interop.Nullable(TokenizerCore.pad(Core));

    /// <summary>The unknown-token id, or null when the tokenizer has none.</summary>
    public int? Unk => Interop.Nullable(TokenizerCore.unk(Core));

    /// <summary>A short description: "gpt2", "compact(gpt2, 4096)", "llama2c(512)".</summary>
    public string Name => TokenizerCore.describe(Core);

    /// <summary>The compact vocabulary of a compact tokenizer; null for the other kinds.</summary>
    public CompactVocabulary? CompactVocabulary =>
        Core is Tokenizer.Compact compact ? new CompactVocabulary(compact.Item1) : null;

    /// <summary>The ids of plain text, without document markers (GPT-2 treats the text <c>&lt;|endoftext|&gt;</c> as text).</summary>
    /// <param name="text">The text.</param>
    public int[] Encode(string text) => TokenizerCore.encode(Core, text);

    /// <summary>A document's ids: BOS (when <paramref name="addBos"/> and the tokenizer has one), the text's ids, then EOS (when <paramref name="addEos"/>).</summary>
    /// <param name="text">The text.</param>
    /// <param name="addBos">Whether to start with BOS.</param>
    /// <param name="addEos">Whether to end with EOS.</param>
    public int[] EncodeDocument(string text, bool addBos = true, bool addEos = false) =>
        TokenizerCore.encodeDocument(Core, addBos, addEos, text);

    /// <summary>
    /// The text of <paramref name="ids"/>. GPT-2 prints <c>&lt;|endoftext|&gt;</c> for 50256; a compact vocabulary
    /// prints its specials by name; llama2.c drops BOS/EOS and the dummy-prefix space, like SentencePiece.
    /// </summary>
    /// <param name="ids">Token ids.</param>
    public string Decode(IReadOnlyList<int> ids) => TokenizerCore.decode(Core, Interop.Array(ids));

    /// <summary>The text of one token, for display (tokens holding part of a UTF-8 character show U+FFFD).</summary>
    /// <param name="id">A token id.</param>
    public string TokenText(int id) => TokenizerCore.tokenText(Core, id);

    /// <summary>The short description (<see cref="Name"/>).</summary>
    public override string ToString() => Name;
}
