#load "common.fsx"
// The transcoder paper's sparsity–fidelity comparison (§3.2.2, the Pythia-410M sweep): transcoders against SAEs on
// hook_mlp_out, L0 against the spliced model's CE loss (and FVU), at several TopK sparsities, on every layer. All
// coders train from one activation stream (`Sweep.run`) into a work folder, then the frontier table and plot go to
// paper/results.
//
//   dotnet build src/Transcoders -c Release
//   dotnet fsi paper/sparsity-fidelity.fsx [MODEL] [CODERS] [options]
//
// CODERS is not read (the script trains its own coders); options:
//   --layers 0 1 ..     layers (default: all)          --ks 4 8 16 32 64 128   TopK sparsities (default: these six)
//   --width N           features per coder (default 4·d_model)
//   --steps N           training steps (default 300)   --batch N   tokens per step (default 512)
//   --eval-rows N       held-out rows for L0/FVU (default 8192)
//   --spliced-rows N    validation rows of --ctx tokens for the spliced CE (default 32)
//   --ctx N             tokens per row (default min(128, n_ctx))
//   --tokens DIR        token shards (train/ and validation/) instead of the shipped TinyStories
//   --work DIR          where the coders train (default runs/paper/sparsity-fidelity; a re-run resumes there)
//   --out DIR           results folder (default paper/results)
//   --device cpu|cuda|auto, --threads N

open System
open System.Diagnostics
open System.IO
open Transcoders.Coders
open Transcoders.Models
open Transcoders.Views
open Common

let run = setup "sparsity-fidelity" fsi.CommandLineArgs
let args, sw, device, model, modelPath = run.Args, run.Clock, run.Device, run.Model, run.ModelPath
let c = model.Config
let name = ModelName.ofPath modelPath
let text =
    match args.TryGet "tokens" with
    | Some dir -> ModelText.ofShards dir
    | None -> ModelText.forModel modelPath
let layers = args.Ints("layers", [ 0 .. c.NLayers - 1 ])
let ks = args.Ints("ks", [ 4; 8; 16; 32; 64; 128 ])
let width = args.Int("width", 4 * c.DModel)
let steps = args.Int("steps", 300)
let batch = args.Int("batch", 512)
let ctx = args.Int("ctx", min 128 c.NCtx)
let work = workDir args
printfn "%s: %d layers, d_model %d; %d layers × %d sparsities × 2 kinds = %d coders of %d features, %d steps of %d tokens"
    name c.NLayers c.DModel layers.Length ks.Length (layers.Length * ks.Length * 2) width steps batch

let config =
    { Model = name
      Kinds = [ MlpTranscoder; MlpOutSae ]
      Layers = layers
      Widths = [ width ]
      Levels = ks |> List.map TopKLevel
      Train = fun coder _ -> { CoderDefaults.forCoder coder 0.0 steps batch with Seed = 42L }
      MaxConcurrent = 0
      Run =
        CoderRun.jobsConfig model
            { CoderRunSettings.Default with
                Plan = { CoderPlan.Default with Batch = batch; Seed = 42L }
                Ctx = Some ctx
                CheckpointEvery = 0
                Resume = true
                EvalRows = int64 (args.Int("eval-rows", 8192))
                SplicedRows = args.Int("spliced-rows", 32) }
            work device }
let mutable lastPrint = 0.0
let progress =
    function
    | Trained(step, total, _, logs) when not logs.IsEmpty && (sw.Elapsed.TotalSeconds - lastPrint > 15.0 || step = total) ->
        lastPrint <- sw.Elapsed.TotalSeconds
        printfn "[%5.0fs] step %d/%d, mean FVU %.3f" sw.Elapsed.TotalSeconds step total (logs |> List.averageBy (fun (_, l) -> l.Fvu))
    | Preparing what | Evaluating what -> printfn "[%5.0fs] %s" sw.Elapsed.TotalSeconds what
    | _ -> ()
let result = Sweep.run model text config progress

// The frontier table, one block per layer, and at each k the transcoder's CE minus the SAE's.
let rows = result.Frontier
let ceClean =
    result.Points |> List.tryPick (fun (_, r) -> r.Spliced |> Option.map (fun s -> s.CeClean)) |> Option.defaultValue nan
let byKey = rows |> List.map (fun r -> (r.Kind, r.Layer, r.Level), r) |> Map.ofList
let frontierTable =
    table [ "layer"; "kind"; "k"; "L0"; "FVU"; "CE spliced"; "ΔCE"; "CE recovered"; "on the CE frontier" ]
        [ for l in layers do
            for kind in [ "transcoder"; "sae" ] do
                for r in rows |> List.filter (fun r -> r.Layer = l && r.Kind = kind) |> List.sortBy (fun r -> r.L0) ->
                    [ string l; kind; r.Level.TrimStart 'k'; f3 r.L0; f4 r.Fvu; f4 r.CeSpliced; f4 (r.CeSpliced - ceClean); f3 r.CeRecovered
                      (if r.ParetoCe then "yes" else "no") ] ]
let pairs =
    [ for l in layers do
        for k in ks do
            match byKey.TryFind("transcoder", l, sprintf "k%d" k), byKey.TryFind("sae", l, sprintf "k%d" k) with
            | Some t, Some s -> yield l, k, t, s
            | _ -> () ]
let comparison =
    table [ "layer"; "k"; "L0 transcoder"; "L0 SAE"; "CE transcoder"; "CE SAE"; "CE transcoder − SAE"; "FVU transcoder"; "FVU SAE" ]
        [ for l, k, t, s in pairs ->
            [ string l; string k; f3 t.L0; f3 s.L0; f4 t.CeSpliced; f4 s.CeSpliced; f4 (t.CeSpliced - s.CeSpliced); f4 t.Fvu; f4 s.Fvu ] ]
let wins = pairs |> List.filter (fun (_, _, t, s) -> t.CeSpliced < s.CeSpliced) |> List.length
let plotPath = Path.Combine(resultsDir args, "sparsity-fidelity.html")
Directory.CreateDirectory(resultsDir args) |> ignore
Plots.write plotPath (sprintf "Transcoders vs SAEs on %s: L0 against spliced CE and FVU" name) (Plots.frontier rows) |> ignore
let body =
    String.concat "\n"
        [ sprintf "Model `%s` (%d layers, d_model %d), clean CE %s nats on %d held-out rows of %d tokens." name c.NLayers c.DModel (f4 ceClean)
              (args.Int("spliced-rows", 32)) ctx
          sprintf "Per layer: a TopK transcoder (ln2.hook_normalized → hook_mlp_out) and a TopK SAE on hook_mlp_out, %d features, k ∈ {%s}, %d steps of %d tokens, all from one activation stream (`Sweep.run`); coders in `%s`."
              width (String.Join(", ", ks)) steps batch work
          "L0 and FVU on held-out activations; CE with the one coder spliced in (no error term); ΔCE = CE spliced − clean CE; CE recovered against zero-ablating the MLP output. Plot: `sparsity-fidelity.html` (plotly, not committed; re-run to draw it)."
          ""
          "## L0 against spliced CE and FVU"
          ""
          frontierTable
          "## At equal k: transcoder against SAE"
          ""
          sprintf "The transcoder's spliced CE is lower than the SAE's at %d of %d (layer, k) pairs." wins pairs.Length
          ""
          comparison ]
writeResults args "sparsity-fidelity.md" "Sparsity against fidelity: transcoders vs SAEs" sw body |> ignore
printfn "%d coders in %.0f s; transcoder CE below SAE CE at %d of %d pairs" result.Points.Length sw.Elapsed.TotalSeconds wins pairs.Length
