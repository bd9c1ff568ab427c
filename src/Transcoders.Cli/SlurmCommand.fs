/// Sweeps as Slurm jobs: `sweep MODEL ... --slurm DIR` writes the job table and batch scripts; `sweep-cache` (stage 1),
/// `sweep-task` (stage 2, one array task) and `sweep-gather` (stage 3) run inside the jobs (see docs/cluster.md).
module Transcoders.Cli.SlurmCommand

open System
open System.Diagnostics
open System.IO
open System.Runtime.InteropServices
open System.Threading
open Argu
open Transcoders.Cluster
open Transcoders.Coders
open Transcoders.Models

/// The sweep settings of a `sweep` command line, with `sweep`'s defaults.
let settingsOf (args: ParseResults<SweepCommand.Args>) : SweepSettings =
    let d = SweepSettings.Default(args.GetResult SweepCommand.Model)
    { d with
        Tokens = args.TryGetResult SweepCommand.Tokens
        Kinds = args.GetResult(SweepCommand.Kinds, d.Kinds)
        Layers = args.GetResult(SweepCommand.Layers, [])
        Ks = args.GetResult(SweepCommand.Ks, (if args.Contains SweepCommand.L1s then [] else d.Ks))
        L1s = args.GetResult(SweepCommand.L1s, [])
        Widths = args.GetResult(SweepCommand.Widths, [])
        Steps = args.GetResult(SweepCommand.Steps, d.Steps)
        Batch = args.GetResult(SweepCommand.Batch, d.Batch)
        Seed = args.GetResult(SweepCommand.Seed, d.Seed)
        Ctx = args.TryGetResult SweepCommand.Ctx
        BufferRows = args.TryGetResult SweepCommand.Buffer_Rows
        CheckpointEvery = args.GetResult(SweepCommand.Checkpoint_Every, d.CheckpointEvery)
        EvalRows = args.GetResult(SweepCommand.Eval_Rows, d.EvalRows)
        SplicedRows = args.GetResult(SweepCommand.Spliced_Rows, d.SplicedRows) }

/// `sweep ... --slurm DIR`: the job table and scripts, nothing trained.
let prepare (common: Common.Options) (args: ParseResults<SweepCommand.Args>) =
    let dir = args.GetResult SweepCommand.Slurm
    let settings = settingsOf args
    let model, _ = ModelFiles.load settings.Model TorchSharp.torch.CPU
    use _m = model
    let slurm =
        { JobName = "sweep-" + ModelName.ofPath settings.Model
          Sbatch = args.GetResult(SweepCommand.Sbatch, []) |> List.map Slurm.parseOption
          MaxParallel = args.GetResult(SweepCommand.Max_Parallel, 0)
          Command = Slurm.currentCommand ()
          Device = common.Device
          Setup = [] }
    let table = SlurmSweep.prepare settings slurm dir model
    printfn "%d configurations in %s (jobs.csv); batch scripts cache.sbatch, train.sbatch (array 0-%d), gather.sbatch" table.Rows.Length
        (Path.Combine(table.Dir, "sweep.json")) (table.Rows.Length - 1)
    printfn "submit all three stages: %s" (Path.Combine(table.Dir, "submit.sh"))
    0

type TaskArgs =
    | [<ExactlyOnce>] Table of path: string
    | Index of int
    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Table _ -> "the sweep's job table (sweep.json, or its folder)"
            | Index _ -> "the row to train (default: $SLURM_ARRAY_TASK_ID)"

/// `sweep-cache --table T`: stage 1, the shared activation cache.
let cache (common: Common.Options) (args: ParseResults<TaskArgs>) =
    let sw = Stopwatch.StartNew()
    let table = SlurmSweep.readTable (args.GetResult Table)
    let device = Common.device common
    let model, text = CoderRun.loadModelAndText table.Settings.Model table.Settings.Tokens device
    use _m = model
    let m = SlurmSweep.writeCache table model text device (fun m -> printfn "  cache: %d rows in %d shards" m.TotalRows m.Shards.Length)
    printfn "activation cache %s: %d rows of %s, complete, in %s" (SlurmSweep.cacheDir table.Dir) m.TotalRows
        (String.Join(", ", m.Hooks |> List.map (fun h -> h.Name))) (Output.seconds sw.Elapsed)
    0

/// `sweep-task --table T --index N`: stage 2, one configuration. Exit code 0: finished (or finished before);
/// `Slurm.RequeueExitCode`: SIGTERM came, a checkpoint was written, the batch script requeues the task.
let task (common: Common.Options) (args: ParseResults<TaskArgs>) =
    let sw = Stopwatch.StartNew()
    let table = SlurmSweep.readTable (args.GetResult Table)
    let index =
        match args.TryGetResult Index with
        | Some i -> i
        | None ->
            match Int32.TryParse(Environment.GetEnvironmentVariable "SLURM_ARRAY_TASK_ID") with
            | true, i -> i
            | _ -> failwith "no --index and no SLURM_ARRAY_TASK_ID: which row of the table?"
    use stop = new CancellationTokenSource()
    // Slurm's warning (preemption, --signal=TERM@S before the time limit, scancel --signal=TERM): checkpoint, then exit.
    use _term =
        PosixSignalRegistration.Create(PosixSignal.SIGTERM, fun ctx ->
            ctx.Cancel <- true
            eprintfn "SIGTERM: stopping after a checkpoint"
            stop.Cancel())
    let device = Common.device common
    let row = table.Rows |> List.tryFind (fun r -> r.Index = index)
    printfn "task %d: %s" index (match row with Some r -> r.Name | None -> "?")
    let model, text = CoderRun.loadModelAndText table.Settings.Model table.Settings.Tokens device
    use _m = model
    match SlurmSweep.runTask table index model text device stop.Token (TrainCoderCommand.printProgress sw) with
    | AlreadyFinished ->
        printfn "already finished: skipped"
        0
    | Completed m ->
        printfn ""
        printfn "finished in %s: L0 %.2f, FVU %.4f, CE spliced %.4f" (Output.seconds sw.Elapsed) m.L0 m.Fvu m.CeSpliced
        0
    | StoppedAt step ->
        printfn ""
        printfn "stopped after the checkpoint at step %d: requeue to resume (exit %d)" step Slurm.RequeueExitCode
        Slurm.RequeueExitCode

/// `sweep-gather --table T`: stage 3. Exit code 0 when every configuration finished, 1 otherwise (the tables of the
/// finished ones are written either way).
let gather (args: ParseResults<TaskArgs>) =
    let table = SlurmSweep.readTable (args.GetResult Table)
    let g = SlurmSweep.gather table
    printf "%s" (File.ReadAllText(Path.Combine(table.Dir, "sweep.md")))
    printfn ""
    printfn "%d of %d configurations finished; wrote %s" g.Rows.Length table.Rows.Length (String.Join(", ", g.Files))
    if g.Unfinished.IsEmpty then 0
    else
        eprintfn "not finished: %s" (String.Join(", ", g.Unfinished |> List.map (fun (r, _) -> r.Name)))
        1
