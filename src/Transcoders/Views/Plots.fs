namespace Transcoders.Views

open System
open System.IO
open System.Text.Json.Nodes
open TorchSharp
open XPlot.Plotly
open Transcoders.Coders
open Transcoders.Circuits
open Transcoders.Models
open Transcoders.Text

/// One chart of a plot page: a heading, the XPlot.Plotly chart, and the data it shows (written next to the page).
type PlotChart =
    { Heading: string
      Chart: PlotlyChart
      Data: JsonNode }

/// The activations of a coder layer's strongest features on one prompt (what the prompt plots show).
type PromptActivations =
    { Layer: int
      Tokens: string[]
      /// Feature indices, strongest first (by max activation over the prompt).
      Features: int[]
      /// [feature][position]
      Acts: float[][] }

/// Plots with XPlot.Plotly (the design card's choice), drawn by plotly.js inlined into the page (never a CDN link):
/// training curves, L0 frontiers, feature × token heatmaps, per-layer activation lines, cross-layer correlation
/// matrices, PCA and t-SNE of decoder directions, feature importance. openCLT's visualisation suite done right: token
/// labels kept apart when a token repeats (position-prefixed categories), Pearson correlation over centred values
/// with constant features left out rather than divided by zero, layers and features named as everywhere else in the
/// library (`M{layer}N{feature}`, layers from 0), t-SNE only with more points than its perplexity needs (perplexity
/// lowered to (n − 1)/3 otherwise), importance from the attribution graph's influence rather than summed activations,
/// and every chart's data saved next to the page.
[<RequireQualifiedAccess>]
module Plots =

    /// Text for plotly labels: HTML-escaped, since plotly reads labels as a small HTML subset and decodes entities
    /// (so `<script>` shows as text).
    let label (s: string) = Page.escape s

    /// A chart of these traces with this layout (XPlot's `WithLayout` mutates the chart).
    let plot (traces: Trace seq) (layout: Layout) : PlotlyChart =
        let c = Chart.Plot(traces)
        c.WithLayout layout
        c

    let private jnums (xs: float seq) = Page.arr (xs |> Seq.map (Page.round 5))

    let private layout (title: string) (xTitle: string) (yTitle: string) =
        Layout(title = label title, xaxis = Xaxis(title = label xTitle), yaxis = Yaxis(title = label yTitle),
               margin = Margin(l = 70.0, r = 30.0, t = 50.0, b = 70.0))

    // ---- training curves ----

    /// A training log as (step, metrics) rows: any JSON Lines file whose lines carry a `step` and numbers (the
    /// language model's `metrics.jsonl`, with its `train` and `eval` groups flattened as `train.x` / `eval.x`, and a
    /// coder's `log.jsonl`). Non-numeric values are skipped.
    let readLog (path: string) : (int * Map<string, float>) list =
        [ for line in File.ReadLines path do
              if not (String.IsNullOrWhiteSpace line) then
                  use doc = Text.Json.JsonDocument.Parse line
                  let root = doc.RootElement
                  match root.TryGetProperty "step" with
                  | true, s when s.ValueKind = Text.Json.JsonValueKind.Number ->
                      let values =
                          [ for p in root.EnumerateObject() do
                                match p.Value.ValueKind with
                                | Text.Json.JsonValueKind.Number when p.Name <> "step" -> yield p.Name, p.Value.GetDouble()
                                | Text.Json.JsonValueKind.Object ->
                                    for q in p.Value.EnumerateObject() do
                                        if q.Value.ValueKind = Text.Json.JsonValueKind.Number then yield p.Name + "." + q.Name, q.Value.GetDouble()
                                | _ -> () ]
                      yield s.GetInt32(), Map.ofList values
                  | _ -> () ]

    /// Training curves from a log (`readLog`): one chart of every loss-like series (names containing "loss", and the
    /// evaluation metrics), then one chart per other series (learning rate, L0, FVU, dead fraction, ...). Counters
    /// (tokens, elapsed time, throughput) are left out.
    let trainingCurves (title: string) (rows: (int * Map<string, float>) list) : PlotChart list =
        let keys = rows |> List.collect (fun (_, m) -> m |> Map.toList |> List.map fst) |> List.distinct
        let skip = set [ "tokens"; "elapsed_s"; "tokens_per_s"; "resampled" ]
        let constant (k: string) =
            let vs = rows |> List.choose (fun (_, m) -> m.TryFind k) |> List.filter Double.IsFinite
            vs.IsEmpty || List.max vs - List.min vs <= 1e-12 * max 1.0 (abs (List.max vs))
        let keys = keys |> List.filter (fun k -> not (skip.Contains k) && not (constant k))
        let series (k: string) =
            rows |> List.choose (fun (st, m) -> m.TryFind k |> Option.filter Double.IsFinite |> Option.map (fun v -> float st, v))
        let isLoss (k: string) = k.Contains "loss" || k.StartsWith "eval."
        let lossKeys = keys |> List.filter isLoss
        let trace (k: string) =
            let s = series k
            Scatter(x = (s |> List.map fst), y = (s |> List.map snd), mode = (if k.StartsWith "eval." then "lines+markers" else "lines"), name = label k) :> Trace
        let data (ks: string list) =
            Page.obj [ for k in ks -> k, (let s = series k in Page.obj [ "step", jnums (List.map fst s); "value", jnums (List.map snd s) ]) ]
        [ if not lossKeys.IsEmpty then
              yield { Heading = title + ": loss"; Chart = plot (lossKeys |> List.map trace) (layout (title + ": loss") "step" "loss"); Data = data lossKeys }
          for k in keys do
              if not (isLoss k) then
                  yield { Heading = sprintf "%s: %s" title k; Chart = plot [ trace k ] (layout (sprintf "%s: %s" title k) "step" k); Data = data [ k ] } ]

    // ---- sweeps ----

    /// The L0-vs-CE and L0-vs-FVU frontiers of a sweep: one line per series (kind, layer, width), Pareto points filled.
    let frontier (rows: FrontierRow list) : PlotChart list =
        let bySeries = rows |> List.groupBy (fun r -> r.Series)
        let chart (what: string) (value: FrontierRow -> float) (pareto: FrontierRow -> bool) =
            let traces =
                [ for series, rs in bySeries do
                      let rs = rs |> List.filter (fun r -> Double.IsFinite (value r) && Double.IsFinite r.L0) |> List.sortBy (fun r -> r.L0)
                      yield Scatter(x = (rs |> List.map (fun r -> r.L0)), y = (rs |> List.map value), mode = "lines+markers", name = label series,
                                    text = (rs |> List.map (fun r -> label (sprintf "%s %s" series r.Level))),
                                    marker = Marker(size = 9.0, symbol = (rs |> List.map (fun r -> if pareto r then "circle" else "circle-open")))) :> Trace ]
            plot traces (
                Layout(title = label ("L0 vs " + what), xaxis = Xaxis(title = "L0 (active features per token)", ``type`` = "log"),
                       yaxis = Yaxis(title = label what), margin = Margin(l = 70.0, r = 30.0, t = 50.0, b = 70.0)))
        let data (value: FrontierRow -> float) =
            Page.arr [ for r in rows -> Page.obj [ "series", Page.str r.Series; "level", Page.str r.Level; "l0", Page.num r.L0; "value", Page.num (value r) ] ]
        [ { Heading = "L0 vs spliced CE loss"; Chart = chart "spliced CE loss" (fun r -> r.CeSpliced) (fun r -> r.ParetoCe); Data = data (fun r -> r.CeSpliced) }
          { Heading = "L0 vs FVU"; Chart = chart "FVU" (fun r -> r.Fvu) (fun r -> r.ParetoFvu); Data = data (fun r -> r.Fvu) } ]

    /// Reads a sweep's `frontier.csv`.
    let readFrontierCsv (path: string) : FrontierRow list =
        let lines = File.ReadAllLines path |> Array.filter (fun l -> l.Trim() <> "")
        if lines.Length = 0 || not (lines[0].StartsWith "series,") then failwithf "%s is not a sweep frontier.csv (header series,kind,layer,...)" path
        let f (s: string) = if s = "" then nan else Double.Parse(s, Globalization.CultureInfo.InvariantCulture)
        [ for l in lines[1..] ->
              let c = l.Split(',')
              if c.Length < 11 then failwithf "%s: line '%s' has %d fields (11 expected)" path l c.Length
              { Series = c[0]; Kind = c[1]; Layer = int c[2]; Width = int c[3]; Level = c[4]; L0 = f c[5]; Fvu = f c[6]
                CeSpliced = f c[7]; CeRecovered = f c[8]; ParetoCe = (c[9] = "true"); ParetoFvu = (c[10] = "true") } ]

    // ---- a prompt ----

    /// Unique category labels for tokens (`3: the`), so a repeated token keeps its own column.
    let tokenCategories (tokens: string[]) = tokens |> Array.mapi (fun i t -> label (sprintf "%d: %s" i (t.Replace("\n", "↵"))))

    /// The activations on a prompt of the `top` strongest features of every coder layer.
    let promptActivations (model: Transformer) (tokenizer: Tokenizer) (coders: Coder list) (prompt: string) (top: int) : PromptActivations list =
        let tokens = Tokenizer.encodeDocument tokenizer true false prompt
        if tokens.Length = 0 then invalidArg "prompt" "the prompt is empty"
        let strings = tokens |> Array.map (Tokenizer.tokenText tokenizer)
        use t = torch.tensor(dataArray = (tokens |> Array.map int64), dimensions = ReadOnlySpan<int64>([| 1L; int64 tokens.Length |]), device = model.Device)
        [ for coder in coders do
              for i in 0 .. coder.Config.NLayers - 1 do
                  use acts = FeatureAccess.activationsOf model coder i None t
                  use cpu = acts.select(0, 0L).t().to_type(torch.float64).cpu().contiguous()   // [F, T]
                  let f, p = int cpu.shape[0], int cpu.shape[1]
                  let d = cpu.data<float>().ToArray()
                  let rows = Array.init f (fun j -> Array.sub d (j * p) p)
                  let order = rows |> Array.mapi (fun j r -> j, Array.max r) |> Array.filter (fun (_, m) -> m > 0.0) |> Array.sortByDescending snd |> Array.truncate top |> Array.map fst
                  yield { Layer = coder.Config.Layers[i]; Tokens = strings; Features = order; Acts = order |> Array.map (fun j -> rows[j]) } ]

    /// A feature × token heatmap of one layer on a prompt.
    let heatmap (a: PromptActivations) : PlotChart =
        let names = a.Features |> Array.map (fun f -> sprintf "M%dN%d" a.Layer f)
        let chart =
            plot [ Heatmap(z = a.Acts, x = tokenCategories a.Tokens, y = names, colorscale = "Viridis") :> Trace ]
                (Layout(title = sprintf "Layer %d: strongest features × tokens" a.Layer,
                                   xaxis = Xaxis(title = "token", tickangle = -40.0), yaxis = Yaxis(title = "feature", autorange = "reversed"),
                                   margin = Margin(l = 90.0, r = 30.0, t = 50.0, b = 120.0)))
        { Heading = sprintf "Feature × token heatmap, layer %d" a.Layer
          Chart = chart
          Data = Page.obj [ "layer", Page.int a.Layer; "tokens", Page.arr (a.Tokens |> Seq.map Page.str)
                            "features", Page.arr (a.Features |> Seq.map Page.int); "acts", Page.arr (a.Acts |> Seq.map jnums) ] }

    /// Activation against token position of each layer's strongest features (one chart per layer).
    let layerLines (a: PromptActivations) : PlotChart =
        let x = tokenCategories a.Tokens
        let traces = [ for j in 0 .. a.Features.Length - 1 -> Scatter(x = x, y = a.Acts[j], mode = "lines+markers", name = sprintf "M%dN%d" a.Layer a.Features[j]) :> Trace ]
        { Heading = sprintf "Activations by position, layer %d" a.Layer
          Chart = plot traces (Layout(title = sprintf "Layer %d: activation by token" a.Layer, xaxis = Xaxis(tickangle = -40.0),
                                                      yaxis = Yaxis(title = "activation"), margin = Margin(l = 70.0, r = 30.0, t = 50.0, b = 120.0)))
          Data = Page.obj [ "layer", Page.int a.Layer; "features", Page.arr (a.Features |> Seq.map Page.int); "acts", Page.arr (a.Acts |> Seq.map jnums) ] }

    /// Pearson correlation of two series (NaN when either is constant).
    let pearson (x: float[]) (y: float[]) : float =
        let n = float x.Length
        let mx, my = Array.average x, Array.average y
        let mutable sxy, sxx, syy = 0.0, 0.0, 0.0
        for i in 0 .. x.Length - 1 do
            let dx, dy = x[i] - mx, y[i] - my
            sxy <- sxy + dx * dy; sxx <- sxx + dx * dx; syy <- syy + dy * dy
        ignore n
        if sxx <= 1e-24 || syy <= 1e-24 then nan else sxy / sqrt (sxx * syy)

    /// The correlation matrix (over token positions of the prompt) of the strongest features of all layers; features
    /// constant over the prompt are left out.
    let correlation (layers: PromptActivations list) : PlotChart =
        let series =
            [| for a in layers do
                   for j in 0 .. a.Features.Length - 1 do
                       let s = a.Acts[j]
                       if Array.max s - Array.min s > 1e-12 then yield sprintf "M%dN%d" a.Layer a.Features[j], s |]
        let names = series |> Array.map fst
        let m = series |> Array.map (fun (_, x) -> series |> Array.map (fun (_, y) -> pearson x y))
        { Heading = "Cross-layer feature correlation"
          Chart = plot [ Heatmap(z = m, x = names, y = names, zmin = -1.0, zmax = 1.0, colorscale = "RdBu") :> Trace ]
                      (Layout(title = "Pearson correlation over the prompt's tokens", xaxis = Xaxis(tickangle = -60.0),
                                         yaxis = Yaxis(autorange = "reversed"), margin = Margin(l = 90.0, r = 30.0, t = 50.0, b = 100.0)))
          Data = Page.obj [ "features", Page.arr (names |> Seq.map Page.str); "pearson", Page.arr (m |> Seq.map jnums) ] }

    // ---- decoder geometry ----

    /// The first two principal components of the rows of `x` [n, d].
    let pca2 (x: float[][]) : (float * float)[] =
        if x.Length < 2 then x |> Array.map (fun _ -> 0.0, 0.0)
        else
            use scope = torch.NewDisposeScope()
            let n, d = x.Length, x[0].Length
            let t = torch.tensor(rawArray = Array.concat x, dimensions = ReadOnlySpan<int64>([| int64 n; int64 d |]), dtype = torch.float64)
            let c = t.sub(t.mean([| 0L |], keepdim = true))
            let struct (_, _, vh) = torch.linalg.svd(c, fullMatrices = false)
            let k = min 2L vh.shape[0]
            let p = c.matmul(vh.narrow(0, 0L, k).t()).contiguous()
            let v = p.data<float>().ToArray()
            Array.init n (fun i -> v[i * int k], (if k > 1L then v[i * int k + 1] else 0.0))

    /// Exact t-SNE (van der Maaten & Hinton 2008) to two dimensions: Gaussian affinities with perplexity
    /// `min(perplexity, (n − 1)/3)` found by bisection, early exaggeration 12 for 100 of `iterations` steps, momentum
    /// 0.5 then 0.8, seeded initialisation. O(n²) per step: for up to a few thousand points.
    let tsne (seed: int) (perplexity: float) (iterations: int) (x: float[][]) : (float * float)[] =
        let n = x.Length
        if n < 4 then x |> Array.mapi (fun i _ -> float i, 0.0)
        else
            let perp = min perplexity (float (n - 1) / 3.0)
            let d2 = Array2D.init n n (fun i j -> if i = j then 0.0 else Array.fold2 (fun s a b -> s + (a - b) * (a - b)) 0.0 x[i] x[j])
            let p = Array2D.zeroCreate<float> n n
            let target = log perp
            for i in 0 .. n - 1 do
                let mutable lo, hi, beta = 0.0, Double.PositiveInfinity, 1.0
                let row = Array.zeroCreate<float> n
                for _ in 1 .. 60 do
                    let mutable sum = 0.0
                    let mutable minD = Double.PositiveInfinity
                    for j in 0 .. n - 1 do if j <> i && d2[i, j] < minD then minD <- d2[i, j]
                    for j in 0 .. n - 1 do
                        row[j] <- if j = i then 0.0 else exp (-beta * (d2[i, j] - minD))
                        sum <- sum + row[j]
                    let mutable h = 0.0
                    for j in 0 .. n - 1 do
                        if row[j] > 0.0 then
                            let pj = row[j] / sum
                            h <- h - pj * log pj
                    if h > target then (lo <- beta; beta <- if Double.IsInfinity hi then beta * 2.0 else (beta + hi) / 2.0)
                    else (hi <- beta; beta <- (beta + lo) / 2.0)
                let sum = Array.sum row
                for j in 0 .. n - 1 do p[i, j] <- row[j] / sum
            let pp = Array2D.init n n (fun i j -> max 1e-12 ((p[i, j] + p[j, i]) / (2.0 * float n)))
            let rng = Random(seed)
            let gauss () = sqrt (-2.0 * log (1.0 - rng.NextDouble())) * cos (2.0 * Math.PI * rng.NextDouble())
            let y = Array.init n (fun _ -> [| 1e-4 * gauss (); 1e-4 * gauss () |])
            let vel = Array.init n (fun _ -> [| 0.0; 0.0 |])
            let gains = Array.init n (fun _ -> [| 1.0; 1.0 |])
            let num = Array2D.zeroCreate<float> n n
            let eta = max 50.0 (float n / 12.0)
            for it in 0 .. iterations - 1 do
                let exag = if it < 100 then 12.0 else 1.0
                let mutable z = 0.0
                for i in 0 .. n - 1 do
                    for j in i + 1 .. n - 1 do
                        let dx, dy = y[i][0] - y[j][0], y[i][1] - y[j][1]
                        let q = 1.0 / (1.0 + dx * dx + dy * dy)
                        num[i, j] <- q; num[j, i] <- q
                        z <- z + 2.0 * q
                let mom = if it < 250 then 0.5 else 0.8
                for i in 0 .. n - 1 do
                    let mutable gx, gy = 0.0, 0.0
                    for j in 0 .. n - 1 do
                        if j <> i then
                            let q = num[i, j]
                            let f = (exag * pp[i, j] - q / z) * q
                            gx <- gx + 4.0 * f * (y[i][0] - y[j][0])
                            gy <- gy + 4.0 * f * (y[i][1] - y[j][1])
                    let g = [| gx; gy |]
                    for k in 0 .. 1 do
                        gains[i][k] <- if sign (g[k]) <> sign (vel[i][k]) then gains[i][k] + 0.2 else max 0.01 (gains[i][k] * 0.8)
                        vel[i][k] <- mom * vel[i][k] - eta * gains[i][k] * g[k]
                for i in 0 .. n - 1 do
                    y[i][0] <- y[i][0] + vel[i][0]
                    y[i][1] <- y[i][1] + vel[i][1]
            y |> Array.map (fun v -> v[0], v[1])

    /// PCA and t-SNE scatter plots of the decoder directions of coders' features (at most `maxPoints`, the first
    /// features of each layer in turn), coloured by layer.
    let decoderGeometry (coders: Coder list) (maxPoints: int) (seed: int) : PlotChart list =
        let pts =
            [| for c in coders do
                   for i in 0 .. c.Config.NLayers - 1 do
                       use d = FeatureDashboard.decoderDirections c i
                       use cpu = d.cpu().contiguous()
                       let v = cpu.data<float>().ToArray()
                       let dOut = int cpu.shape[1]
                       let perLayer = max 1 (maxPoints / (coders |> List.sumBy (fun c -> c.Config.NLayers)))
                       for f in 0 .. min (c.Config.DSae - 1) (perLayer - 1) ->
                           let row = Array.sub v (f * dOut) dOut
                           let norm = sqrt (row |> Array.sumBy (fun a -> a * a))
                           c.Config.Layers[i], f, (if norm > 0.0 then row |> Array.map (fun a -> a / norm) else row) |]
        let xs = pts |> Array.map (fun (_, _, r) -> r)
        let chart (title: string) (coords: (float * float)[]) =
            let traces =
                [ for layer, group in pts |> Array.mapi (fun k (l, f, _) -> l, (f, coords[k])) |> Array.groupBy fst ->
                      Scatter(x = (group |> Array.map (fun (_, (_, (a, _))) -> a)), y = (group |> Array.map (fun (_, (_, (_, b))) -> b)),
                              mode = "markers", name = sprintf "layer %d" layer,
                              text = (group |> Array.map (fun (_, (f, _)) -> sprintf "M%dN%d" layer f)), marker = Marker(size = 5.0)) :> Trace ]
            plot traces (layout title "component 1" "component 2")
        let pca = pca2 xs
        let ts = tsne seed 30.0 400 xs
        let data (coords: (float * float)[]) =
            Page.arr [ for k in 0 .. pts.Length - 1 ->
                           let l, f, _ = pts[k]
                           Page.arr [ Page.int l; Page.int f; Page.round 5 (fst coords[k]); Page.round 5 (snd coords[k]) ] ]
        [ { Heading = "PCA of decoder directions"; Chart = chart "Decoder directions: PCA" pca; Data = Page.obj [ "points", data pca ] }
          { Heading = "t-SNE of decoder directions"; Chart = chart "Decoder directions: t-SNE" ts; Data = Page.obj [ "points", data ts ] } ]

    /// Feature importance from an attribution graph: each feature's total influence on the logits (summed over its
    /// positions), the `top` largest, coloured by layer.
    let importance (g: Graph) (device: torch.Device) (top: int) : PlotChart =
        let infl = Pruning.nodeInfluence g device
        let perFeature =
            g.Features |> Array.mapi (fun i f -> (f.Layer, f.Feature), infl[i])
            |> Array.groupBy fst |> Array.map (fun (k, xs) -> k, xs |> Array.sumBy snd)
            |> Array.sortByDescending snd |> Array.truncate top
        let names = perFeature |> Array.map (fun ((l, f), _) -> sprintf "M%dN%d" l f)
        let chart =
            plot [ Bar(x = names, y = (perFeature |> Array.map snd), marker = Marker(color = (perFeature |> Array.map (fun ((l, _), _) -> l)), colorscale = "Viridis", showscale = true)) :> Trace ] (
                Layout(title = "Feature importance: influence on the logits", xaxis = Xaxis(tickangle = -50.0), yaxis = Yaxis(title = "influence"),
                       margin = Margin(l = 70.0, r = 30.0, t = 50.0, b = 110.0)))
        { Heading = "Feature importance (attribution graph influence)"; Chart = chart
          Data = Page.arr [ for ((l, f), v) in perFeature -> Page.obj [ "layer", Page.int l; "feature", Page.int f; "influence", Page.num v ] ] }

    // ---- the page ----

    /// A chart's inline HTML with nothing able to end its script element early.
    let chartHtml (index: int) (c: PlotChart) : string =
        c.Chart.WithId(sprintf "chart-%d" index)
        let html = c.Chart.GetInlineHtml()
        let start = html.IndexOf("<script", StringComparison.Ordinal)
        if start < 0 then html
        else
            let bodyStart = html.IndexOf('>', start) + 1
            let bodyEnd = html.LastIndexOf("</script>", StringComparison.Ordinal)
            if bodyEnd < bodyStart then html
            else html.Substring(0, bodyStart) + html.Substring(bodyStart, bodyEnd - bodyStart).Replace("</", "<\\/") + html.Substring bodyEnd

    /// A page of charts, plotly.js inlined once.
    let page (title: string) (charts: PlotChart list) : PageSpec =
        let body =
            String.concat "\n"
                [ yield sprintf "<h1>%s</h1>" (Page.escape title)
                  for i, c in List.indexed charts do
                      yield sprintf "<h2>%s</h2>\n<div class=\"chart\">%s</div>" (Page.escape c.Heading) (chartHtml i c) ]
        { Title = title
          Css = ".chart { margin-bottom: 18px; }"
          Body = body
          Data = Some (Page.obj [ "kind", Page.str "transcoders.plots"; "version", Page.int 1; "title", Page.str title
                                  "charts", Page.arr [ for c in charts -> Page.obj [ "heading", Page.str c.Heading; "data", c.Data ] ] ])
          Assets = [ Asset.Plotly ]
          Script = "document.querySelectorAll('.chart .plot-container, .chart .js-plotly-plot').length > 0 && markDrawn('plots');" }

    /// Writes a page of charts; returns its path.
    let write (path: string) (title: string) (charts: PlotChart list) : string = Page.write path (page title charts)
