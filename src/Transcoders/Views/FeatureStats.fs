namespace Transcoders.Views

open System
open System.Collections.Generic

/// One example of a feature firing: a window of tokens around the token where it fired, with the feature's
/// activation on every token of the window.
type FeatureExample =
    { /// Token ids of the window.
      Tokens: int[]
      /// The feature's activation on each token of the window.
      Acts: float32[]
      /// Index in `Tokens` of the token the example is about.
      Center: int
      /// The activation there.
      Activation: float32
      /// Which sequence of the corpus, and the position in it.
      Sequence: int
      Position: int }

/// Everything the feature pages show about one feature, gathered in one streamed pass over a corpus.
type FeatureSummary =
    { Feature: int
      /// Tokens on which the feature was active (> 0).
      Count: int64
      /// Tokens seen.
      Tokens: int64
      Max: float
      /// The smallest positive activation (NaN when it never fired).
      MinPositive: float
      /// Mean activation where active.
      MeanActive: float
      /// The highest activations, highest first (at most `FeatureStatsOptions.TopExamples`).
      Top: FeatureExample[]
      /// A uniform sample of the feature's firings (reservoir sampling), sorted by activation: quantiles and
      /// quantile examples are read from it.
      Sample: FeatureExample[]
      /// Counts of active tokens per log10-activation bin (`FeatureStats.histogramEdges`; values below the first edge
      /// count in bin 0, above the last in the last bin).
      LogHistogram: int64[] }

    member s.Frequency = if s.Tokens = 0L then 0.0 else float s.Count / float s.Tokens

/// How much to keep per feature (memory is bounded by these, not by the corpus).
type FeatureStatsOptions =
    { /// Top examples kept per feature (a bounded min-heap).
      TopExamples: int
      /// Firings kept per feature in the uniform reservoir sample (for quantiles).
      SampleSize: int
      /// Context tokens before and after the token of an example.
      Before: int
      After: int
      Seed: int }

    static member Default = { TopExamples = 12; SampleSize = 120; Before = 12; After = 4; Seed = 1 }

/// Streaming per-feature statistics: feed activations sequence by sequence (`Add`), then read `Summaries`. Memory per
/// feature is O(TopExamples + SampleSize) windows, whatever the corpus size.
type FeatureStatsCollector(dSae: int, options: FeatureStatsOptions) =
    do
        if dSae <= 0 then invalidArg "dSae" "dSae must be positive"
        if options.TopExamples < 1 then invalidArg "options" "TopExamples must be at least 1"
        if options.SampleSize < 0 || options.Before < 0 || options.After < 0 then invalidArg "options" "SampleSize, Before and After must be non-negative"
    let count = Array.zeroCreate<int64> dSae
    let sum = Array.zeroCreate<float> dSae
    let max = Array.create dSae 0.0
    let minPos = Array.create dSae Double.PositiveInfinity
    let heaps = Array.init dSae (fun _ -> PriorityQueue<FeatureExample, float32>())
    let samples = Array.init dSae (fun _ -> ResizeArray<FeatureExample>())
    let hist = Array.init dSae (fun _ -> Array.zeroCreate<int64> FeatureStatsCollector.Bins)
    let rng = Random(options.Seed)
    let mutable tokens = 0L
    let mutable sequences = 0

    /// log10-activation histogram: `Bins` bins from 10^LogLow to 10^LogHigh.
    static member Bins = 48
    static member LogLow = -3.0
    static member LogHigh = 3.0

    member _.DSae = dSae
    member _.Tokens = tokens
    member _.Sequences = sequences

    /// Adds one sequence: its tokens and the activations of every feature on every token, row-major [tokens.Length,
    /// dSae], given sparsely as (position, feature, value) triples of the active entries (value > 0).
    member _.Add(seqTokens: int[], active: (int * int * float32) seq, dense: int -> int -> float32) =
        let seqIndex = sequences
        sequences <- sequences + 1
        tokens <- tokens + int64 seqTokens.Length
        let window (pos: int) (f: int) (v: float32) =
            let lo = Math.Max(0, pos - options.Before)
            let hi = Math.Min(seqTokens.Length - 1, pos + options.After)
            { Tokens = seqTokens[lo .. hi]
              Acts = [| for p in lo .. hi -> dense p f |]
              Center = pos - lo
              Activation = v
              Sequence = seqIndex
              Position = pos }
        let binWidth = (FeatureStatsCollector.LogHigh - FeatureStatsCollector.LogLow) / float FeatureStatsCollector.Bins
        for (pos, f, v) in active do
            if v > 0.0f then
                let vd = float v
                count[f] <- count[f] + 1L
                sum[f] <- sum[f] + vd
                if vd > max[f] then max[f] <- vd
                if vd < minPos[f] then minPos[f] <- vd
                let b = int (Math.Floor((Math.Log10 vd - FeatureStatsCollector.LogLow) / binWidth))
                let b = Math.Clamp(b, 0, FeatureStatsCollector.Bins - 1)
                hist[f][b] <- hist[f][b] + 1L
                let h = heaps[f]
                if h.Count < options.TopExamples then h.Enqueue(window pos f v, v)
                else
                    let mutable e = Unchecked.defaultof<FeatureExample>
                    let mutable p = 0.0f
                    if h.TryPeek(&e, &p) && v > p then h.DequeueEnqueue(window pos f v, v) |> ignore
                // reservoir sampling (algorithm R)
                let s = samples[f]
                if options.SampleSize > 0 then
                    if int64 s.Count < int64 options.SampleSize then s.Add(window pos f v)
                    else
                        let j = rng.NextInt64(count[f])
                        if j < int64 options.SampleSize then s[int j] <- window pos f v

    /// The summary of every feature.
    member _.Summaries() : FeatureSummary[] =
        Array.init dSae (fun f ->
            let top = heaps[f].UnorderedItems |> Seq.map (fun struct (e, _) -> e) |> Seq.sortByDescending (fun e -> e.Activation, -e.Sequence, -e.Position) |> Array.ofSeq
            { Feature = f
              Count = count[f]
              Tokens = tokens
              Max = max[f]
              MinPositive = (if count[f] = 0L then nan else minPos[f])
              MeanActive = (if count[f] = 0L then nan else sum[f] / float count[f])
              Top = top
              Sample = samples[f] |> Seq.sortBy (fun e -> e.Activation) |> Array.ofSeq
              LogHistogram = Array.copy hist[f] })

/// Reading quantiles and quantile examples from summaries.
[<RequireQualifiedAccess>]
module FeatureStats =

    /// The log10 edges of the activation histogram (Bins + 1 values).
    let histogramEdges =
        let b = FeatureStatsCollector.Bins
        Array.init (b + 1) (fun i -> FeatureStatsCollector.LogLow + (FeatureStatsCollector.LogHigh - FeatureStatsCollector.LogLow) * float i / float b)

    /// The q-quantile (0..1) of the feature's positive activations, estimated from its uniform sample.
    let quantile (s: FeatureSummary) (q: float) : float =
        if s.Sample.Length = 0 then nan
        else
            let i = Math.Clamp(int (Math.Round(q * float (s.Sample.Length - 1))), 0, s.Sample.Length - 1)
            float s.Sample[i].Activation

    /// `bands` activation-quantile bands of the sample (highest first), each with up to `perBand` examples evenly
    /// spread through the band: (lower quantile, upper quantile, examples).
    let quantileExamples (bands: int) (perBand: int) (s: FeatureSummary) : (float * float * FeatureExample[])[] =
        let n = s.Sample.Length
        if n = 0 || bands <= 0 then [||]
        else
            [| for b in bands - 1 .. -1 .. 0 do
                   let lo, hi = n * b / bands, n * (b + 1) / bands
                   if hi > lo then
                       let k = Math.Min(perBand, hi - lo)
                       let picks = [| for i in 0 .. k - 1 -> lo + (hi - lo - 1) * i / Math.Max(1, k - 1) |] |> Array.distinct
                       yield float b / float bands, float (b + 1) / float bands,
                             picks |> Array.rev |> Array.map (fun i -> s.Sample[i]) |]

    /// A linear histogram of the sampled activations over [0, max] in `bins` bins, scaled to the feature's firing
    /// count (what circuit-tracer's feature files hold as `histogram`).
    let linearHistogram (bins: int) (s: FeatureSummary) : float[] * float[] =
        let edges = Array.init (bins + 1) (fun i -> s.Max * float i / float bins)
        let counts = Array.zeroCreate<float> bins
        if s.Sample.Length > 0 && s.Max > 0.0 then
            for e in s.Sample do
                let b = Math.Clamp(int (float e.Activation / s.Max * float bins), 0, bins - 1)
                counts[b] <- counts[b] + 1.0
            let scale = float s.Count / float s.Sample.Length
            for i in 0 .. bins - 1 do counts[i] <- counts[i] * scale
        edges, counts
