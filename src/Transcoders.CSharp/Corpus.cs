using System;
using System.Collections.Generic;
using System.Linq;
using CorpusCore = Transcoders.Text.Corpus;
using ShardsCore = Transcoders.Text.TokenShards;

namespace Transcoders;

/// <summary>One story of a corpus file.</summary>
/// <param name="Source">The file it was read from.</param>
/// <param name="Index">Its 0-based position among the file's stories.</param>
/// <param name="Text">The story's text.</param>
public sealed record Story(string Source, int Index, string Text);

/// <summary>What <see cref="Corpus.Stats"/> reports about corpus files.</summary>
/// <param name="Files">Number of files.</param>
/// <param name="Stories">Number of stories.</param>
/// <param name="Characters">UTF-16 characters of story text.</param>
/// <param name="Tokens">Tokens of the stories' text (no BOS/EOS).</param>
/// <param name="DistinctTokens">Number of distinct token ids seen.</param>
/// <param name="Coverage">For a compact vocabulary, the fraction of tokens that are not <c>[UNK]</c>; otherwise null.</param>
public sealed record CorpusStatistics(int Files, long Stories, long Characters, long Tokens, int DistinctTokens, double? Coverage);

/// <summary>Train or validation.</summary>
public enum CorpusSplit
{
    /// <summary>Training data.</summary>
    Train,
    /// <summary>Validation data.</summary>
    Validation,
}

/// <summary>How stories are assigned to the train or validation split.</summary>
public sealed class SplitRule
{
    internal CorpusCore.SplitRule Core { get; }

    private SplitRule(CorpusCore.SplitRule core) => Core = core;

    /// <summary>Stories of the listed files (by file name or full path) go to validation, all others to training.</summary>
    /// <param name="validationFiles">File names or paths of the validation files.</param>
    public static SplitRule ByFile(params string[] validationFiles) =>
        new(CorpusCore.SplitRule.NewByFile(Interop.List(validationFiles)));

    /// <summary>
    /// Each story goes to validation with probability <paramref name="fraction"/>, decided by a seeded hash of its
    /// text: the same story lands in the same split whatever the file order.
    /// </summary>
    /// <param name="fraction">Probability of validation, in [0, 1].</param>
    /// <param name="seed">Seed of the hash.</param>
    public static SplitRule HeldOut(double fraction, long seed) =>
        new(CorpusCore.SplitRule.NewHeldOut(fraction, seed));

    /// <summary>A description of the rule, as recorded in shard folders.</summary>
    public string Description => Core.Describe;

    /// <summary>The description (<see cref="Description"/>).</summary>
    public override string ToString() => Description;
}

/// <summary>How <see cref="Corpus.PrepareShards"/> turns corpus files into token shards.</summary>
public sealed class ShardOptions
{
    private static readonly ShardsCore.PrepareOptions Defaults = ShardsCore.PrepareOptions.Default;

    /// <summary>How stories are split; by default the shipped V1 validation head is the validation split.</summary>
    public SplitRule Split { get; set; } = SplitRule.ByFile(CorpusCore.shippedValidationFile);

    /// <summary>Put BOS before each document (when the tokenizer has one). Default true.</summary>
    public bool AddBos { get; set; } = Defaults.AddBos;

    /// <summary>Put EOS after each document (when the tokenizer has one). Default false.</summary>
    public bool AddEos { get; set; } = Defaults.AddEos;

    /// <summary>Tokens per shard file. Default 16M.</summary>
    public long TokensPerShard { get; set; } = Defaults.TokensPerShard;

    internal ShardsCore.PrepareOptions ToCore() =>
        new((Split ?? throw new ArgumentNullException(nameof(Split))).Core, AddBos, AddEos, TokensPerShard);
}

/// <summary>The two shard folders <see cref="Corpus.PrepareShards"/> writes.</summary>
/// <param name="Train">The training split (<c>outFolder/train</c>).</param>
/// <param name="Validation">The validation split (<c>outFolder/validation</c>).</param>
public sealed record PreparedShards(ShardSetInfo Train, ShardSetInfo Validation);

/// <summary>TinyStories-style corpora: reading stories, statistics, tokenization into shard folders.</summary>
public static class Corpus
{
    /// <summary>The shipped TinyStories files (<c>data/tinystories/*.txt.gz</c>), sorted by name.</summary>
    public static IReadOnlyList<string> ShippedFiles => CorpusCore.shippedFiles().ToList();

    /// <summary>The file name of the shipped validation text (Hugging Face's V1 validation split, head).</summary>
    public static string ShippedValidationFile => CorpusCore.shippedValidationFile;

    /// <summary>
    /// The stories of one file, streamed: text between <c>&lt;|endoftext|&gt;</c> delimiters, trimmed, empty ones
    /// skipped (gzip is detected, invalid UTF-8 raises <c>CorpusError</c> with the byte offset).
    /// </summary>
    /// <param name="path">A text file, plain or gzip.</param>
    public static IEnumerable<Story> ReadStories(string path) =>
        CorpusCore.readStories(path).Select(s => new Story(s.Source, s.Index, s.Text));

    /// <summary>The stories of several files, in file order, streamed.</summary>
    /// <param name="paths">Text files, plain or gzip.</param>
    public static IEnumerable<Story> ReadStories(IEnumerable<string> paths) =>
        CorpusCore.readAllStories(paths).Select(s => new Story(s.Source, s.Index, s.Text));

    /// <summary>The split a story belongs to under <paramref name="rule"/>.</summary>
    /// <param name="rule">The split rule.</param>
    /// <param name="story">The story.</param>
    public static CorpusSplit SplitOf(SplitRule rule, Story story)
    {
        var split = CorpusCore.assign(rule.Core, new CorpusCore.Story(story.Source, story.Index, story.Text));
        return split.IsTrain ? CorpusSplit.Train : CorpusSplit.Validation;
    }

    /// <summary>Documents of texts (<see cref="TextTokenizer.EncodeDocument"/>), tokenized in parallel, in order, streamed.</summary>
    /// <param name="tokenizer">The tokenizer.</param>
    /// <param name="texts">The texts.</param>
    /// <param name="addBos">Start each document with BOS (when the tokenizer has one).</param>
    /// <param name="addEos">End each document with EOS (when the tokenizer has one).</param>
    public static IEnumerable<int[]> Tokenize(TextTokenizer tokenizer, IEnumerable<string> texts, bool addBos = true, bool addEos = false) =>
        CorpusCore.tokenize(tokenizer.Core, addBos, addEos, texts);

    /// <summary>Stories, characters, tokens, distinct tokens (and compact-vocabulary coverage) of corpus files.</summary>
    /// <param name="tokenizer">The tokenizer that counts tokens.</param>
    /// <param name="files">Text files, plain or gzip.</param>
    public static CorpusStatistics Stats(TextTokenizer tokenizer, IEnumerable<string> files)
    {
        var s = CorpusCore.stats(tokenizer.Core, files);
        return new CorpusStatistics(s.Files, s.Stories, s.Characters, s.Tokens, s.DistinctTokens, Interop.Nullable(s.Coverage));
    }

    /// <summary>
    /// Tokenizes corpus files into <c>outFolder/train</c> and <c>outFolder/validation</c> token shard folders
    /// (in parallel, in story order), each written beside its destination and moved into place when complete.
    /// </summary>
    /// <param name="tokenizer">The tokenizer (recorded in each folder's meta.json).</param>
    /// <param name="files">Text files, plain or gzip.</param>
    /// <param name="outFolder">The folder to hold <c>train</c> and <c>validation</c>.</param>
    /// <param name="options">Split rule, BOS/EOS and shard size; null for the defaults.</param>
    public static PreparedShards PrepareShards(TextTokenizer tokenizer, IEnumerable<string> files, string outFolder, ShardOptions? options = null)
    {
        var (train, validation) = ShardsCore.prepare(tokenizer.Core, files, (options ?? new ShardOptions()).ToCore(), outFolder);
        return new PreparedShards(ShardSetInfo.FromCore(train), ShardSetInfo.FromCore(validation));
    }
}
