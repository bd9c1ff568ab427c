using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using Microsoft.FSharp.Collections;
using Microsoft.FSharp.Core;
using Transcoders.Cluster;
using Transcoders.Models;

namespace Transcoders;

/// <summary>A coder sweep to run as Slurm jobs: what <c>transcoders sweep … --slurm DIR</c> takes.</summary>
public sealed class ClusterSweepOptions
{
    /// <summary>Kinds: <c>transcoder</c>, <c>skip-transcoder</c>, <c>sae</c>, <c>sae:&lt;hook suffix&gt;</c>.</summary>
    public IList<string> Kinds { get; set; } = new List<string> { "transcoder", "sae" };
    /// <summary>Layers; empty for the middle layer.</summary>
    public IList<int> Layers { get; set; } = new List<int>();
    /// <summary>TopK levels k.</summary>
    public IList<int> Ks { get; set; } = new List<int> { 4, 8, 16, 32 };
    /// <summary>ReLU + L1 levels λ.</summary>
    public IList<double> L1s { get; set; } = new List<double>();
    /// <summary>Features per coder; empty for 16 × d_model.</summary>
    public IList<int> Widths { get; set; } = new List<int>();
    /// <summary>Training steps per configuration.</summary>
    public int Steps { get; set; } = 600;
    /// <summary>Tokens per training batch.</summary>
    public int Batch { get; set; } = 1024;
    /// <summary>Seed of every configuration (the same seeds give the in-process sweep's table).</summary>
    public long Seed { get; set; } = 42;
    /// <summary>Token shards (a folder with train/ and validation/); null for TinyStories in the model's tokenizer.</summary>
    public string? Tokens { get; set; }
    /// <summary><c>#SBATCH</c> options, e.g. <c>partition</c> → <c>gpu</c>, <c>gres</c> → <c>gpu:1</c>, <c>time</c> → <c>04:00:00</c>.</summary>
    public IDictionary<string, string> Sbatch { get; set; } = new Dictionary<string, string>();
    /// <summary>Array tasks running at once (0: as many as Slurm allows).</summary>
    public int MaxParallel { get; set; }
    /// <summary>The command that runs transcoders on a node; null for the current program's command line.</summary>
    public string? Command { get; set; }
    /// <summary><c>--device</c> of every job (<c>auto</c>: CUDA where the node has one).</summary>
    public string Device { get; set; } = "auto";
}

/// <summary>Where a Slurm sweep stands: the finished configurations' metrics and the ones that did not finish.</summary>
public sealed record ClusterSweepSummary(int Finished, IReadOnlyList<string> Unfinished, IReadOnlyList<string> Files);

/// <summary>Coder sweeps as Slurm array jobs over a shared folder (docs/cluster.md): <see cref="Prepare"/> writes the job
/// table and the batch scripts (<c>submit.sh</c> chains the cache, the array of coders and the gather step);
/// <see cref="Gather"/> writes the sweep table, frontier and plot page from the finished runs.</summary>
public static class ClusterSweep
{
    /// <summary>Writes <c>sweep.json</c>, <c>jobs.csv</c>, the three batch scripts and <c>submit.sh</c> into
    /// <paramref name="dir"/>; returns the configurations' names (one array task each).</summary>
    public static IReadOnlyList<string> Prepare(string modelPath, string dir, ClusterSweepOptions options)
    {
        var d = SweepSettings.Default(Path.GetFullPath(modelPath));
        var settings = new SweepSettings(
            d.Model, options.Tokens is null ? FSharpOption<string>.None : FSharpOption<string>.Some(Path.GetFullPath(options.Tokens)),
            ListModule.OfSeq(options.Kinds), ListModule.OfSeq(options.Layers), ListModule.OfSeq(options.Ks),
            ListModule.OfSeq(options.L1s), ListModule.OfSeq(options.Widths), options.Steps, options.Batch, options.Seed,
            d.Ctx, d.BufferRows, d.CheckpointEvery, d.EvalRows, d.SplicedRows);
        var (model, _) = ModelFiles.load(settings.Model, TorchSharp.torch.CPU);
        using (model)
        {
            var slurm = new SlurmOptions(
                "sweep-" + ModelName.ofPath(settings.Model),
                ListModule.OfSeq(options.Sbatch.Select(kv => Tuple.Create(kv.Key, kv.Value))),
                options.MaxParallel, options.Command ?? Slurm.currentCommand(), options.Device, FSharpList<string>.Empty);
            var table = SlurmSweep.prepare(settings, slurm, dir, model);
            return table.Rows.Select(r => r.Name).ToList();
        }
    }

    /// <summary>Stage 3: reads every finished run of the sweep in <paramref name="dir"/> and writes its tables, frontier
    /// and plot page; names the configurations that did not finish.</summary>
    public static ClusterSweepSummary Gather(string dir)
    {
        var table = SlurmSweep.readTable(dir);
        var result = SlurmSweep.gather(table);
        return new ClusterSweepSummary(
            result.Rows.Length,
            result.Unfinished.Select(u => $"{u.Item1.Name} ({u.Item2})").ToList(),
            result.Files.ToList());
    }
}
