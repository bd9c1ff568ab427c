#load "../scripts/load.fsx"
// Why TopK coders die here, and what keeps them alive: trains coder variants side by side from one activation stream
// (same seed, same batches) and counts, for each, the features that never fire over 1M held-out tokens of the
// training distribution (tokens after the ones training read), with FVU and L0 on the same tokens.
//
//   dotnet build src/Transcoders -c Release
//   dotnet fsi bench/dead-features.fsx MODEL [--layers 0 1 2 3] [--widths 2048 16384] [--k 32] [--steps 600]
//                                          [--batch 1024] [--eval-tokens 1000000] [--variants NAME...] [--out DIR]
//
// Prints a markdown table (variant × width × layer: dead fraction, FVU, L0) and writes it to DIR/dead-features.md.

open System
open System.Diagnostics
open System.IO
open Transcoders.Coders
open Transcoders.Models

let argv = fsi.CommandLineArgs |> Array.tail
if argv.Length = 0 then failwith "usage: dotnet fsi bench/dead-features.fsx MODEL [options] (see the top of the file)"
let modelPath = argv[0]
let values (flag: string) =
    match Array.tryFindIndex ((=) flag) argv with
    | Some i -> argv[i + 1 ..] |> Array.takeWhile (fun a -> not (a.StartsWith "--")) |> List.ofArray
    | None -> []
let one flag d = match values flag with v :: _ -> v | [] -> d
let device = Transcoders.Tensors.Device.resolve Transcoders.Tensors.Device.Auto
let model, _ = ModelFiles.load modelPath device
model.eval ()
let dModel = model.Config.DModel
let layers = match values "--layers" with [] -> [ 0 .. model.Config.NLayers - 1 ] | ls -> ls |> List.map int
let widths = match values "--widths" with [] -> [ 8 * dModel ] | ws -> ws |> List.map int
let k = int (one "--k" (string (dModel / 8)))
let steps = int (one "--steps" "600")
let batch = int (one "--batch" "1024")
let evalTokens = int64 (one "--eval-tokens" "1000000")
let out = one "--out" (Path.Combine("runs", "dead-features"))
let text = ModelText.forModel modelPath

/// The variants compared: each changes one thing of the recommended TopK recipe (CoderDefaults.topK).
let variants : (string * (TrainConfig -> TrainConfig)) list =
    let window w (t: TrainConfig) = { t with DeadAfterTokens = int64 w * int64 t.BatchSize }
    let auxK kAux coef (t: TrainConfig) = { t with Loss = { t.Loss with Auxiliary = AuxK(kAux, coef) } }
    [ "defaults", id
      // the recipe shipped before: sparsify's (independent encoder, dead after 1/4 of the run, AuxK d/2 at 1/32)
      "previous", (fun t -> { t with EncoderInit = RandomEncoder
                                     DeadAfterTokens = max 1L (int64 t.Steps * int64 t.BatchSize / 4L)
                                     Loss = { t.Loss with Auxiliary = AuxK(dModel / 2, 1.0 / 32.0) } })
      "no-auxk", (fun t -> { t with Loss = { t.Loss with Auxiliary = NoAuxiliary } })
      "no-centring", (fun t -> { t with BiasInit = Normalisation.ZeroBias })
      "tied-init", (fun t -> { t with EncoderInit = DecoderTranspose })
      "window-50", window 50
      "tied+window-50", window 50 >> (fun t -> { t with EncoderInit = DecoderTranspose })
      "tied+window-50+auxk-4k", window 50 >> auxK (4 * dModel) (1.0 / 32.0) >> (fun t -> { t with EncoderInit = DecoderTranspose })
      "tied+window-20+aux-8th", window 20 >> auxK (dModel / 2) (1.0 / 8.0) >> (fun t -> { t with EncoderInit = DecoderTranspose })
      "tied+window-20+auxk-4k+aux-4th", window 20 >> auxK (4 * dModel) (1.0 / 4.0) >> (fun t -> { t with EncoderInit = DecoderTranspose })
      "tied+resample-100", window 50 >> (fun t -> { t with EncoderInit = DecoderTranspose; Resampling = Some { ResampleConfig.Default with EverySteps = 100; StopAfterStep = steps * 3 / 4 } })
      "resample-150", (fun t -> { t with Resampling = Some { ResampleConfig.Default with EverySteps = 150; StopAfterStep = steps * 3 / 4 } }) ]
let chosen = match values "--variants" with [] -> variants | names -> variants |> List.filter (fun (n, _) -> List.contains n names)

let rows = Collections.Generic.List<string>()
let clock = Stopwatch.StartNew()
for width in widths do
    let jobs =
        [ for name, change in chosen do
              for layer in layers do
                  let coder = { CoderConfig.transcoder "model" layer dModel width with Activation = CoderActivation.TopK k }
                  let train = { CoderDefaults.topK dModel width steps batch with Seed = 42L } |> change
                  yield { Name = sprintf "%s-w%d-L%d" name width layer; Coder = coder; Train = train } ]
    let store = CoderPlan.store model None batch None 42L device
    let config =
        { JobsConfig.Default(Path.Combine(out, sprintf "w%d" width)) with
            Store = store; CheckpointEvery = 0; Resume = false
            Eval = { JobEval.Default with ActivationRows = 0L; SplicedRows = 0 } }
    printfn "width %d: %d coders (%d variants × %d layers), %d steps of %d tokens" width jobs.Length chosen.Length layers.Length steps batch
    let result = CoderJobs.run model text jobs config ignore
    let coders = [ for c in result.Coders -> c.Name, CoderFile.load c.Path device ]
    // held out: start after the model passes training read
    let passTokens = int64 (store.PassRows * store.Ctx)
    let firstUnread = (result.Tokens + store.Buffer.Rows) / passTokens + 2L  // + what the shuffle buffer held
    let evaluated =
        StreamedEval.evaluate model text store
            { StreamedEval.StreamedEvalConfig.Default with Source = StreamedEval.TrainTextFrom firstUnread; Tokens = evalTokens }
            ignore coders
    for name, e in evaluated do
        let r = sprintf "| %s | %d | %.2f%% | %.3f | %.1f |" name width (100.0 * e.DeadFraction) e.Fvu e.L0
        printfn "%s" r
        rows.Add r
    for _, c in coders do (c :> IDisposable).Dispose()

let header = "| coder (variant-width-layer) | width | dead over held-out tokens | FVU | L0 |\n|---|---|---|---|---|\n"
let table = header + String.Join("\n", rows) + "\n"
Directory.CreateDirectory out |> ignore
let note =
    sprintf "`dotnet fsi bench/dead-features.fsx %s` (k %d, %d steps of %d tokens, %d evaluation tokens; %.0f s)\n\n"
        (String.Join(" ", argv)) k steps batch evalTokens clock.Elapsed.TotalSeconds
File.WriteAllText(Path.Combine(out, "dead-features.md"), note + table)
printfn "\n%s%s" note table
