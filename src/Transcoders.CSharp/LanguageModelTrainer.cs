using System;
using System.Collections.Generic;
using System.Linq;
using System.Threading;
using Microsoft.FSharp.Collections;
using Microsoft.FSharp.Core;
using TorchSharp;
using Transcoders.Models;
using Recipe = Transcoders.Models.TinyStoriesGpt;

namespace Transcoders;

/// <summary>What <see cref="LanguageModelTrainer.TrainTinyStories"/> trains (the <c>train-lm</c> command's options;
/// the defaults are its).</summary>
public sealed class LanguageModelTrainingOptions
{
    private static readonly Recipe.Settings Defaults = Recipe.Settings.Default;

    /// <summary>TinyStories-format files (.txt or .txt.gz); null for the shipped ones.</summary>
    public IList<string>? Files { get; set; }

    /// <summary>Compact vocabulary size, specials included.</summary>
    public int VocabSize { get; set; } = Defaults.VocabSize;

    /// <summary>Where the token shards go; null for the cache folder (one folder per vocabulary size).</summary>
    public string? CorpusFolder { get; set; }

    /// <summary>Transformer blocks.</summary>
    public int Layers { get; set; } = Defaults.Layers;

    /// <summary>Residual width.</summary>
    public int DModel { get; set; } = Defaults.DModel;

    /// <summary>Attention heads.</summary>
    public int Heads { get; set; } = Defaults.Heads;

    /// <summary>Context length.</summary>
    public int Ctx { get; set; } = Defaults.Ctx;

    /// <summary>Sequences per step.</summary>
    public int Batch { get; set; } = Defaults.Batch;

    /// <summary>Optimizer steps.</summary>
    public int Steps { get; set; } = Defaults.Steps;

    /// <summary>Peak learning rate (warm-up, then cosine decay to 10%).</summary>
    public double LearningRate { get; set; } = Defaults.Lr;

    /// <summary>Warm-up steps.</summary>
    public int Warmup { get; set; } = Defaults.Warmup;

    /// <summary>Validation loss every this many steps (0: only at the end).</summary>
    public int EvalEvery { get; set; } = Defaults.EvalEvery;

    /// <summary>Checkpoint every this many steps (0: only at the end).</summary>
    public int CheckpointEvery { get; set; } = Defaults.CheckpointEvery;

    /// <summary>A metrics.jsonl record every this many steps.</summary>
    public int LogEvery { get; set; } = Defaults.LogEvery;

    /// <summary>Seed of initialisation and batches.</summary>
    public long Seed { get; set; } = Defaults.Seed;

    /// <summary>Output folder: checkpoints/, metrics.jsonl and model/.</summary>
    public string Out { get; set; } = Defaults.Out;

    /// <summary>Continue from the latest checkpoint in <see cref="Out"/> (otherwise a folder with checkpoints is refused).</summary>
    public bool Resume { get; set; } = Defaults.Resume;

    internal Recipe.Settings ToCore() => new(
        Files is null ? FSharpOption<FSharpList<string>>.None : FSharpOption<FSharpList<string>>.Some(Interop.List(Files)),
        VocabSize, CorpusFolder is null ? FSharpOption<string>.None : FSharpOption<string>.Some(CorpusFolder), Layers, DModel, Heads, Ctx, Batch, Steps, LearningRate, Warmup, EvalEvery, CheckpointEvery, LogEvery, Seed,
        Out ?? throw new ArgumentException("Out must be set", nameof(Out)), Resume);
}

/// <summary>What a language-model training run produced.</summary>
/// <param name="Model">The trained model, with its tokenizer (dispose it).</param>
/// <param name="ModelDir">Where the model is saved (<see cref="LanguageModel.Load"/> reads it).</param>
/// <param name="Steps">Steps done in total (a resumed run counts the earlier ones).</param>
/// <param name="Tokens">Tokens trained on in this run.</param>
/// <param name="Seconds">Training time of this run.</param>
/// <param name="Losses">The loss of every step of this run, in order.</param>
/// <param name="ValidationLoss">Validation loss at the end, nats/token (NaN when not evaluated).</param>
/// <param name="MetricsLog">The JSONL metrics log.</param>
/// <param name="CorpusFolder">The token shards trained on (train/ and validation/), e.g. for <see cref="CoderTrainingOptions.Tokens"/>.</param>
public sealed record LanguageModelTrainingResult(LanguageModel Model, string ModelDir, int Steps, long Tokens, double Seconds,
                                                 IReadOnlyList<double> Losses, double ValidationLoss, string MetricsLog, string CorpusFolder);

/// <summary>Trains language models (the <c>train-lm</c> command as a call).</summary>
public static class LanguageModelTrainer
{
    /// <summary>
    /// Tokenizes TinyStories into a compact vocabulary (cached), creates a GPT-2-style model of the options' shape and
    /// trains it: AdamW, warm-up then cosine decay, gradient clipping, validation loss, checkpoints and exact resume.
    /// The model is saved with its tokenizer in <c>Out/model</c>. Invalid options fail with a message naming them; a
    /// diverged run fails with the step and the checkpoint to use (and writes no final model); a cancelled one returns
    /// the model after the steps done.
    /// </summary>
    /// <param name="options">The model, corpus and run.</param>
    /// <param name="device">Where to train; null for the CPU.</param>
    /// <param name="cancel">Stops early, after checkpointing the current step.</param>
    public static LanguageModelTrainingResult TrainTinyStories(LanguageModelTrainingOptions options, torch.Device? device = null,
                                                               CancellationToken cancel = default)
    {
        ArgumentNullException.ThrowIfNull(options);
        var settings = options.ToCore();
        var corpus = Recipe.prepare(settings);
        var (model, config) = Recipe.create(settings, corpus, device ?? torch.CPU);
        try
        {
            var r = Recipe.trainCancellable(cancel, model, corpus, config);
            model.eval();
            if (r.Run.Outcome is Transcoders.Training.Trainer.Outcome.Diverged d)
            {
                var best = FSharpOption<string>.get_IsSome(r.Run.BestCheckpoint) ? $"; the checkpoint to use: {r.Run.BestCheckpoint.Value}" : "";
                throw new InvalidOperationException($"training diverged at update {d.step}: {d.message}; no final model was written{best}");
            }
            var result = new LanguageModelTrainingResult(
                new LanguageModel(model, new TextTokenizer(corpus.Tokenizer), null),
                r.ModelDir.Value, r.Run.FinalStep, r.Run.Tokens, r.Run.ElapsedSeconds, r.Run.Losses,
                FSharpOption<double>.get_IsSome(r.ValidationLoss) ? r.ValidationLoss.Value : double.NaN, r.Run.MetricsLog,
                corpus.Folder);
            return result;
        }
        catch
        {
            model.Dispose();
            throw;
        }
    }
}
