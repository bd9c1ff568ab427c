namespace Transcoders.Circuits

open System
open TorchSharp
open Transcoders.Models
open Transcoders.Coders
open Transcoders.Coders.Scalars

/// Where an intervention applies.
type InterventionPosition =
    /// One token position.
    | At of int
    /// This position and every later one (including generated tokens).
    | From of int

/// What an intervention does to a feature's activation a.
type InterventionAction =
    /// a ← v
    | SetTo of float
    /// a ← k·a
    | ScaleBy of float
    /// a ← 0
    | Ablate

/// An intervention on one feature of one layer's coder.
type FeatureIntervention =
    { Layer: int
      Feature: int
      Position: InterventionPosition
      Action: InterventionAction }

/// The graph's prediction of an intervention's effect on one logit, and what happened.
type EffectComparison =
    { Token: int
      /// Σ over the intervened feature nodes of edge(feature → logit) / a · (a' − a): the graph's linear prediction of
      /// the change in the de-meaned logit.
      Predicted: float
      /// The change in the de-meaned logit in the local replacement model (attention and normalisation frozen, other
      /// features fixed: the direct effect). Equal to Predicted up to rounding.
      Constrained: float
      /// The change in the de-meaned logit through the real model with the coders spliced in (error terms kept, so
      /// that only the intervention changes anything): every indirect effect included.
      Free: float }

/// Setting, scaling and ablating features: constrained (through the local replacement model, the direct effect a
/// graph predicts) and free (through the real model with the coders spliced in), generation with interventions,
/// and the comparison of a graph's predicted effects with measured ones.
[<RequireQualifiedAccess>]
module Interventions =

    let private positionsOf (n: int) (pos: InterventionPosition) =
        match pos with
        | At p -> if p < n then [ p ] else []
        | From p -> [ p .. n - 1 ]

    let private newValue (action: InterventionAction) (a: float) =
        match action with
        | SetTo v -> v
        | ScaleBy k -> k * a
        | Ablate -> 0.0

    let private checkOne (nLayers: int) (dSaeOf: int -> int) (nPositions: int option) (iv: FeatureIntervention) =
        if iv.Layer < 0 || iv.Layer >= nLayers then invalidArg "interventions" (sprintf "intervention on layer %d: the model has layers 0..%d" iv.Layer (nLayers - 1))
        let d = dSaeOf iv.Layer
        if iv.Feature < 0 || iv.Feature >= d then invalidArg "interventions" (sprintf "intervention on feature %d of layer %d: that coder has features 0..%d" iv.Feature iv.Layer (d - 1))
        let p = match iv.Position with At p | From p -> p
        if p < 0 then invalidArg "interventions" (sprintf "intervention at negative position %d" p)
        match nPositions, iv.Position with
        | Some n, At p when p >= n -> invalidArg "interventions" (sprintf "intervention at position %d: the prompt has positions 0..%d" p (n - 1))
        | _ -> ()
        match iv.Action with
        | SetTo v | ScaleBy v when not (Double.IsFinite v) -> invalidArg "interventions" (sprintf "intervention value %g is not finite" v)
        | _ -> ()

    /// The node changes of these interventions in a local replacement model (later interventions on the same
    /// feature and position see the earlier ones' result).
    let changesOf (lr: LocalReplacement) (interventions: FeatureIntervention list) : NodeChanges =
        for iv in interventions do checkOne lr.NLayers (fun l -> lr.Sites[l].DSae) (Some lr.NPositions) iv
        let current = lr.Active.ByPlace()
        let touched = Collections.Generic.List<FeatureAt>()
        for iv in interventions do
            for p in positionsOf lr.NPositions iv.Position do
                let key = { FeatureAt.Layer = iv.Layer; Position = p; Feature = iv.Feature }
                let a = match current.TryGetValue key with | true, a -> a | _ -> 0.0
                current[key] <- newValue iv.Action a
                if not (touched.Contains key) then touched.Add key
        { NodeChanges.None with Features = [ for key in touched -> key, current[key] ] }

    /// Logits [p, vocab] of the local replacement model with these interventions: attention patterns, normalisation
    /// scales and every other feature frozen at the prompt's values (only direct effects).
    let constrained (lr: LocalReplacement) (interventions: FeatureIntervention list) : torch.Tensor =
        let logits, ins = LocalReplacement.runWith lr (changesOf lr interventions)
        for t in ins do t.Dispose()
        logits

    /// Feature hooks (on the coders' feature hook points, see `Splicing.featureHookName`) applying interventions to
    /// whole sequences: each hook sees a layer's activations [batch, positions, d_sae] from position 0.
    let featureHooks (coders: Coder list) (interventions: FeatureIntervention list) : (string * HookFn) list =
        let sites = Splicing.featureSites coders |> List.filter (fun s -> coders[s.CoderIndex].Config.Kind <> Sae)
        let siteOf (layer: int) =
            match sites |> List.tryFind (fun s -> s.Layer = layer) with
            | Some s -> s
            | None -> invalidArg "interventions" (sprintf "no transcoder reads layer %d, so its features cannot be set" layer)
        let nLayers = if sites.IsEmpty then 0 else (sites |> List.map (fun s -> s.Layer) |> List.max) + 1
        for iv in interventions do checkOne nLayers (fun l -> (siteOf l).DSae) None iv
        interventions
        |> List.groupBy (fun iv -> (siteOf iv.Layer).Name)
        |> List.map (fun (name, ivs) ->
            name, (fun (acts: torch.Tensor) ->
                let n = int acts.shape[1]
                let out = acts.clone()
                for iv in ivs do
                    for p in positionsOf n iv.Position do
                        let column = out.select(1, int64 p).select(1, int64 iv.Feature)
                        match iv.Action with
                        | SetTo v -> column.fill_(sc v) |> ignore
                        | ScaleBy k -> column.mul_(sc k) |> ignore
                        | Ablate -> column.zero_() |> ignore
                out))

    /// Logits [p, vocab] of the model with the coders spliced in (with error terms, so that without interventions it
    /// computes exactly the original logits) and these interventions on their features; effects propagate freely
    /// through attention, normalisation and later features.
    let free (model: Transformer) (coders: Coder list) (tokens: int[]) (interventions: FeatureIntervention list) : torch.Tensor =
        AttributionGraph.checkPrompt model.Config tokens
        match interventions |> List.tryPick (fun iv -> match iv.Position with At p when p >= tokens.Length -> Some p | _ -> None) with
        | Some p -> invalidArg "interventions" (sprintf "intervention at position %d: the prompt has positions 0..%d" p (tokens.Length - 1))
        | None -> ()
        let rm = ReplacementModel.create model coders Splicing.WithErrorTerms
        use _ = torch.no_grad ()
        use scope = torch.NewDisposeScope()
        let t = torch.tensor(tokens |> Array.map int64, device = model.Device).unsqueeze 0
        let logits = ReplacementModel.runWithHooks rm (featureHooks coders interventions) t
        logits[0L].MoveToOuterDisposeScope()

    /// Generation with interventions, through the model with the coders spliced in (error terms kept). Runs without
    /// the KV cache so that hooks see absolute positions: `From p` steers every position from p on, generated
    /// tokens included.
    let generate (model: Transformer) (coders: Coder list) (options: Generation.GenerateOptions) (prompt: int[])
                 (interventions: FeatureIntervention list) : Generation.Generated =
        AttributionGraph.checkPrompt model.Config prompt
        let rm = ReplacementModel.create model coders Splicing.WithErrorTerms
        ReplacementModel.generate rm { options with UseKvCache = false; Hooks = options.Hooks @ featureHooks coders interventions } prompt

    /// The de-meaned logit (logit − mean over the vocabulary) of each token at the last position of logits [p, vocab].
    let demeanedLogits (logits: torch.Tensor) (tokens: int[]) : float[] =
        use _ = torch.no_grad ()
        use last = logits[-1L].to_type(torch.float64).cpu()
        let v = last.data<float>().ToArray()
        let mean = Array.average v
        tokens |> Array.map (fun t -> v[t] - mean)

    /// For each logit node of the graph: the change the graph predicts for these interventions (from its direct
    /// edges, linear in the change of activation) next to the changes measured in the local replacement model
    /// (constrained) and in the real model with coders spliced (free). The intervened features must be feature
    /// nodes of the graph at `At` positions; `lr` must be the local replacement model the graph was built from.
    let compareWithGraph (lr: LocalReplacement) (graph: Graph) (interventions: FeatureIntervention list) : EffectComparison[] =
        if graph.Tokens <> lr.Tokens then invalidArg "graph" "the graph was built on another prompt than this local replacement model"
        let index = Graph.featureIndex graph
        let changes = changesOf lr interventions
        let predicted =
            graph.Logits |> Array.mapi (fun k _ ->
                changes.Features |> List.sumBy (fun (at, v) ->
                    match index.TryGetValue at with
                    | true, id ->
                        let a = graph.Features[id].Activation
                        float (Graph.edge graph (Graph.logitNode graph k) id) / a * (v - a)
                    | _ ->
                        invalidArg "interventions" (sprintf "feature %d of layer %d at position %d is not a node of the graph (inactive there, or left out by MaxFeatureNodes)" at.Feature at.Layer at.Position)))
        let targets = graph.Logits |> Array.map (fun l -> l.Token)
        let baseline = (use o = LocalReplacement.forward lr in demeanedLogits o targets)
        let constrained = (use o = constrained lr interventions in demeanedLogits o targets)
        let free = (use o = free lr.Model lr.Coders lr.Tokens interventions in demeanedLogits o targets)
        Array.init targets.Length (fun k ->
            { Token = targets[k]; Predicted = predicted[k]; Constrained = constrained[k] - baseline[k]; Free = free[k] - baseline[k] })

    /// A transcoder feature in the transcoder paper's names, `mlp2tc[17]@5`; the position may be `last`, the last
    /// of a prompt of `n` tokens. Anything else fails with a message naming it.
    let parseFeature (n: int) (text: string) : FeatureAt =
        let text = text.Trim()
        let text = if text.EndsWith "@last" then text.Substring(0, text.Length - 4) + string (n - 1) else text
        match Component.parse text with
        | TranscoderFeature at -> at
        | c -> invalidArg "feature" (sprintf "%s is not a transcoder feature: give mlpLtc[F]@P" c.Display)
