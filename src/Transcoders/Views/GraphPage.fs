namespace Transcoders.Views

open System
open System.IO
open System.Text.Json.Nodes
open Transcoders.Circuits

/// How the graph page is made.
type GraphPageOptions =
    { Title: string
      Prompt: string
      /// Display text of a token id.
      TokenText: int -> string
      /// The loosest thresholds the page's sliders reach: the graph is pruned with these once, and the page prunes
      /// further as the sliders move.
      MaxNodeThreshold: float
      MaxEdgeThreshold: float
      /// Where the sliders start (circuit-tracer's defaults 0.8 and 0.98).
      NodeThreshold: float
      EdgeThreshold: float
      /// Feature page of each layer's coder (a path relative to the graph page), for links from feature nodes.
      FeaturePages: Map<int, string>
      /// Graph scores shown in the header, when computed.
      Scores: GraphScores option
      Device: TorchSharp.torch.Device }

    static member Create(title: string, prompt: string, tokenText: int -> string) =
        { Title = title; Prompt = prompt; TokenText = tokenText; MaxNodeThreshold = 0.95; MaxEdgeThreshold = 0.995
          NodeThreshold = 0.8; EdgeThreshold = 0.98; FeaturePages = Map.empty; Scores = None; Device = TorchSharp.torch.CPU }

/// The interactive attribution-graph page: nodes placed by layer and token position, edges weighted and coloured by
/// sign; click a node for its strongest inputs and outputs and its feature page; hover a token; node and edge
/// thresholds adjustable in the page; supernodes grouped by hand, kept in the browser and saved as JSON
/// (circuit-tracer's `qParams.supernodes` layout). Drawn with d3 (vendored).
///
/// In the page, a node is kept when its cumulative influence (`PrunedGraph.CumulativeInfluence`, the quantity
/// circuit-tracer's node threshold is compared with) is within the node threshold (tokens and logits always), and an
/// edge when its cumulative share of the influence-weighted edge scores Â_ts·(I_t + w_t) is within the edge threshold;
/// features and errors left without edges are hidden. This is circuit-tracer's pruning done in one pass, without its
/// repeated clean-up of dangling nodes.
[<RequireQualifiedAccess>]
module GraphPage =

    /// The page's data.
    let data (options: GraphPageOptions) (g: Graph) : JsonNode =
        let pruned = Pruning.prune { NodeThreshold = options.MaxNodeThreshold; EdgeThreshold = options.MaxEdgeThreshold; Device = options.Device } g
        let infl = Pruning.nodeInfluence g options.Device
        let logitW = Array.zeroCreate<float> g.NodeCount
        g.Logits |> Array.iteri (fun k l -> logitW[g.LogitStart + k] <- l.Probability)
        // row sums of |A| over the whole graph (Â is row-normalised)
        let rowAbs = Array.zeroCreate<float> g.NodeCount
        for t, _, w in Graph.edges g do rowAbs[t] <- rowAbs[t] + abs (float w)
        let kept = pruned.KeptNodes
        let index = Collections.Generic.Dictionary<int, int>()
        kept |> Array.iteri (fun k i -> index[i] <- k)
        let edges =
            pruned.Edges
            |> Array.filter (fun e -> index.ContainsKey e.Source && index.ContainsKey e.Target)
            |> Array.map (fun e ->
                let score = if rowAbs[e.Target] > 0.0 then abs (float e.Weight) / rowAbs[e.Target] * (infl[e.Target] + logitW[e.Target]) else 0.0
                e, score)
            |> Array.sortByDescending snd
        let total = edges |> Array.sumBy snd
        let mutable acc = 0.0
        let edgeCum =
            edges |> Array.map (fun (e, s) ->
                acc <- acc + s
                e, (if total > 0.0 then acc / total else 1.0))
        let style = ErrorIdStyle.Current
        let nodes =
            [ for i in kept ->
                  let common (kind: string) (layer: int) (pos: int) (label: string) (extra: (string * JsonNode) list) =
                      Page.obj ([ "id", Page.str (GraphJson.nodeId style g i); "kind", Page.str kind; "layer", Page.int layer
                                  "pos", Page.int pos; "label", Page.str label; "cum", Page.round 5 pruned.CumulativeInfluence[i]
                                  "infl", Page.round 4 infl[i] ] @ extra)
                  match Graph.node g i with
                  | GraphNode.Feature f ->
                      common "feature" f.Layer f.Position (Graph.label g i)
                          [ "f", Page.int f.Feature; "act", Page.round 4 f.Activation
                            "page", (match options.FeaturePages.TryFind f.Layer with
                                     | Some p -> Page.str (sprintf "%s#layer=%d&feature=%d" p f.Layer f.Feature)
                                     | None -> null) ]
                  | GraphNode.Error (l, p) -> common "error" l p (Graph.label g i) []
                  | GraphNode.Token (p, t) -> common "token" -1 p (options.TokenText t) [ "token", Page.int t ]
                  | GraphNode.Logit l ->
                      common "logit" g.NLayers (g.NPositions - 1) (options.TokenText l.Token)
                          [ "token", Page.int l.Token; "prob", Page.round 4 l.Probability ] ]
        Page.obj [
            "kind", Page.str "transcoders.graph-page"
            "version", Page.int 1
            "title", Page.str options.Title
            "prompt", Page.str options.Prompt
            "tokens", Page.arr [ for t in g.Tokens -> Page.str (options.TokenText t) ]
            "nLayers", Page.int g.NLayers
            "nodeThreshold", Page.num options.NodeThreshold
            "edgeThreshold", Page.num options.EdgeThreshold
            "maxNodeThreshold", Page.num options.MaxNodeThreshold
            "maxEdgeThreshold", Page.num options.MaxEdgeThreshold
            "scores", (match options.Scores with
                       | Some s -> Page.obj [ "replacement", Page.round 4 s.Replacement; "completeness", Page.round 4 s.Completeness ]
                       | None -> null)
            "nodes", Page.arr nodes
            "links", Page.arr [ for e, cum in edgeCum ->
                                    Page.arr [ Page.int index[e.Source]; Page.int index[e.Target]; Page.round 4 (float e.Weight); Page.round 5 cum ] ] ]

    /// The page spec.
    let page (options: GraphPageOptions) (g: Graph) : PageSpec =
        { Title = options.Title
          Css = Page.resource "graph-page.css"
          Body = sprintf """<h1>%s</h1>
<div class="muted small" id="prompt-line">prompt: <span class="tok">%s</span></div>
<div id="app"></div>""" (Page.escape options.Title) (Page.escape options.Prompt)
          Data = Some (data options g)
          Assets = [ D3 ]
          Script = Page.resource "graph-page.js" }

    /// Writes the page (and its data as JSON next to it); returns its path.
    let write (path: string) (options: GraphPageOptions) (g: Graph) : string = Page.write path (page options g)
