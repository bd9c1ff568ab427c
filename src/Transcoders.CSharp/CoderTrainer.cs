using System;
using System.Collections.Generic;
using System.Linq;
using Microsoft.FSharp.Core;
using TorchSharp;
using Transcoders.Coders;
using Transcoders.Models;
using CoderActivation = Transcoders.Coders.CoderActivation;

namespace Transcoders;

/// <summary>What <see cref="CoderTrainer.Train"/> trains: coders of some kinds at some layers, one width, one
/// activation, all fed from one activation stream (the model runs once per batch for all of them).</summary>
public sealed class CoderTrainingOptions
{
    /// <summary>Kinds: <c>transcoder</c>, <c>skip-transcoder</c>, <c>sae</c> (on hook_mlp_out), <c>sae:&lt;hook suffix&gt;</c>
    /// or <c>clt</c> (one cross-layer transcoder over the layers, named <c>clt-L0-1-…</c>).</summary>
    public IList<string> Kinds { get; set; } = new List<string> { "transcoder" };

    /// <summary>Layers to train at; empty for every layer.</summary>
    public IList<int> Layers { get; set; } = new List<int>();

    /// <summary>Features per coder; null for 16 × d_model.</summary>
    public int? Features { get; set; }

    /// <summary><c>topk</c> (default), <c>batchtopk</c>, <c>groupmax</c> (k groups of d_sae/k), <c>relu</c> (L1 penalty) or <c>jumprelu</c>.</summary>
    public string Activation { get; set; } = "topk";

    /// <summary>Features kept per token (TopK / BatchTopK); null for d_model / 4.</summary>
    public int? K { get; set; }

    /// <summary>Sparsity coefficient λ of ReLU / JumpReLU coders.</summary>
    public double Lambda { get; set; } = 1.0;

    /// <summary>Training steps.</summary>
    public int Steps { get; set; } = 600;

    /// <summary>Tokens per training batch.</summary>
    public int Batch { get; set; } = 1024;

    /// <summary>Seed of initialisation, text order and shuffling.</summary>
    public long Seed { get; set; } = 42;

    /// <summary>Adam's learning rate; null for the width's default.</summary>
    public double? LearningRate { get; set; }

    /// <summary>Output folder: a sub-folder per coder, checkpoints, logs and metrics tables.</summary>
    public string Out { get; set; } = "coders";

    /// <summary>Token shards (a folder with train/ and validation/); null for TinyStories in the model's tokenizer.</summary>
    public string? Tokens { get; set; }

    /// <summary>Steps between checkpoints (0: only at the end); a run resumes from the last one.</summary>
    public int CheckpointEvery { get; set; } = 500;

    /// <summary>Continue from a checkpoint of the same run in <see cref="Out"/> (otherwise start over).</summary>
    public bool Resume { get; set; } = true;

    /// <summary>Tokens per text row; null for min(128, the model's context).</summary>
    public int? Ctx { get; set; }

    /// <summary>Held-out activation rows for L0 / FVU.</summary>
    public long EvalRows { get; set; } = 32768;

    /// <summary>Validation rows spliced into the model for CE loss recovered.</summary>
    public int SplicedRows { get; set; } = 128;
}

/// <summary>One trained coder and its evaluation.</summary>
/// <param name="Name">Its name (e.g. <c>transcoder-L1</c>).</param>
/// <param name="Path">The folder it is saved in (<see cref="SparseCoder.Load"/> reads it).</param>
/// <param name="L0">Mean active features per token on held-out activations.</param>
/// <param name="Fvu">Fraction of variance unexplained.</param>
/// <param name="DeadFraction">Fraction of features that never fired on the held-out rows.</param>
/// <param name="CeRecovered">CE loss recovered when spliced alone (NaN when not evaluated).</param>
/// <param name="KlToClean">KL to the original when spliced alone (NaN when not evaluated).</param>
public sealed record TrainedCoder(string Name, string Path, double L0, double Fvu, double DeadFraction, double CeRecovered, double KlToClean);

/// <summary>What a training run produced.</summary>
/// <param name="Coders">The coders, in (kind, layer) order.</param>
/// <param name="JointCeRecovered">CE loss recovered with every transcoder spliced at once (NaN when not evaluated).</param>
/// <param name="MetricsMarkdown">The metrics table, as metrics.md holds it.</param>
public sealed record CoderTrainingResult(IReadOnlyList<TrainedCoder> Coders, double JointCeRecovered, string MetricsMarkdown);

/// <summary>Trains sparse coders on a model's activations (the <c>train-coder</c> command as a call).</summary>
public static class CoderTrainer
{
    /// <summary>
    /// Trains the coders <paramref name="options"/> describe on the model at <paramref name="modelPath"/>, saves
    /// and evaluates them (L0, FVU, spliced CE). Resumes from a checkpoint of the same run in the output folder.
    /// Coders that do not fit the model, and diverging training, fail with a message naming the coder.
    /// </summary>
    /// <param name="modelPath">A model folder of our format, a Hugging Face folder or a llama2.c file.</param>
    /// <param name="options">What to train.</param>
    /// <param name="device">Where to train; null for the CPU.</param>
    /// <param name="progress">Progress lines (phases and logged steps); null for none.</param>
    public static CoderTrainingResult Train(string modelPath, CoderTrainingOptions options, torch.Device? device = null, Action<string>? progress = null)
    {
        ArgumentNullException.ThrowIfNull(modelPath);
        ArgumentNullException.ThrowIfNull(options);
        var dev = device ?? torch.CPU;
        var dModel = ModelFiles.inspect(modelPath).Config.DModel;
        var settings = CoderRun.settingsOf(
            Interop.List(options.Kinds), Interop.List(options.Layers), Interop.Some(options.Features), options.Activation,
            Interop.Some(options.K), options.Lambda, options.Steps, options.Batch, options.Seed, Interop.Some(options.LearningRate),
            options.Out, options.Tokens is null ? FSharpOption<string>.None : FSharpOption<string>.Some(options.Tokens),
            Interop.Some(options.Ctx), options.CheckpointEvery, options.Resume, options.EvalRows, options.SplicedRows, dModel);
        var onProgress = FuncConvert.FromAction<JobsProgress>(p =>
        {
            if (progress is null) return;
            switch (p)
            {
                case JobsProgress.Preparing x: progress(x.what); break;
                case JobsProgress.Evaluating x: progress($"evaluating {x.coder}"); break;
                case JobsProgress.Checkpointed x: progress($"checkpoint at step {x.step}"); break;
                case JobsProgress.Trained x when !x.logs.IsEmpty:
                    progress($"step {x.step}/{x.steps}: " + string.Join(" | ", x.logs.Select(l => $"{l.Item1} L0 {l.Item2.L0:F1} FVU {l.Item2.Fvu:F3}")));
                    break;
            }
        });
        var result = CoderRun.train(modelPath, settings, dev, onProgress);
        var coders = result.Coders.Select(r => new TrainedCoder(
            r.Name, r.Path,
            FSharpOption<EvalResult>.get_IsSome(r.Metrics) ? r.Metrics.Value.L0 : double.NaN,
            FSharpOption<EvalResult>.get_IsSome(r.Metrics) ? r.Metrics.Value.Fvu : double.NaN,
            FSharpOption<EvalResult>.get_IsSome(r.Metrics) ? r.Metrics.Value.DeadFraction : double.NaN,
            FSharpOption<SplicedEval.SplicedMetrics>.get_IsSome(r.Spliced) ? r.Spliced.Value.CeRecovered : double.NaN,
            FSharpOption<SplicedEval.SplicedMetrics>.get_IsSome(r.Spliced) ? r.Spliced.Value.KlToClean : double.NaN)).ToList();
        var joint = FSharpOption<SplicedEval.SplicedMetrics>.get_IsSome(result.Joint) ? result.Joint.Value.CeRecovered : double.NaN;
        var md = System.IO.File.ReadAllText(System.IO.Path.Combine(options.Out, "metrics.md"));
        return new CoderTrainingResult(coders, joint, md);
    }
}
