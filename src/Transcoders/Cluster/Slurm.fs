namespace Transcoders.Cluster

open System
open System.IO
open System.Reflection

/// How the sweep's jobs are submitted to Slurm.
type SlurmOptions =
    { /// The jobs' name prefix (`<name>-cache`, `<name>`, `<name>-gather`).
      JobName: string
      /// `#SBATCH` options as key=value (or a bare key), e.g. "partition=gpu", "gres=gpu:1", "time=04:00:00",
      /// "cpus-per-task=8", "mem=32G", "account=lab". They override the defaults of `Slurm.defaults`.
      Sbatch: (string * string) list
      /// Array tasks running at once (0: as many as Slurm allows): `--array=0-N%M`.
      MaxParallel: int
      /// The command line that runs transcoders on a node (e.g. `dotnet /shared/transcoders/Transcoders.Cli.dll`).
      Command: string
      /// `--device` of every job (auto: CUDA when the node has a GPU).
      Device: string
      /// Shell lines run before the command in every job (module load, environment variables).
      Setup: string list }

/// Slurm batch scripts for the three stages of a sweep (cache, array of coders, gather) and `submit.sh`, which chains
/// them with dependencies.
[<RequireQualifiedAccess>]
module Slurm =
    /// The exit code of a task that wrote a checkpoint on SIGTERM and stopped (EX_TEMPFAIL): its batch script puts it
    /// back in the queue (`scontrol requeue`), and it resumes from the checkpoint.
    [<Literal>]
    let RequeueExitCode = 75

    /// Seconds of warning Slurm gives a task before its time limit (`--signal=TERM@S`): time to write a checkpoint.
    [<Literal>]
    let SignalSeconds = 120

    /// Options every job gets unless `SlurmOptions.Sbatch` sets them: one task of one CPU, logs appended across
    /// requeues.
    let defaults = [ "ntasks", "1"; "cpus-per-task", "1"; "open-mode", "append" ]

    /// The command that runs this program again: the apphost, or `dotnet <the entry assembly>`.
    let currentCommand () =
        let quote (s: string) = if s.IndexOfAny [| ' '; '\''; '"'; '$' |] >= 0 then "'" + s.Replace("'", "'\\''") + "'" else s
        let proc = Environment.ProcessPath
        let entry = Assembly.GetEntryAssembly()
        if isNull proc then "transcoders"
        elif Path.GetFileNameWithoutExtension(proc) = "dotnet" && not (isNull entry) then quote proc + " " + quote entry.Location
        else quote proc

    /// Parses "key=value" (or a bare "key", e.g. "exclusive"); a leading "--" is allowed.
    let parseOption (s: string) =
        let s = s.Trim().TrimStart('-')
        if s = "" then invalidArg "sbatch" "an empty #SBATCH option"
        match s.IndexOf '=' with
        | -1 -> s, ""
        | i -> s.Substring(0, i), s.Substring(i + 1)

    let private line (key: string, value: string) =
        if value = "" then sprintf "#SBATCH --%s" key else sprintf "#SBATCH --%s=%s" key value

    /// The `#SBATCH` lines: `pinned` (which the user cannot change), then the defaults and the user's options, the
    /// user's winning over a default with the same key.
    let header (o: SlurmOptions) (pinned: (string * string) list) =
        let user = o.Sbatch |> List.map (fun (k, v) -> k.TrimStart('-'), v)
        let fixedKeys = set (List.map fst pinned)
        for k, _ in user do
            if fixedKeys.Contains k then invalidArg "sbatch" (sprintf "#SBATCH --%s is set by the sweep itself and cannot be given" k)
        let userKeys = set (List.map fst user)
        [ yield! pinned
          yield! defaults |> List.filter (fun (k, _) -> not (userKeys.Contains k))
          yield! user ]
        |> List.map line

    let private quote (s: string) = "'" + s.Replace("'", "'\\''") + "'"

    let private script (o: SlurmOptions) (pinned: (string * string) list) (body: string list) =
        String.Join(
            "\n",
            [ yield "#!/bin/bash"
              yield! header o pinned
              yield ""
              yield "set -uo pipefail"
              yield! o.Setup
              yield! body ]) + "\n"

    let private run (o: SlurmOptions) (args: string) =
        sprintf "srun %s %s --device %s --threads \"${SLURM_CPUS_PER_TASK:-1}\"" o.Command args (quote o.Device)

    /// Stage 1: one job that runs the model over the text once and writes the shared activation cache.
    let cacheScript (o: SlurmOptions) (dir: string) (table: string) =
        script o [ "job-name", o.JobName + "-cache"; "output", Path.Combine(dir, "logs", "cache-%j.out") ]
            [ run o (sprintf "sweep-cache --table %s" (quote table)) ]

    /// Stage 2: the array job, one task per row of the table; a task stopped by SIGTERM after its checkpoint
    /// (preemption, `scancel --signal=TERM`, the time limit coming) requeues itself and resumes.
    let trainScript (o: SlurmOptions) (dir: string) (table: string) (tasks: int) =
        if tasks < 1 then invalidArg "tasks" "the sweep has no tasks"
        let array = sprintf "0-%d%s" (tasks - 1) (if o.MaxParallel > 0 then sprintf "%%%d" o.MaxParallel else "")
        script o
            [ "job-name", o.JobName; "array", array; "requeue", ""; "signal", sprintf "TERM@%d" SignalSeconds
              "output", Path.Combine(dir, "logs", "task-%A_%a.out") ]
            [ run o (sprintf "sweep-task --table %s --index \"$SLURM_ARRAY_TASK_ID\"" (quote table))
              "rc=$?"
              sprintf "if [ \"$rc\" -eq %d ]; then" RequeueExitCode
              "    # checkpointed on SIGTERM: back to the queue, to resume from the checkpoint"
              "    scontrol requeue \"${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}\""
              "fi"
              "exit \"$rc\"" ]

    /// Stage 3: gathers every finished run into the sweep's tables, frontier and plot page.
    let gatherScript (o: SlurmOptions) (dir: string) (table: string) =
        script { o with Sbatch = o.Sbatch |> List.filter (fun (k, _) -> k.TrimStart('-') <> "gres" && not (k.Contains "gpu")) }
            [ "job-name", o.JobName + "-gather"; "output", Path.Combine(dir, "logs", "gather-%j.out") ]
            [ sprintf "%s sweep-gather --table %s" o.Command (quote table) ]

    /// `submit.sh`: submits the three stages, each waiting for the one before (the cache must succeed; gather runs
    /// whatever the tasks' outcome, and lists the configurations that did not finish).
    let submitScript (dir: string) =
        String.Join(
            "\n",
            [ "#!/bin/bash"
              "# Submits the sweep: the activation cache, then the array of coders, then the gather."
              "set -euo pipefail"
              sprintf "cd %s" (quote dir)
              "cache=$(sbatch --parsable cache.sbatch)"
              "train=$(sbatch --parsable --dependency=afterok:${cache%%;*} train.sbatch)"
              "gather=$(sbatch --parsable --dependency=afterany:${train%%;*} gather.sbatch)"
              "echo \"cache job $cache, array job $train, gather job $gather\"" ]) + "\n"
