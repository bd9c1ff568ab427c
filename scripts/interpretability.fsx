#load "load.fsx"
// Seeing features and circuits: feature pages (top examples, quantile samples, histogram, logit effects,
// de-embeddings, your own texts), the attribution graph page, plots, circuit-tracer's graph JSON and SAELens files,
// for a model and its transcoders. Every page is one self-contained HTML file that opens offline.
//
//   dotnet build src/Transcoders -c Release
//   dotnet fsi scripts/interpretability.fsx [MODEL] [CODERS] [PROMPT]
//
// MODEL defaults to llama2.c's stories260K (shipped); CODERS (a folder of coder folders) defaults to transcoders
// trained here for it on the shipped TinyStories text (TopK 8, 256 features, 150 steps per layer, a minute or two).

open System
open System.IO
open TorchSharp
open Transcoders.Coders
open Transcoders.Files
open Transcoders.Models
open Transcoders.Text
open Transcoders.Views

let args = fsi.CommandLineArgs |> Array.tail
let modelPath = if args.Length > 0 then args[0] else Paths.data "models/stories260K/stories260K.bin"
let out = Path.Combine("runs", "interpretability")
let prompt = if args.Length > 2 then args[2] else "Once upon a time, there was a little girl named Lily. She loved to play with her"
let device = Transcoders.Tensors.Device.resolve Transcoders.Tensors.Device.Auto
let model, _ = ModelFiles.load modelPath device
model.eval ()
let tokenizer = ModelTokenizer.find modelPath

let codersDir =
    if args.Length > 1 then args[1]
    else
        let dir = Path.Combine(out, "coders")
        if not (Directory.Exists dir) then
            printfn "training transcoders for every MLP of %s ..." (Path.GetFileName modelPath)
            let plan = { CoderPlan.Default with Width = Some 256; Activation = Some(TopK 8); Steps = 150; Batch = 256; Seed = 1L }
            let config =
                { JobsConfig.Default dir with
                    Store = CoderPlan.store model (Some 64) plan.Batch (Some 4096L) plan.Seed device
                    CheckpointEvery = 0
                    Eval = { JobEval.Default with ActivationRows = 4096L; SplicedRows = 32 } }
            let result = CoderJobs.run model (ModelText.forModel modelPath) (CoderPlan.jobs model "stories260K" plan) config ignore
            for c in result.Coders do
                printfn "  %s: L0 %.1f, FVU %.3f" c.Name (c.Metrics |> Option.map (fun m -> m.L0) |> Option.defaultValue nan) (c.Metrics |> Option.map (fun m -> m.Fvu) |> Option.defaultValue nan)
                SaeLens.writeMetrics c.Path c.Metrics c.Spliced |> ignore
        dir
let coderDirs = CoderFolders.find [ codersDir ]
let coders = CoderFolders.load [ codersDir ] device

let options =
    { ReportOptions.Create(out, prompt) with
        Scan = ModelName.ofPath modelPath
        Device = device
        Dashboard = { DashboardOptions.Default with Texts = [ prompt; "The little dog was sad because he lost his ball." ] }
        TrainingLogs = [ for d in coderDirs do
                             let log = Path.Combine(d, "log.jsonl")
                             if File.Exists log then yield sprintf "training %s" (Path.GetFileName d), log ] |> List.truncate 2 }
let report = Interpretability.writeAll model tokenizer coders options (printfn "  %s")

// coders in SAELens' layout, and back (SAELens has ReLU and JumpReLU transcoders, and TopK only for SAEs)
for c in coders do
    match SaeLens.architecture c.Config with
    | Ok arch ->
        let folder = SaeLens.export (Path.Combine(out, "saelens", Interpretability.coderName c)) c
        let back = SaeLens.import folder device
        printfn "SAELens export (%s): %s, reads back as %s" arch folder (Splicing.describe back)
    | Error why -> printfn "no SAELens export of %s: %s" (Interpretability.coderName c) why

printfn "\npages written (open them in a browser; they work offline):"
for p in report.All do printfn "  %s" (Path.GetFullPath p)
