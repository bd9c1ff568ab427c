#load "common.fsx"
// Per-layer transcoders against a cross-layer transcoder on attribution graphs (circuit-tracer's replacement and
// completeness scores, `Pruning.scores`): one graph per prompt with each replacement, over the first sentences of
// held-out TinyStories stories; mean, median and spread of each score, and the paired difference.
//
//   dotnet build src/Transcoders -c Release
//   dotnet fsi paper/tc-vs-clt.fsx [MODEL] [CODERS] [options]
//
//   --prompts N          prompts (default 60)   --min-words N   shortest first sentence used (default 5)
//   --max-feature-nodes N  cap on a graph's feature nodes (default: none)
//   --out DIR, --device cpu|cuda|auto, --threads N

open System
open System.Diagnostics
open Transcoders.Circuits
open Transcoders.Coders
open Transcoders.Models
open Common

let run = setup "tc-vs-clt" fsi.CommandLineArgs
let args, sw, device, model, tokenizer, modelPath = run.Args, run.Clock, run.Device, run.Model, run.Tokenizer, run.ModelPath
let c = model.Config
let coders = run.Coders()
let transcoders = transcodersOf coders
let clt =
    match coders |> List.filter (fun x -> x.Config.Kind = CrossLayerTranscoder) |> List.sortByDescending (fun x -> x.Config.NLayers) with
    | x :: _ -> x
    | [] -> failwithf "no cross-layer transcoder in %s" (codersPath args)
if transcoders.Length < c.NLayers then
    failwithf "%s holds transcoders for layers %A; the comparison needs one for every layer (0..%d)" (codersPath args) (transcoders |> List.map (fun x -> x.Config.Layers[0])) (c.NLayers - 1)
if clt.Config.NLayers < c.NLayers then
    failwithf "the cross-layer transcoder covers layers %A; the comparison needs every layer (0..%d)" clt.Config.Layers (c.NLayers - 1)
let prompts = firstSentences (args.Int("prompts", 60)) (args.Int("min-words", 5))
let graphConfig =
    { GraphConfig.Default with MaxFeatureNodes = (match args.TryGet "max-feature-nodes" with Some n -> Some(int n) | None -> None) }
printfn "%s: %d prompts, %d transcoders against %s" (ModelName.ofPath modelPath) prompts.Length transcoders.Length (sprintf "a CLT over layers %s" (String.Join(",", clt.Config.Layers)))

let scoresOf (cs: Coder list) (text: string) =
    let tokens = PromptTokens.encode tokenizer text
    let graph = AttributionGraph.build model cs tokens graphConfig
    let s = Pruning.scores graph device
    s, graph.Features.Length
let results =
    prompts |> Array.mapi (fun i text ->
        let tc, tcNodes = scoresOf transcoders text
        let cl, cltNodes = scoresOf [ clt ] text
        if (i + 1) % 10 = 0 then printfn "[%4.0fs] %d/%d prompts" sw.Elapsed.TotalSeconds (i + 1) prompts.Length
        text, tc, tcNodes, cl, cltNodes)

let stats (label: string) (xs: float[]) =
    let mean, median, sd, lo, hi = summary xs
    let s = Array.sort xs
    let q (p: float) = s[int (Math.Round(p * float (s.Length - 1)))]
    [ label; f3 mean; f3 median; f3 sd; f3 (q 0.25); f3 (q 0.75); f3 lo; f3 hi ]
let col f = results |> Array.map f
let tcR, tcC = col (fun (_, t, _, _, _) -> t.Replacement), col (fun (_, t, _, _, _) -> t.Completeness)
let clR, clC = col (fun (_, _, _, l, _) -> l.Replacement), col (fun (_, _, _, l, _) -> l.Completeness)
let dR, dC = Array.map2 (-) clR tcR, Array.map2 (-) clC tcC
let countAbove (d: float[]) = d |> Array.filter (fun x -> x > 0.0) |> Array.length
let body =
    String.concat "\n"
        [ sprintf "Model `%s` (%d layers, d_model %d). Replacements: per-layer transcoders (%s) and the cross-layer transcoder `%s` (%d features per layer). %d prompts: the first sentences (at least %d words) of the shipped held-out TinyStories stories. One attribution graph per prompt and replacement (`AttributionGraph.build`, %s); scores from `Pruning.scores` (replacement: the share of the end-to-end influence of the tokens on the logits that does not pass through error nodes; completeness: the influence-weighted share of incoming edge weight not from error nodes)."
              (ModelName.ofPath modelPath) c.NLayers c.DModel (String.Join(", ", transcoders |> List.map (fun x -> sprintf "%d features" x.Config.DSae) |> List.distinct))
              (sprintf "clt over layers %s" (String.Join(",", clt.Config.Layers))) clt.Config.DSae prompts.Length (args.Int("min-words", 5))
              (match graphConfig.MaxFeatureNodes with Some n -> sprintf "at most %d feature nodes" n | None -> "every active feature")
          ""
          table [ "score"; "mean"; "median"; "sd"; "25%"; "75%"; "min"; "max" ]
              [ stats "replacement, transcoders" tcR
                stats "replacement, CLT" clR
                stats "replacement, CLT − transcoders" dR
                stats "completeness, transcoders" tcC
                stats "completeness, CLT" clC
                stats "completeness, CLT − transcoders" dC ]
          sprintf "The CLT scores higher than the transcoders on %d of %d prompts for replacement and on %d of %d for completeness. Mean active feature nodes per graph: transcoders %.1f, CLT %.1f."
              (countAbove dR) results.Length (countAbove dC) results.Length
              (results |> Array.averageBy (fun (_, _, n, _, _) -> float n)) (results |> Array.averageBy (fun (_, _, _, _, n) -> float n))
          ""
          "<details><summary>Per prompt</summary>"
          ""
          table [ "prompt"; "replacement TC"; "replacement CLT"; "completeness TC"; "completeness CLT" ]
              [ for text, tc, _, cl, _ in results -> [ text; f3 tc.Replacement; f3 cl.Replacement; f3 tc.Completeness; f3 cl.Completeness ] ]
          "</details>" ]
writeResults args "tc-vs-clt.md" "Per-layer transcoders against a cross-layer transcoder on attribution graphs" sw body |> ignore
printfn "replacement: transcoders %.3f, CLT %.3f (means); completeness: transcoders %.3f, CLT %.3f"
    (Array.average tcR) (Array.average clR) (Array.average tcC) (Array.average clC)
