/// `sweep MODEL`: trains coders over kinds × layers × widths × sparsity levels from one activation stream and writes
/// the comparison (the transcoder paper's SAE-versus-transcoder frontier) as markdown and CSV.
module Transcoders.Cli.SweepCommand

open System
open System.Diagnostics
open System.IO
open Argu
open Transcoders.Activations
open Transcoders.Coders
open Transcoders.Models

type Args =
    | [<MainCommand; ExactlyOnce>] Model of path: string
    | Kinds of kinds: string list
    | Layers of layers: int list
    | Ks of ks: int list
    | L1s of lambdas: float list
    | Widths of widths: int list
    | Steps of int
    | Batch of int
    | Out of folder: string
    | Max_Concurrent of int
    | Seed of int64
    // the options shared with `train-coder` (StoreOptions)
    | Cache_Activations of folder: string
    | Tokens of folder: string
    | Ctx of int
    | Buffer_Rows of int64
    | Checkpoint_Every of int
    | No_Resume
    | Eval_Rows of int64
    | Spliced_Rows of int
    | Slurm of folder: string
    | Sbatch of options: string list
    | Max_Parallel of int
    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Model _ -> "the model (our folder, a Hugging Face folder or a llama2.c .bin)"
            | Kinds _ -> "coder kinds: transcoder, skip-transcoder, sae (on hook_mlp_out), sae:<hook suffix> (default transcoder sae)"
            | Layers _ -> "layers (default: the middle layer)"
            | Ks _ -> "TopK levels k (default 4 8 16 32 unless --l1s is given)"
            | L1s _ -> "ReLU + L1 levels λ"
            | Widths _ -> "features per coder (default 16 × d_model)"
            | Steps _ -> "training steps per coder (default 600)"
            | Batch _ -> "tokens per training batch (default 1024)"
            | Out _ -> "output folder (default sweeps/<model>)"
            | Max_Concurrent _ -> "coders trained at once from one stream (default: all)"
            | Seed _ -> "seed (default 42)"
            | Cache_Activations _ | Tokens _ | Ctx _ | Buffer_Rows _ | Checkpoint_Every _ | No_Resume | Eval_Rows _
            | Spliced_Rows _ -> StoreOptions.usageOf this
            | Slurm _ -> "write a Slurm job table and batch scripts into this shared folder instead of training (docs/cluster.md)"
            | Sbatch _ -> "with --slurm: #SBATCH options as key=value, e.g. partition=gpu gres=gpu:1 time=04:00:00 cpus-per-task=8"
            | Max_Parallel _ -> "with --slurm: array tasks running at once (default: no limit)"

let run (common: Common.Options) (args: ParseResults<Args>) =
    let sw = Stopwatch.StartNew()
    let modelPath = args.GetResult Model
    let device = Common.device common
    let model, text = CoderRun.loadModelAndText modelPath (args.TryGetResult Tokens) device
    use _m = model
    let c = model.Config
    let name = ModelName.ofPath modelPath
    let steps = args.GetResult(Steps, 600)
    let batch = args.GetResult(Batch, 1024)
    let seed = args.GetResult(Seed, 42L)
    let levels =
        [ yield! args.GetResult(Ks, (if args.Contains L1s then [] else [ 4; 8; 16; 32 ])) |> List.map TopKLevel
          yield! args.GetResult(L1s, []) |> List.map L1Level ]
    let out = args.GetResult(Out, Path.Combine("sweeps", name))
    let config =
        { Model = name
          Kinds = args.GetResult(Kinds, [ "transcoder"; "sae" ]) |> List.map LayerCoderKind.Parse
          Layers = args.GetResult(Layers, [ c.NLayers / 2 ])
          Widths = args.GetResult(Widths, [ 16 * c.DModel ])
          Levels = levels
          Train =
            fun coder level ->
                let lambda = match level with L1Level l -> l | TopKLevel _ -> 0.0
                { CoderDefaults.forCoder coder lambda steps batch with Seed = seed }
          MaxConcurrent = args.GetResult(Max_Concurrent, 0)
          Run =
            CoderRun.jobsConfig model
                (StoreOptions.apply args { CoderRunSettings.Default with Plan = { CoderPlan.Default with Batch = batch; Seed = seed } })
                out device }
    printfn "%s: %d layers, d_model %d; text %s" name c.NLayers c.DModel text.Name
    let result = Sweep.run model text config (TrainCoderCommand.printProgress sw)
    printfn ""
    printf "%s" (File.ReadAllText(Path.Combine(out, "sweep.md")))
    printfn ""
    printfn "%d points in %s; sweep.md, sweep.csv and frontier.csv in %s" result.Points.Length (Output.seconds sw.Elapsed) out
    0
