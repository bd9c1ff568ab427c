namespace Transcoders.Views

open System
open System.IO
open System.Text.Json.Nodes
open TorchSharp
open Transcoders.Coders
open Transcoders.Coders.Scalars
open Transcoders.Circuits
open Transcoders.Models
open Transcoders.Text

/// How feature pages are made. Start from `DashboardOptions.Default`.
type DashboardOptions =
    { Stats: FeatureStatsOptions
      /// Sequences are cut to this many tokens.
      Context: int
      /// At most this many sequences of the corpus are read (None: all).
      MaxSequences: int option
      /// Activation entries [sequences × tokens × features] held at once (sets the batch size).
      BatchElements: int64
      /// Quantile bands shown, and examples per band.
      Bands: int
      PerBand: int
      /// Tokens shown for logit effects and de-embeddings (top and bottom).
      TopTokens: int
      /// Attention heads whose OV de-embedding is shown per feature (the heads with the largest OV norm along the
      /// feature's read direction, in layers up to the feature's).
      Heads: int
      /// The user's own texts: the library computes every feature's activations on them and embeds them in the page.
      Texts: string list }

    static member Default =
        { Stats = FeatureStatsOptions.Default; Context = 64; MaxSequences = None; BatchElements = 4_000_000L
          Bands = 4; PerBand = 4; TopTokens = 8; Heads = 2; Texts = [] }

/// A token with a score (logit effect, de-embedding).
type TokenScore = { Token: int; Score: float }

/// What the page shows about a feature beyond its activations: logit effects and de-embeddings.
type FeatureWeights =
    { /// decoder · W_U (through the final norm's weight): the tokens whose logits the feature raises and lowers most.
      TopLogits: TokenScore[]
      BottomLogits: TokenScore[]
      /// W_E · (the feature's read direction): the tokens whose embeddings drive it directly (transcoders only).
      Deembedding: TokenScore[]
      /// Through attention heads' OV circuits: (layer, head, OV norm, top tokens).
      Heads: (int * int * float * TokenScore[])[] }

/// A user's text with the activations of every feature of a coder layer on each token (active ones only,
/// strongest first).
type TextActivations =
    { Text: string
      Tokens: int[]
      /// Per position: (feature, activation) for the active features.
      Active: (int * float32)[][] }

/// One layer of a coder: its features' statistics, weights and the user texts' activations.
type DashboardLayer =
    { Layer: int
      Summaries: FeatureSummary[]
      Weights: FeatureWeights[] option
      Texts: TextActivations[] }

/// Everything a coder's feature page shows.
type CoderDashboard =
    { Name: string
      Description: string
      Model: string
      Layers: DashboardLayer[]
      Sequences: int
      Tokens: int64
      Seconds: float }

/// Feature dashboards: one streamed pass over a corpus per coder (top examples in a bounded heap per feature,
/// quantile samples, density and histogram), logit effects, de-embeddings, and the activations on the user's own
/// texts; then one self-contained page per coder plus an index page.
[<RequireQualifiedAccess>]
module FeatureDashboard =

    let private topOf (k: int) (largest: bool) (scores: torch.Tensor) : TokenScore[][] =
        // scores [F, V] float64 on the CPU
        let k = int (min (int64 k) scores.shape[1])
        if k = 0 then Array.init (int scores.shape[0]) (fun _ -> [||])
        else
            let struct (v, i) = scores.topk(k, dim = 1, largest = largest)
            use v = v
            use i = i
            let vs = v.to_type(torch.float64).cpu().data<float>().ToArray()
            let is = i.cpu().data<int64>().ToArray()
            Array.init (int scores.shape[0]) (fun f -> Array.init k (fun j -> { Token = int is[f * k + j]; Score = vs[f * k + j] }))

    /// The decoder directions [d_sae, d_out] (float64) of coder layer index `i`: its decoders to every output layer
    /// summed (a cross-layer transcoder's feature writes to all of them), in the model's units.
    let decoderDirections (coder: Coder) (i: int) : torch.Tensor =
        use _ = torch.no_grad ()
        let cfg = coder.Config
        let w = coder.WDec[i]
        let mutable acc = torch.zeros([| int64 cfg.DSae; int64 cfg.DOut |], dtype = torch.float64, device = coder.Device)
        for j in i .. cfg.NLayers - 1 do
            use part = w.select(1, int64 (j - i)).to_type(torch.float64).div(sc cfg.Scale.Out[j])
            let next = acc.add part
            acc.Dispose()
            acc <- next
        acc

    /// Logit effects (decoder · W_U through the final norm's weight, centred for LayerNorm) of every feature of
    /// coder layer index `i`: top and bottom `k` tokens. None when the coder does not write the residual stream's width.
    let logitEffects (model: Transformer) (coder: Coder) (i: int) (k: int) : (TokenScore[] * TokenScore[])[] option =
        let c = model.Config
        if coder.Config.DOut <> c.DModel then None
        else
            use _ = torch.no_grad ()
            use scope = torch.NewDisposeScope()
            let ps = Transformer.parameters model |> dict
            let p (name: string) = ps[name].detach().to_type(torch.float64)
            let wU = if c.TiedUnembed then p "embed.weight" else p "unembed.weight"
            let dec = decoderDirections coder i
            let u =
                if c.FinalNorm && ps.ContainsKey "ln_final.weight" then dec.mul(p "ln_final.weight") else dec
            let u = if c.FinalNorm && c.Norm = LayerNorm then u.sub(u.mean([| 1L |], keepdim = true)) else u
            let scores = u.matmul(wU.t()).cpu()
            let tops = topOf k true scores
            let bottoms = topOf k false scores
            Some (Array.map2 (fun a b -> a, b) tops bottoms)

    /// De-embeddings of every feature of coder layer index `i` (direct, and through the `heads` attention heads with
    /// the largest OV norm along the feature's read direction, in layers up to the feature's). None for coders that are
    /// not transcoders of the MLPs (SAEs, skip transcoders).
    let deembeddings (model: Transformer) (coder: Coder) (i: int) (k: int) (heads: int) (live: bool[]) : (TokenScore[] * (int * int * float * TokenScore[])[])[] option =
        let circuit = try Some (CircuitModel.create model [ coder ]) with _ -> None
        match circuit with
        | None -> None
        | Some circuit ->
            use circuit = circuit
            let layer = coder.Config.Layers[i]
            let dSae = coder.Config.DSae
            let dirs = Array.init dSae (fun f -> Attribution.encoderDirection circuit layer f)
            let direct =
                use _ = torch.no_grad ()
                use scope = torch.NewDisposeScope()
                let d = torch.tensor(rawArray = Array.concat dirs, dimensions = ReadOnlySpan<int64>([| int64 dSae; int64 model.Config.DModel |]), dtype = torch.float64)
                let e = circuit.Embed.cpu()
                topOf k true (d.matmul(e.t()))
            // The heads' OV de-embeddings of every live feature at once (the per-feature `Attribution.ovNorms` and
            // `Attribution.deembeddingThroughHead` as matrix products; one feature at a time took ~25 s per coder here).
            let headsAll : (int * int * float * TokenScore[])[][] =
                let none = Array.create dSae [||]
                let liveIdx = Array.init dSae id |> Array.filter (fun f -> live[f])
                if heads <= 0 || liveIdx.Length = 0 then none
                else
                    use _ = torch.no_grad ()
                    use scope = torch.NewDisposeScope()
                    let c = model.Config
                    let e = int64 (TransformerConfig.dHead c)
                    let dm = int64 c.DModel
                    let d =
                        torch.tensor(rawArray = Array.concat [| for f in liveIdx -> dirs[f] |],
                                     dimensions = ReadOnlySpan<int64>([| int64 liveIdx.Length; dm |]), dtype = torch.float64)
                         .``to``(circuit.Device)
                    // ln1(W_Vᵀ W_O^hᵀ u) for every row u of `rows`, with ln1's weight and centring (Attribution.throughNorm)
                    let written (l: int) (h: int) (rows: torch.Tensor) =
                        let g = int64 (h / (c.NHeads / c.NKvHeads))
                        let r = rows.matmul(circuit.WO(l).narrow(1, int64 h * e, e)).matmul(circuit.WV(l).narrow(0, g * e, e))
                        let w, _ = circuit.Ln1 l
                        let r = match w with Some w -> r.mul w | None -> r
                        if c.Norm = LayerNorm then r.sub(r.mean([| -1L |], true)) else r
                    let pairs = [| for l in 0 .. layer do for h in 0 .. c.NHeads - 1 -> l, h |]
                    let norms =
                        [| for l, h in pairs ->
                               use n = (written l h d).norm(1)
                               n.cpu().data<float>().ToArray() |]
                    let chosen =
                        liveIdx |> Array.mapi (fun j _ ->
                            pairs |> Array.mapi (fun q (l, h) -> q, l, h, norms[q][j])
                            |> Array.sortByDescending (fun (_, _, _, n) -> n) |> Array.truncate heads)
                    let tops = Collections.Generic.Dictionary<int * int, TokenScore[]>()
                    for q, (l, h) in Array.indexed pairs do
                        let rows = chosen |> Array.indexed |> Array.filter (fun (_, cs) -> cs |> Array.exists (fun (q', _, _, _) -> q' = q)) |> Array.map fst
                        if rows.Length > 0 then
                            use idx = torch.tensor(rows |> Array.map int64, device = circuit.Device)
                            let scores = (written l h (d.index_select(0, idx))).matmul(circuit.Embed.t()).cpu()
                            topOf k true scores |> Array.iteri (fun r ts -> tops[(rows[r], q)] <- ts)
                    let result = Array.copy none
                    liveIdx |> Array.iteri (fun j f -> result[f] <- chosen[j] |> Array.map (fun (q, l, h, n) -> l, h, n, tops[(j, q)]))
                    result
            Some (Array.init dSae (fun f -> direct[f], headsAll[f]))

    /// Activations of every feature of coder layer index `i` on token batches: calls `onSequence` with each
    /// sequence's tokens and its active (position, feature, value) entries plus a dense accessor.
    let private scan (model: Transformer) (coder: Coder) (i: int) (batch: int[][]) (onSequence: int -> int[] -> (int * int * float32)[] -> (int -> int -> float32) -> unit) =
        let t = batch |> Array.map Array.length |> Array.max
        let b = batch.Length
        // right padding: a causal model's earlier positions do not see later tokens, and padded positions are ignored
        let ids = Array.zeroCreate<int64> (b * t)
        batch |> Array.iteri (fun r s -> s |> Array.iteri (fun p tok -> ids[r * t + p] <- int64 tok))
        use tokens = torch.tensor(dataArray = ids, dimensions = ReadOnlySpan<int64>([| int64 b; int64 t |]), device = model.Device)
        use acts = FeatureAccess.activationsOf model coder i None tokens
        use cpu = acts.to_type(torch.float32).cpu().contiguous()
        let f = int cpu.shape[2]
        let data = cpu.data<float32>().ToArray()
        use nz = (use gt = cpu.gt(sc 0.0) in gt.nonzero())
        let idx = nz.data<int64>().ToArray()
        let perRow = Array.init b (fun _ -> ResizeArray<int * int * float32>())
        for e in 0 .. idx.Length / 3 - 1 do
            let r, p, ft = int idx[3 * e], int idx[3 * e + 1], int idx[3 * e + 2]
            if p < batch[r].Length then perRow[r].Add((p, ft, data[(r * t + p) * f + ft]))
        for r in 0 .. b - 1 do
            let baseOff = r * t * f
            onSequence r batch[r] (perRow[r].ToArray()) (fun p ft -> data[baseOff + p * f + ft])

    /// Sequences of token ids cut into batches whose activation tensors stay within the budget.
    let private batches (options: DashboardOptions) (dSae: int) (sequences: seq<int[]>) : seq<int[][]> =
        let perBatch = max 1 (int (options.BatchElements / (int64 options.Context * int64 dSae)))
        sequences
        |> Seq.map (fun s -> if s.Length > options.Context then s[.. options.Context - 1] else s)
        |> Seq.filter (fun s -> s.Length > 0)
        |> (fun s -> match options.MaxSequences with Some n -> Seq.truncate n s | None -> s)
        |> Seq.chunkBySize perBatch

    /// The activations of every feature of coder layer index `i` on each text (BOS first when the tokenizer has one).
    let textActivations (model: Transformer) (tokenizer: Tokenizer) (coder: Coder) (i: int) (texts: string list) : TextActivations[] =
        [| for text in texts do
               let tokens = Tokenizer.encodeDocument tokenizer true false text
               if tokens.Length > 0 then
                   let tokens = if tokens.Length > model.Config.NCtx then tokens[.. model.Config.NCtx - 1] else tokens
                   let active = Array.init tokens.Length (fun _ -> ResizeArray<int * float32>())
                   scan model coder i [| tokens |] (fun _ _ entries _ -> for (p, f, v) in entries do active[p].Add((f, v)))
                   yield { Text = text; Tokens = tokens
                           Active = active |> Array.map (fun a -> a.ToArray() |> Array.sortByDescending snd) } |]

    /// One streamed pass over `sequences` (token ids, BOS first as the model was trained): every layer of the coder
    /// collected at once, then logit effects, de-embeddings and the user's texts.
    let compute (model: Transformer) (tokenizer: Tokenizer) (name: string) (coder: Coder) (sequences: seq<int[]>) (options: DashboardOptions) : CoderDashboard =
        let sw = Diagnostics.Stopwatch.StartNew()
        let cfg = coder.Config
        if options.Context < 1 then invalidArg "options" "Context must be at least 1"
        let collectors = Array.init cfg.NLayers (fun _ -> FeatureStatsCollector(cfg.DSae, options.Stats))
        let mutable nSeq = 0
        for batch in batches options cfg.DSae sequences do
            nSeq <- nSeq + batch.Length
            for i in 0 .. cfg.NLayers - 1 do
                scan model coder i batch (fun _ tokens entries dense -> collectors[i].Add(tokens, entries, dense))
        let layers =
            Array.init cfg.NLayers (fun i ->
                let summaries = collectors[i].Summaries()
                let live = summaries |> Array.map (fun s -> s.Count > 0L)
                let logits = logitEffects model coder i options.TopTokens
                let deemb = deembeddings model coder i options.TopTokens options.Heads live
                let weights =
                    match logits, deemb with
                    | None, None -> None
                    | _ ->
                        Some (Array.init cfg.DSae (fun f ->
                            let top, bottom = match logits with Some l -> l[f] | None -> [||], [||]
                            let direct, heads = match deemb with Some d -> d[f] | None -> [||], [||]
                            { TopLogits = top; BottomLogits = bottom; Deembedding = direct; Heads = heads }))
                { Layer = cfg.Layers[i]; Summaries = summaries; Weights = weights
                  Texts = textActivations model tokenizer coder i options.Texts })
        { Name = name; Description = Splicing.describe coder; Model = cfg.Model; Layers = layers
          Sequences = nSeq; Tokens = (if collectors.Length > 0 then collectors[0].Tokens else 0L); Seconds = sw.Elapsed.TotalSeconds }

    // ---- the page ----

    let private r4 = Page.round 4

    let private example (e: FeatureExample) : JsonNode =
        Page.obj [ "t", Page.arr (e.Tokens |> Seq.map Page.int)
                   "a", Page.arr (e.Acts |> Seq.map (float >> Page.round 3))
                   "c", Page.int e.Center
                   "s", Page.int e.Sequence
                   "p", Page.int e.Position ]

    let private scores (xs: TokenScore[]) : JsonNode =
        Page.arr [ for x in xs -> Page.arr [ Page.int x.Token; r4 x.Score ] ]

    /// The page's data (also written next to the page as JSON).
    let data (tokenText: int -> string) (options: DashboardOptions) (d: CoderDashboard) : JsonNode =
        let used = Collections.Generic.HashSet<int>()
        let note (ts: int seq) = for t in ts do used.Add t |> ignore
        let layers =
            [ for l in d.Layers ->
                  let features =
                      [ for s in l.Summaries ->
                            let w = l.Weights |> Option.map (fun w -> w[s.Feature])
                            for e in s.Top do note e.Tokens
                            let bands = FeatureStats.quantileExamples options.Bands options.PerBand s
                            for (_, _, es) in bands do for e in es do note e.Tokens
                            match w with
                            | Some w ->
                                for x in Array.concat [ w.TopLogits; w.BottomLogits; w.Deembedding ] do used.Add x.Token |> ignore
                                for (_, _, _, xs) in w.Heads do for x in xs do used.Add x.Token |> ignore
                            | None -> ()
                            Page.obj [
                                yield "f", Page.int s.Feature
                                yield "n", Page.int64 s.Count
                                yield "freq", Page.round 4 s.Frequency
                                yield "max", r4 s.Max
                                yield "min", r4 s.MinPositive
                                yield "mean", r4 s.MeanActive
                                yield "q", Page.arr [ for q in 0 .. 10 -> r4 (FeatureStats.quantile s (float q / 10.0)) ]
                                yield "hist", Page.arr (s.LogHistogram |> Seq.map Page.int64)
                                yield "top", Page.arr (s.Top |> Seq.map example)
                                let band (lo: float, hi: float, es: FeatureExample[]) = Page.obj [ "lo", Page.num lo; "hi", Page.num hi; "ex", Page.arr (es |> Seq.map example) ]
                                yield "bands", Page.arr (bands |> Seq.map band)
                                match w with
                                | Some w ->
                                    yield "logits", Page.obj [ "top", scores w.TopLogits; "bottom", scores w.BottomLogits ]
                                    yield "deembed", scores w.Deembedding
                                    yield "heads", Page.arr [ for (hl, h, n, xs) in w.Heads ->
                                                                  Page.obj [ "layer", Page.int hl; "head", Page.int h; "norm", r4 n; "top", scores xs ] ]
                                | None -> () ] ]
                  let texts =
                      [ for t in l.Texts ->
                            note t.Tokens
                            Page.obj [ "text", Page.str t.Text
                                       "t", Page.arr (t.Tokens |> Seq.map Page.int)
                                       "act", Page.arr [ for a in t.Active -> Page.arr [ for (f, v) in a -> Page.arr [ Page.int f; Page.round 3 (float v) ] ] ] ] ]
                  Page.obj [ "layer", Page.int l.Layer; "features", Page.arr features; "texts", Page.arr texts ] ]
        let vocab = Page.obj [ for t in Seq.sort used -> string t, Page.str (tokenText t) ]
        Page.obj [
            "kind", Page.str "transcoders.feature-dashboard"
            "version", Page.int 1
            "coder", Page.str d.Name
            "description", Page.str d.Description
            "model", Page.str d.Model
            "sequences", Page.int d.Sequences
            "tokens", Page.int64 d.Tokens
            "histEdges", Page.arr (FeatureStats.histogramEdges |> Seq.map Page.num)
            "vocab", vocab
            "layers", Page.arr layers ]

    /// The page file name of a coder's dashboard (`features-<name>.html`), safe on every file system.
    let fileName (name: string) =
        let safe = String(name.ToCharArray() |> Array.map (fun c -> if Char.IsLetterOrDigit c || c = '-' || c = '_' || c = '.' then c else '_'))
        sprintf "features-%s.html" safe

    /// The page spec of a coder's dashboard.
    let page (tokenText: int -> string) (options: DashboardOptions) (d: CoderDashboard) : PageSpec =
        { Title = sprintf "Features of %s" d.Name
          Css = Page.resource "feature-page.css"
          Body = sprintf """<h1>Features of <span id="coder-name">%s</span></h1>
<div class="muted small">%s · model %s · %d sequences, %d tokens · <a href="index.html">all coders</a></div>
<div id="app"></div>""" (Page.escape d.Name) (Page.escape d.Description) (Page.escape d.Model) d.Sequences d.Tokens
          Data = Some (data tokenText options d)
          Assets = [ D3 ]
          Script = Page.resource "feature-page.js" }

    /// The index page over several coders' dashboards: per coder its features' firing-frequency histogram, dead and
    /// dense counts, and a link to its page.
    let indexPage (title: string) (dashboards: CoderDashboard list) : PageSpec =
        let data =
            Page.obj [
                "kind", Page.str "transcoders.feature-index"
                "version", Page.int 1
                "coders",
                Page.arr [ for d in dashboards ->
                               Page.obj [ "name", Page.str d.Name
                                          "description", Page.str d.Description
                                          "model", Page.str d.Model
                                          "page", Page.str (fileName d.Name)
                                          "tokens", Page.int64 d.Tokens
                                          "layers", Page.arr [ for l in d.Layers ->
                                                                   Page.obj [ "layer", Page.int l.Layer
                                                                              "freq", Page.arr [ for s in l.Summaries -> Page.round 3 s.Frequency ] ] ] ] ] ]
        { Title = title
          Css = Page.resource "feature-page.css"
          Body = sprintf "<h1>%s</h1>\n<div class=\"muted small\">Firing frequency of every feature (log10 of the fraction of tokens it is active on); dead features (never active) counted apart.</div>\n<div id=\"app\"></div>" (Page.escape title)
          Data = Some data
          Assets = [ D3 ]
          Script = Page.resource "feature-index.js" }

    /// Writes one page per coder and the index page into `folder`; returns the paths written (index last).
    let write (folder: string) (tokenText: int -> string) (options: DashboardOptions) (dashboards: CoderDashboard list) : string list =
        Directory.CreateDirectory folder |> ignore
        let pages = [ for d in dashboards -> Page.write (Path.Combine(folder, fileName d.Name)) (page tokenText options d) ]
        pages @ [ Page.write (Path.Combine(folder, "index.html")) (indexPage "Feature dashboards" dashboards) ]
