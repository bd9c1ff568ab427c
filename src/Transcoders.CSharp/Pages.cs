using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using Microsoft.FSharp.Collections;
using Microsoft.FSharp.Core;
using TorchSharp;
using Transcoders.Circuits;
using Transcoders.Views;
using Tokenizer = Transcoders.Text.Tokenizer;

namespace Transcoders;

/// <summary>The pages <see cref="Pages.WriteAll"/> wrote.</summary>
public sealed class PageSet
{
    internal PageSet(ReportResult r)
    {
        Index = r.Index;
        FeaturePages = r.FeaturePages.ToList();
        GraphPage = FSharpOption<string>.get_IsSome(r.GraphPage) ? r.GraphPage.Value : null;
        Plots = r.Plots;
        GraphJsonFolder = FSharpOption<string>.get_IsSome(r.GraphJson) ? r.GraphJson.Value : null;
        All = r.All.ToList();
    }

    /// <summary>The index of the feature pages.</summary>
    public string Index { get; }
    /// <summary>One feature page per coder.</summary>
    public IReadOnlyList<string> FeaturePages { get; }
    /// <summary>The attribution graph page of the prompt (null without transcoders).</summary>
    public string? GraphPage { get; }
    /// <summary>The plots page.</summary>
    public string Plots { get; }
    /// <summary>circuit-tracer's graph JSON folder (graph, graph-metadata.json, features/), or null.</summary>
    public string? GraphJsonFolder { get; }
    /// <summary>Every path above.</summary>
    public IReadOnlyList<string> All { get; }
}

/// <summary>
/// Pages a person opens offline (self-contained HTML: data embedded, d3 and plotly.js inlined) and the Python
/// ecosystem's formats: feature pages, the attribution graph page, plots, circuit-tracer's graph JSON, SAELens' coder
/// layout. Thin wrappers over <c>Transcoders.Views</c>.
/// </summary>
public static class Pages
{
    private static FSharpFunc<string, Unit> Ignore => FuncConvert.FromAction<string>(_ => { });

    private static Tokenizer TokenizerOf(LanguageModel model, TextTokenizer? tokenizer) =>
        (tokenizer ?? model.Tokenizer ?? throw new ArgumentException("the model has no tokenizer of its own: pass one")).Core;

    /// <summary>
    /// Every page kind for a model and its coders: feature pages (from the shipped TinyStories text) and their index,
    /// the attribution graph page of <paramref name="prompt"/>, a plots page and circuit-tracer's graph JSON.
    /// </summary>
    /// <param name="model">The model the coders belong to.</param>
    /// <param name="coders">Its coders (transcoders for the graph page).</param>
    /// <param name="outFolder">Where the pages go.</param>
    /// <param name="prompt">The prompt of the graph and the prompt plots (also shown on the feature pages).</param>
    /// <param name="tokenizer">The model's tokenizer; null to use the model's own.</param>
    /// <param name="texts">More texts of yours whose activations the feature pages show.</param>
    /// <param name="stories">TinyStories stories read for the feature pages.</param>
    /// <param name="trainingLogs">Training logs (metrics.jsonl, log.jsonl) to plot.</param>
    public static PageSet WriteAll(LanguageModel model, IReadOnlyList<SparseCoder> coders, string outFolder, string prompt,
                                   TextTokenizer? tokenizer = null, IReadOnlyList<string>? texts = null, int stories = 400,
                                   IReadOnlyList<string>? trainingLogs = null)
    {
        var defaults = ReportOptions.Create(outFolder, prompt);
        var dashboard = defaults.Dashboard;
        var allTexts = new[] { prompt }.Concat(texts ?? Array.Empty<string>());
        var dash = new DashboardOptions(dashboard.Stats, dashboard.Context, dashboard.MaxSequences, dashboard.BatchElements,
                                        dashboard.Bands, dashboard.PerBand, dashboard.TopTokens, dashboard.Heads, ListModule.OfSeq(allTexts));
        var logs = (trainingLogs ?? Array.Empty<string>()).Select(p => Tuple.Create(Path.GetFileName(p), p));
        var options = new ReportOptions(outFolder, prompt, stories, dash, defaults.Graph, ListModule.OfSeq(logs),
                                        FSharpOption<string>.None, "model", model.Core.Device);
        var result = Interpretability.writeAll(model.Core, TokenizerOf(model, tokenizer), ListModule.OfSeq(coders.Select(c => c.Core)), options, Ignore);
        return new PageSet(result);
    }

    /// <summary>Feature pages (one per coder) and their index; returns the paths, index last.</summary>
    /// <param name="model">The model the coders belong to.</param>
    /// <param name="coders">The coders.</param>
    /// <param name="outFolder">Where the pages go.</param>
    /// <param name="tokenizer">The model's tokenizer; null to use the model's own.</param>
    /// <param name="texts">Texts of yours whose activations the pages show.</param>
    /// <param name="stories">TinyStories stories read.</param>
    public static IReadOnlyList<string> FeatureDashboards(LanguageModel model, IReadOnlyList<SparseCoder> coders, string outFolder,
                                                          TextTokenizer? tokenizer = null, IReadOnlyList<string>? texts = null, int stories = 400)
    {
        var tok = TokenizerOf(model, tokenizer);
        var d = DashboardOptions.Default;
        var options = new DashboardOptions(d.Stats, d.Context, d.MaxSequences, d.BatchElements, d.Bands, d.PerBand, d.TopTokens, d.Heads,
                                           ListModule.OfSeq(texts ?? Array.Empty<string>()));
        var seqs = Interpretability.shippedStories(tok, stories);
        var dashboards = coders.Select(c => FeatureDashboard.compute(model.Core, tok, Interpretability.coderName(c.Core), c.Core, seqs, options));
        var text = FuncConvert.FromFunc<int, string>(t => Transcoders.Text.TokenizerModule.tokenText(tok, t));
        return FeatureDashboard.write(outFolder, text, options, ListModule.OfSeq(dashboards)).ToList();
    }

    /// <summary>The interactive page of a saved attribution graph (a <c>trace --out</c> file); returns its path.</summary>
    /// <param name="graphFile">The graph file.</param>
    /// <param name="outFile">The page to write.</param>
    /// <param name="tokenizer">Token texts; null to use the graph's own token strings.</param>
    public static string GraphPage(string graphFile, string outFile, TextTokenizer? tokenizer = null)
    {
        var (g, info) = GraphFile.loadWith(graphFile);
        var text = TokenText(g, tokenizer);
        var prompt = info.Description.TryFind("prompt");
        var options = GraphPageOptions.Create("Attribution graph", FSharpOption<string>.get_IsSome(prompt) ? prompt.Value : "", text);
        options = new GraphPageOptions(options.Title, options.Prompt, options.TokenText, options.MaxNodeThreshold, options.MaxEdgeThreshold,
                                       options.NodeThreshold, options.EdgeThreshold, options.FeaturePages, info.Scores, options.Device);
        return Transcoders.Views.GraphPage.write(outFile, options, g);
    }

    /// <summary>A plots page of training curves (metrics.jsonl / log.jsonl) and, optionally, a sweep's frontier.csv.</summary>
    /// <param name="outFile">The page to write.</param>
    /// <param name="trainingLogs">Training logs to plot.</param>
    /// <param name="frontierCsv">A sweep's frontier.csv, or null.</param>
    public static string Plots(string outFile, IReadOnlyList<string> trainingLogs, string? frontierCsv = null)
    {
        var charts = trainingLogs.SelectMany(p => Transcoders.Views.Plots.trainingCurves(Path.GetFileName(p), Transcoders.Views.Plots.readLog(p))).ToList();
        if (frontierCsv != null) charts.AddRange(Transcoders.Views.Plots.frontier(Transcoders.Views.Plots.readFrontierCsv(frontierCsv)));
        return Transcoders.Views.Plots.write(outFile, "Plots", ListModule.OfSeq(charts));
    }

    /// <summary>
    /// Writes a saved graph as circuit-tracer's / Neuronpedia's graph JSON (schema: Neuronpedia's graph-schema.json
    /// 1.0.0 with circuit-tracer's node ids) into <paramref name="outFolder"/>, updating graph-metadata.json there.
    /// </summary>
    /// <param name="graphFile">The graph file.</param>
    /// <param name="outFolder">The folder to write into.</param>
    /// <param name="scan">The model id (<c>metadata.scan</c>).</param>
    /// <param name="tokenizer">Token texts; null to use the graph's own token strings.</param>
    public static string ExportGraphJson(string graphFile, string outFolder, string scan, TextTokenizer? tokenizer = null)
    {
        var (g, info) = GraphFile.loadWith(graphFile);
        var prompt = info.Description.TryFind("prompt");
        var options = GraphExportOptions.Create(Path.GetFileNameWithoutExtension(graphFile), scan,
                                                FSharpOption<string>.get_IsSome(prompt) ? prompt.Value : "", TokenText(g, tokenizer));
        return GraphJson.export(outFolder, options, g);
    }

    /// <summary>Writes a coder in SAELens' layout (cfg.json + sae_weights.safetensors); returns the folder.</summary>
    /// <param name="coder">A ReLU or JumpReLU transcoder, skip transcoder, or an SAE (ReLU, JumpReLU, TopK).</param>
    /// <param name="folder">The folder to write.</param>
    public static string ExportSaeLens(SparseCoder coder, string folder) => SaeLens.export(folder, coder.Core);

    /// <summary>Reads a SAELens folder (cfg.json + sae_weights.safetensors) as a coder.</summary>
    /// <param name="folder">The SAELens folder.</param>
    /// <param name="device">Where to put the weights; null for the CPU.</param>
    public static SparseCoder ImportSaeLens(string folder, torch.Device? device = null) =>
        new SparseCoder(SaeLens.import(folder, device ?? torch.CPU));

    /// <summary>
    /// Writes coders in circuit-tracer's transcoder layout (config.yaml with layer_{l}.safetensors for a transcoder
    /// set, or W_enc_{i}/W_dec_{i}.safetensors for a cross-layer transcoder); returns the folder.
    /// </summary>
    /// <param name="coders">One cross-layer transcoder, or per-layer (skip) transcoders of distinct layers with one
    /// activation (ReLU, JumpReLU or TopK), width and hook pair.</param>
    /// <param name="folder">The folder to write.</param>
    /// <param name="scanName">circuit-tracer's scan_name (the feature set's id in its frontend).</param>
    public static string ExportCircuitTracer(IReadOnlyList<SparseCoder> coders, string folder, string scanName) =>
        CircuitTracer.export(folder, scanName, ListModule.OfSeq(coders.Select(c => c.Core)));

    /// <summary>Reads a circuit-tracer transcoder folder: one coder per layer of a set, or one cross-layer transcoder.</summary>
    /// <param name="folder">The folder holding config.yaml and the safetensors files.</param>
    /// <param name="device">Where to put the weights; null for the CPU.</param>
    public static IReadOnlyList<SparseCoder> ImportCircuitTracer(string folder, torch.Device? device = null) =>
        CircuitTracer.import(folder, device ?? torch.CPU).Select(c => new SparseCoder(c)).ToList();

    private static FSharpFunc<int, string> TokenText(Graph g, TextTokenizer? tokenizer)
    {
        if (tokenizer != null) return FuncConvert.FromFunc<int, string>(t => Transcoders.Text.TokenizerModule.tokenText(tokenizer.Core, t));
        var strings = g.TokenStrings.Length == g.Tokens.Length ? g.TokenStrings : g.Tokens.Select(t => t.ToString()).ToArray();
        var known = new Dictionary<int, string>();
        for (int i = 0; i < g.Tokens.Length; i++) known[g.Tokens[i]] = strings[i];
        return FuncConvert.FromFunc<int, string>(t => known.TryGetValue(t, out var s) ? s : $"<{t}>");
    }
}
