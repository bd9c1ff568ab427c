// The C# facade in a few lines: a llama2.c model, greedy generation, an activation cache, a spliced transcoder, GPT-2
// tokens; then a program that trains and traces: a small GPT trained on TinyStories, transcoders and a cross-layer
// transcoder trained on it, an attribution graph (pruned, scored, saved, loaded), computational paths, and a feature
// set by an intervention, compared with the graph's prediction.
using Transcoders;

try
{
    Torch.Init();
    var device = Torch.Device("cpu");

    using var model = LanguageModel.Load(Paths.Data("models/stories260K/stories260K.bin"), device);
    var tokenizer = TextTokenizer.Llama2c(Paths.Data("models/stories260K/tok512.bin"), model.Config.VocabSize);

    var story = model.Generate([tokenizer.Bos!.Value], GenerationSettings.Greedy(20));
    Console.WriteLine($"tokens: {string.Join(' ', story.Tokens)}");
    Console.WriteLine($"text: {tokenizer.Decode(story.Tokens)}");

    using (var cache = model.RunWithCache(story.Tokens, [Hooks.ResidPre(0)]))
        Console.WriteLine($"{Hooks.ResidPre(0)}: [{string.Join(", ", cache[Hooks.ResidPre(0)].shape)}]");

    // A transcoder of layer 2's MLP spliced in with error terms: the features are hook points and the output is exact.
    Torch.Seed(0);
    using var transcoder = SparseCoder.CreateTranscoder("stories260K", 2, model.Config.DModel, 4 * model.Config.DModel, 8, device);
    var spliced = new CoderModel(model, [transcoder], errorTerms: true);
    Console.WriteLine($"spliced top-1 agreement: {spliced.Compare(story.Tokens).Top1Agreement}");

    var gpt2 = TextTokenizer.Gpt2();
    var sentence = "Transcoders read the MLP's input and predict its output.";
    Console.WriteLine($"gpt2 text: {sentence}");
    Console.WriteLine($"gpt2 ids: {string.Join(' ', gpt2.Encode(sentence))}");

    // Train and trace, in a scratch folder (tiny settings: this is an example, not a good model).
    var work = Directory.CreateTempSubdirectory("transcoders-csharp-example-").FullName;
    try
    {
        var stories = Path.Combine(work, "stories.txt");
        File.WriteAllText(stories, string.Join("\n<|endoftext|>\n",
            Corpus.ReadStories(Paths.Data("tinystories/ts_v2_valid_head_part2.txt.gz")).Take(400).Select(s => s.Text)));
        var lm = LanguageModelTrainer.TrainTinyStories(new LanguageModelTrainingOptions
        {
            Files = [stories], VocabSize = 512, CorpusFolder = Path.Combine(work, "corpus"),
            Layers = 2, DModel = 32, Heads = 2, Ctx = 32, Batch = 8, Steps = 6, Warmup = 1, LearningRate = 1e-2,
            EvalEvery = 0, CheckpointEvery = 0, Out = Path.Combine(work, "lm"),
        }, device);
        using var gpt = lm.Model;
        Console.WriteLine($"lm steps: {lm.Steps}");
        Console.WriteLine($"lm loss: {lm.Losses[0]:F3} -> {lm.Losses[^1]:F3}");

        var trained = CoderTrainer.Train(lm.ModelDir, new CoderTrainingOptions
        {
            Kinds = ["transcoder", "clt"], Layers = [0, 1], Features = 64, K = 4, Steps = 4, Batch = 64, Ctx = 32,
            Tokens = lm.CorpusFolder, Out = Path.Combine(work, "coders"), CheckpointEvery = 0, EvalRows = 256, SplicedRows = 2,
        }, device);
        Console.WriteLine($"coders: {string.Join(' ', trained.Coders.Select(c => c.Name))}");
        Console.WriteLine($"coder L0: {string.Join(' ', trained.Coders.Select(c => c.L0.ToString("F1", System.Globalization.CultureInfo.InvariantCulture)))}");

        var transcoders = trained.Coders.Where(c => c.Name.StartsWith("transcoder")).Select(c => SparseCoder.Load(c.Path, device)).ToList();
        using var clt = SparseCoder.Load(trained.Coders.Single(c => c.Name.StartsWith("clt")).Path, device);
        Console.WriteLine($"clt: {clt.Kind} layers {string.Join(',', clt.Layers)} {clt.Activation}");
        try
        {
            var prompt = gpt.Tokenizer!.EncodeDocument("Once upon a time there was a");
            var graph = AttributionGraph.Build(gpt, transcoders, prompt, new GraphOptions { MaxFeatureNodes = 200, BatchSize = 16 }, gpt.Tokenizer);
            var pruned = graph.Prune();
            var scores = graph.Scores();
            var file = Path.Combine(work, "graph.safetensors");
            graph.Save(file, scores, new Dictionary<string, string> { ["prompt"] = "Once upon a time there was a" });
            var loaded = AttributionGraph.Load(file, out var savedScores, out var description);
            Console.WriteLine($"graph: {graph.Features.Count} features, {graph.Logits.Count} logits, {graph.NodeCount} nodes; {pruned.KeptNodes.Count} kept");
            Console.WriteLine($"graph reloaded: {loaded.NodeCount == graph.NodeCount && loaded.Edges.Count() == graph.Edges.Count() && savedScores == scores && description["prompt"] == "Once upon a time there was a"}");
            Console.WriteLine($"graph scores in [0, 1]: {scores.Replacement is >= 0 and <= 1 && scores.Completeness is >= 0 and <= 1}");

            using (var paths = new PathFinder(gpt, transcoders, prompt))
            {
                var found = paths.FindToLogit(graph.Logits[0].Token);
                Console.WriteLine($"paths: {found.Count}");
                Console.WriteLine($"best path: {found[0]}");
            }

            // Set the graph's strongest feature at the last position high: the graph predicts the change of each
            // explained logit; the constrained run (attention and normalisation frozen) measures the same direct effect.
            var last = prompt.Length - 1;
            var node = graph.Features.Where(f => f.Position == last).OrderByDescending(f => f.Activation).FirstOrDefault()
                       ?? graph.Features.OrderByDescending(f => f.Activation).First();
            var steer = FeatureIntervention.Parse($"mlp{node.Layer}tc[{node.Feature}]@{node.Position}", prompt.Length, InterventionAction.Set, 4 * node.Activation);
            using (var interventions = new FeatureInterventions(gpt, transcoders, prompt))
            {
                var effects = interventions.CompareWithGraph(graph, [steer]);
                var worst = effects.Max(e => Math.Abs(e.Predicted - e.Constrained) / Math.Max(1.0, Math.Abs(e.Constrained)));
                Console.WriteLine($"intervention on {node.Label}: graph prediction = constrained effect: {worst < 1e-3}");
            }
            var steered = FeatureInterventions.Generate(gpt, transcoders, prompt, [steer with { FromPosition = true }], GenerationSettings.Greedy(5));
            Console.WriteLine($"steered tokens: {steered.NewTokens.Length}");

            var cltGraph = AttributionGraph.Build(gpt, [clt], prompt, new GraphOptions { MaxFeatureNodes = 200, BatchSize = 16 });
            Console.WriteLine($"clt graph logits: {cltGraph.Logits.Count == graph.Logits.Count}");
        }
        finally
        {
            foreach (var t in transcoders) t.Dispose();
        }
    }
    finally
    {
        Directory.Delete(work, true);
    }
    return 0;
}
catch (Exception e)
{
    Console.Error.WriteLine($"error: {e}");
    return 1;
}
