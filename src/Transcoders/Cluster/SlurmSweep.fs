namespace Transcoders.Cluster

open System
open System.Globalization
open System.IO
open System.Text.Json
open System.Text.Json.Nodes
open System.Threading
open TorchSharp
open Transcoders.Activations
open Transcoders.Coders
open Transcoders.Files
open Transcoders.Models
open Transcoders.Views

/// One configuration of a sweep's job table: array task `Index` trains it into `runs/<Name>`.
type TableRow =
    { Index: int
      Name: string
      Kind: string
      Layer: int
      Width: int
      Level: string }

/// A sweep prepared for Slurm (`<Dir>/sweep.json`): its settings and one row per configuration.
type SweepTable =
    { Dir: string
      Settings: SweepSettings
      Rows: TableRow list }

/// Where a configuration of the table stands (`runs/<name>/status.json`).
type TaskState =
    | Pending
    | Running
    /// Stopped by SIGTERM after writing a checkpoint at this step; it resumes from there.
    | Stopped of step: int
    | Failed of message: string
    | Finished

/// What `SlurmSweep.runTask` did.
type TaskOutcome =
    /// Trained, saved and evaluated now (its metrics row).
    | Completed of MetricsRow
    /// Finished before: skipped.
    | AlreadyFinished
    /// Stopped by the stop token after a checkpoint at this step.
    | StoppedAt of step: int

/// What `SlurmSweep.gather` found and wrote.
type GatherResult =
    { /// The finished configurations' metrics, in the sweep table's order.
      Rows: MetricsRow list
      Frontier: FrontierRow list
      /// The configurations that did not finish, with their state.
      Unfinished: (TableRow * TaskState) list
      /// The files written (sweep.csv, sweep.md, frontier.csv, frontier.html).
      Files: string list }

/// A sweep as Slurm jobs over a shared directory: `prepare` writes the job table and the batch scripts; stage 1
/// (`writeCache`) runs the model once and writes the activation cache every task reads; stage 2 (`runTask`, one array
/// task per configuration) trains one coder from that cache with checkpoints in `runs/<name>`, resuming exactly after
/// a requeue and skipping finished configurations; stage 3 (`gather`) writes the sweep's tables, frontier and plot
/// page from the finished runs, as `Sweep.run` would in-process, and names the configurations that are missing.
[<RequireQualifiedAccess>]
module SlurmSweep =
    let [<Literal>] TableFile = "sweep.json"
    let [<Literal>] private StatusFile = "status.json"
    let [<Literal>] private RowFile = "metrics-row.json"

    let private fail fmt = Printf.kprintf failwith fmt
    let private indented = JsonSerializerOptions(WriteIndented = true)
    let private rowJson = JsonSerializerOptions(WriteIndented = true, NumberHandling = Serialization.JsonNumberHandling.AllowNamedFloatingPointLiterals)

    /// The shared activation cache of a sweep directory.
    let cacheDir (dir: string) = Path.Combine(dir, "cache")
    /// The run folder of a configuration.
    let runDir (dir: string) (name: string) = Path.Combine(dir, "runs", name)

    /// The sweep's configurations on `model`, as `Sweep.run` trains them (same order, names and settings).
    let points (settings: SweepSettings) (model: Transformer) (dir: string) (device: torch.Device) : SweepConfig * SweepPoint list =
        let config = SweepSettings.config settings model dir (Some(cacheDir dir)) device
        config, Sweep.points model config

    let private rowOf (i: int) (p: SweepPoint) =
        { Index = i; Name = p.Job.Name; Kind = p.Kind.Name; Layer = p.Layer; Width = p.Width; Level = p.Level.Name }

    let private tableJson (t: SweepTable) =
        let o = JsonObject()
        o["format"] <- "transcoders.slurm-sweep"
        o["version"] <- 1
        o["settings"] <- SweepSettings.toJson t.Settings
        let rows = JsonArray()
        for r in t.Rows do
            let e = JsonObject()
            e["index"] <- r.Index
            e["name"] <- r.Name
            e["kind"] <- r.Kind
            e["layer"] <- r.Layer
            e["width"] <- r.Width
            e["level"] <- r.Level
            rows.Add e
        o["rows"] <- rows
        o.ToJsonString indented

    /// Reads a job table (`<dir>/sweep.json`, or the folder holding it).
    let readTable (path: string) : SweepTable =
        let file = if Directory.Exists path then Path.Combine(path, TableFile) else path
        if not (File.Exists file) then fail "%s: no sweep job table here (written by `sweep ... --slurm DIR`)" file
        let o =
            try JsonNode.Parse(File.ReadAllText file).AsObject()
            with e -> fail "%s: not a sweep job table: %s" file e.Message
        if (try o["format"].GetValue<string>() with _ -> "") <> "transcoders.slurm-sweep" then
            fail "%s: not a sweep job table (format is not transcoders.slurm-sweep)" file
        let row (n: JsonNode) =
            try
                { Index = n["index"].GetValue<int>(); Name = n["name"].GetValue<string>(); Kind = n["kind"].GetValue<string>()
                  Layer = n["layer"].GetValue<int>(); Width = n["width"].GetValue<int>(); Level = n["level"].GetValue<string>() }
            with e -> fail "%s: a row of the table is incomplete: %s" file e.Message
        { Dir = Path.GetDirectoryName(Path.GetFullPath file)
          Settings = SweepSettings.ofJson file (o["settings"].AsObject())
          Rows = [ for n in o["rows"].AsArray() -> row n ] }

    /// Stage 0, on the submitting machine: writes `<dir>/sweep.json` (the settings and one row per configuration),
    /// `jobs.csv` (the same rows, for people and awk), the batch scripts `cache.sbatch`, `train.sbatch` (the array job)
    /// and `gather.sbatch`, and `submit.sh`, which submits the three with dependencies. Returns the table.
    let prepare (settings: SweepSettings) (slurm: SlurmOptions) (dir: string) (model: Transformer) : SweepTable =
        let dir = Path.GetFullPath dir
        let settings =
            { settings with
                Model = Path.GetFullPath settings.Model
                Tokens = settings.Tokens |> Option.map Path.GetFullPath }
        let _, all = points settings model dir torch.CPU
        let table = { Dir = dir; Settings = settings; Rows = all |> List.mapi rowOf }
        Directory.CreateDirectory(Path.Combine(dir, "logs")) |> ignore
        let tableFile = Path.Combine(dir, TableFile)
        AtomicFile.writeAllText tableFile (tableJson table)
        AtomicFile.writeAllText (Path.Combine(dir, "jobs.csv"))
            (String.Join("\n", [ yield "index,name,kind,layer,width,level,folder"
                                 for r in table.Rows ->
                                     sprintf "%d,%s,%s,%d,%d,%s,%s" r.Index r.Name r.Kind r.Layer r.Width r.Level (runDir dir r.Name) ]) + "\n")
        AtomicFile.writeAllText (Path.Combine(dir, "cache.sbatch")) (Slurm.cacheScript slurm dir tableFile)
        AtomicFile.writeAllText (Path.Combine(dir, "train.sbatch")) (Slurm.trainScript slurm dir tableFile table.Rows.Length)
        AtomicFile.writeAllText (Path.Combine(dir, "gather.sbatch")) (Slurm.gatherScript slurm dir tableFile)
        let submit = Path.Combine(dir, "submit.sh")
        AtomicFile.writeAllText submit (Slurm.submitScript dir)
        if not (OperatingSystem.IsWindows()) then
            File.SetUnixFileMode(submit, File.GetUnixFileMode submit ||| UnixFileMode.UserExecute ||| UnixFileMode.GroupExecute)
        table

    /// The store's settings and every configuration's hooks, as `CoderJobs.run` sees them for the whole sweep.
    let private wholeSweep (config: SweepConfig) (all: SweepPoint list) (model: Transformer) (text: ModelText) =
        let jobs = [ for p in all -> p.Job ]
        ModelText.checkFits model.Config text
        CoderJob.validate model config.Run.Store jobs
        let spec = { Coders = [ for j in jobs -> CoderJob.hooksOf j.Name j.Coder ] }
        let store = ActivationStore(model, text.Train, text.Bos, spec, config.Run.Store, text.Name + " (train)")
        let rows = int64 (jobs |> List.map (fun j -> j.Train.Steps) |> List.max) * config.Run.Store.Buffer.BatchSize
        store, rows

    /// Stage 1: runs the model over the text once and writes the cache every task reads (`<dir>/cache`), exactly the
    /// cache the in-process sweep writes with `--cache-activations` (so either can reuse the other's). Resumes an
    /// interrupted write.
    let writeCache (table: SweepTable) (model: Transformer) (text: ModelText) (device: torch.Device) (onShard: CacheManifest -> unit) : CacheManifest =
        let config, all = points table.Settings model table.Dir device
        let store, rows = wholeSweep config all model text
        store.WriteCache({ Dir = cacheDir table.Dir; Settings = CacheConfig.Default }, rows, onShard)

    let private statusPath (table: SweepTable) (name: string) = Path.Combine(runDir table.Dir name, StatusFile)

    let private writeState (table: SweepTable) (name: string) (state: TaskState) =
        let o = JsonObject()
        match state with
        | Pending -> o["state"] <- "pending"
        | Running -> o["state"] <- "running"
        | Stopped step ->
            o["state"] <- "stopped"
            o["step"] <- step
        | Failed message ->
            o["state"] <- "failed"
            o["message"] <- message
        | Finished -> o["state"] <- "finished"
        o["host"] <- Environment.MachineName
        o["slurm_job"] <- (match Environment.GetEnvironmentVariable "SLURM_JOB_ID" with null -> "" | j -> j)
        o["time"] <- DateTime.UtcNow.ToString("o", CultureInfo.InvariantCulture)
        Directory.CreateDirectory(runDir table.Dir name) |> ignore
        AtomicFile.writeAllText (statusPath table name) (o.ToJsonString indented)

    /// The state of a configuration, from its run folder.
    let state (table: SweepTable) (name: string) : TaskState =
        let path = statusPath table name
        if not (File.Exists path) then Pending
        else
            let o = try JsonNode.Parse(File.ReadAllText path).AsObject() with e -> fail "%s: %s" path e.Message
            match o["state"].GetValue<string>() with
            | "running" -> Running
            | "stopped" -> Stopped(o["step"].GetValue<int>())
            | "failed" -> Failed(o["message"].GetValue<string>())
            | "finished" when File.Exists(Path.Combine(runDir table.Dir name, RowFile)) -> Finished
            | "finished" -> Failed(sprintf "%s says finished, but %s is missing" path RowFile)
            | s -> Pending |> fun _ -> fail "%s: unknown state '%s'" path s

    /// The metrics row of a finished configuration.
    let finishedRow (table: SweepTable) (name: string) : MetricsRow =
        let path = Path.Combine(runDir table.Dir name, RowFile)
        try JsonSerializer.Deserialize<MetricsRow>(File.ReadAllText path, rowJson)
        with e -> fail "%s: %s" path e.Message

    /// Stage 2, one array task: trains the configuration of row `index` from the shared cache into `runs/<name>`
    /// (checkpoints there; a checkpoint of an interrupted run is resumed bit for bit), then saves and evaluates it as
    /// `CoderJobs.run` does. A finished configuration is skipped. When `stop` is cancelled (SIGTERM), the run writes a
    /// checkpoint after the current step and returns `StoppedAt`.
    let runTask (table: SweepTable) (index: int) (model: Transformer) (text: ModelText) (device: torch.Device)
                (stop: CancellationToken) (onProgress: JobsProgress -> unit) : TaskOutcome =
        let row =
            match table.Rows |> List.tryFind (fun r -> r.Index = index) with
            | Some r -> r
            | None -> fail "the sweep table in %s has rows 0..%d, not %d" table.Dir (table.Rows.Length - 1) index
        match state table row.Name with
        | Finished -> AlreadyFinished
        | _ ->
            let config, all = points table.Settings model table.Dir device
            let point = all[index]
            if point.Job.Name <> row.Name then
                fail "row %d of the table is '%s', but its settings now give '%s' (another model or program version?)" index row.Name point.Job.Name
            if not (File.Exists(Path.Combine(cacheDir table.Dir, CacheManifest.FileName))) then
                fail "%s holds no activation cache: run stage 1 first (sweep-cache)" (cacheDir table.Dir)
            writeState table row.Name Running
            let out = runDir table.Dir row.Name
            let run = { config.Run with Out = out; Stop = stop; Resume = true }
            try
                let result = CoderJobs.run model text [ point.Job ] run onProgress
                let m = MetricsTable.row result.Coders.Head
                AtomicFile.writeAllText (Path.Combine(out, RowFile)) (JsonSerializer.Serialize(m, rowJson))
                writeState table row.Name Finished
                Completed m
            with
            | :? OperationCanceledException when stop.IsCancellationRequested ->
                let step =
                    match Transcoders.Training.Checkpointing.newestIntact (Path.Combine(out, "checkpoint")) with
                    | Some(_, info), _ -> info.Step
                    | None, _ -> 0
                writeState table row.Name (Stopped step)
                StoppedAt step
            | e ->
                writeState table row.Name (Failed e.Message)
                reraise ()

    /// The command that reruns the unfinished configurations alone.
    let rerunCommand (table: SweepTable) (unfinished: TableRow list) =
        sprintf "sbatch --array=%s %s" (String.Join(",", unfinished |> List.map (fun r -> string r.Index))) (Path.Combine(table.Dir, "train.sbatch"))

    /// Stage 3: reads every finished run and writes, into the sweep directory, `sweep.csv`, `sweep.md` and
    /// `frontier.csv` as `Sweep.run` writes them in-process (same rows, order and numbers), and `frontier.html` (the
    /// L0 frontier plots); configurations that did not finish are listed in `sweep.md` and the result.
    let gather (table: SweepTable) : GatherResult =
        let states = [ for r in table.Rows -> r, state table r.Name ]
        let finished =
            [ for r, s in states do
                  if s = Finished then yield r, finishedRow table r.Name ]
        let unfinished = states |> List.filter (fun (_, s) -> s <> Finished)
        let ordered = finished |> List.sortBy (fun (r, m) -> r.Kind, r.Layer, r.Width, m.L0)
        let levelOf (r: TableRow) =
            SweepSettings.levels table.Settings |> List.find (fun l -> l.Name = r.Level)
        let front = Sweep.pareto [ for r, m in ordered -> Sweep.frontierRow (LayerCoderKind.Parse r.Kind) r.Layer r.Width (levelOf r) m ]
        let rows = ordered |> List.map snd
        let s = table.Settings
        let file name = Path.Combine(table.Dir, name)
        AtomicFile.writeAllText (file "sweep.csv") (MetricsTable.csv rows)
        AtomicFile.writeAllText (file "frontier.csv") (Sweep.frontierCsv front)
        let header =
            sprintf "# Sweep on %s\n\n%d of %d points finished (%s × layers %s × widths %s × %s), %d steps of %d tokens each.\n\n"
                (ModelName.ofPath s.Model) finished.Length table.Rows.Length (String.Join(", ", s.Kinds))
                (String.Join(", ", table.Rows |> List.map (fun r -> r.Layer) |> List.distinct))
                (String.Join(", ", table.Rows |> List.map (fun r -> r.Width) |> List.distinct))
                (String.Join(", ", SweepSettings.levels s |> List.map (fun l -> l.Name))) s.Steps s.Batch
        let missing =
            if unfinished.IsEmpty then ""
            else
                let describe (r: TableRow, st: TaskState) =
                    match st with
                    | Pending -> sprintf "- %s (task %d): not started" r.Name r.Index
                    | Running -> sprintf "- %s (task %d): running, or killed without a word" r.Name r.Index
                    | Stopped step -> sprintf "- %s (task %d): stopped at step %d, resumes from its checkpoint" r.Name r.Index step
                    | Failed m -> sprintf "- %s (task %d): failed: %s" r.Name r.Index m
                    | Finished -> ""
                sprintf "\n## Not finished\n\n%s\n\nRerun them alone: `%s`\n"
                    (String.Join("\n", unfinished |> List.map describe)) (rerunCommand table (List.map fst unfinished))
        AtomicFile.writeAllText (file "sweep.md") (header + MetricsTable.markdown rows + missing)
        let plots =
            if front.IsEmpty then []
            else [ Plots.write (file "frontier.html") (sprintf "Sweep on %s: L0 frontiers" (ModelName.ofPath s.Model)) (Plots.frontier front) ]
        { Rows = rows; Frontier = front; Unfinished = unfinished
          Files = [ file "sweep.csv"; file "sweep.md"; file "frontier.csv" ] @ plots }
