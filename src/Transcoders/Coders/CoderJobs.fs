namespace Transcoders.Coders

open System
open System.Diagnostics
open System.IO
open TorchSharp
open Transcoders.Activations
open Transcoders.Files
open Transcoders.Models
open Transcoders.Training

/// Training coders on a model end to end: one activation stream feeds every coder (each with its own optimiser),
/// metrics are logged as JSONL, checkpoints resume exactly, coders are saved with `CoderFile.save` and evaluated on
/// held-out activations (`CoderEval`) and spliced into the model on validation text (`SplicedEval`).
module CoderJobs =

    /// Trains `jobs` on `model` over `text` (see the module doc), evaluates them, and writes into `config.Out`:
    /// `run.json` (the run description), `<name>/coder.safetensors` + `coder.json` (`CoderFile`), `<name>/log.jsonl`
    /// (one line per logged step), `<name>/eval.json`, `metrics.csv`, `metrics.md` and `checkpoint/`. A run whose
    /// latest checkpoint is its last step only evaluates. A diverging coder stops the run with the last checkpoint kept.
    let run (model: Transformer) (text: ModelText) (jobs: CoderJob list) (config: JobsConfig) (onProgress: JobsProgress -> unit) : JobsResult =
        ModelText.checkFits model.Config text
        CoderJob.validate model config.Store jobs
        let spec = { Coders = [ for j in jobs -> CoderJob.hooksOf j.Name j.Coder ] }
        let store = ActivationStore(model, text.Train, text.Bos, spec, config.Store, text.Name + " (train)")
        let device = config.Store.Buffer.ServeDevice
        Directory.CreateDirectory config.Out |> ignore
        let description = RunDescription.ofRun store config jobs
        let runFile = RunDescription.path config.Out
        let maxSteps = jobs |> List.map (fun j -> j.Train.Steps) |> List.max
        let resumeFrom = JobCheckpoints.resumePoint config description onProgress
        AtomicFile.writeAllText runFile description
        let logPath (j: CoderJob) = Path.Combine(config.Out, j.Name, "log.jsonl")
        let cacheRows = int64 maxSteps * config.Store.Buffer.BatchSize
        let sw = Stopwatch.StartNew()
        let buffer, states, prefetched =
            match resumeFrom with
            | Some(step, folder, info) ->
                onProgress (Preparing(sprintf "resuming from the checkpoint at step %d (%s)" step folder))
                let states = JobCheckpoints.load folder info jobs device
                let buffer =
                    try store.ResumeBuffer(Path.Combine(folder, JobCheckpoints.BufferFile), ?cache = config.Cache)
                    with _ ->
                        for _, s in states do
                            (s :> IDisposable).Dispose()
                            (s.Coder :> IDisposable).Dispose()
                        reraise ()
                // the log lines of steps after the checkpoint are written again
                for j in jobs do Metrics.truncate (logPath j) (fun s -> s < step)
                buffer, states, [||]
            | None ->
                if config.Cache.IsSome then onProgress (Preparing(sprintf "caching %d activation rows" cacheRows))
                let buffer = store.OpenBuffer(?cache = config.Cache, cacheRows = cacheRows)
                let needed =
                    jobs
                    |> List.map (fun j ->
                        max (if j.Train.Normalise then j.Train.NormalisationBatches else 0)
                            (if j.Train.BiasInit <> Normalisation.ZeroBias then j.Train.BiasInitBatches else 0))
                    |> List.max
                onProgress (Preparing(sprintf "filling the shuffle buffer (%d rows)" config.Store.Buffer.Rows))
                let prefetched = Collections.Generic.List<Batch>()
                let created = Collections.Generic.List<CoderJob * TrainState>()
                try
                    for _ in 1 .. needed do
                        match buffer.Next() with
                        | Some b -> prefetched.Add(b |> Map.map (fun _ t -> t.DetachFromDisposeScope()))
                        | None -> CoderJob.fail "the activation source ended before the first batches"
                    for j in jobs do
                        onProgress (Preparing(sprintf "initialising coder '%s'" j.Name))
                        Transcoders.Tensors.Device.seed j.Train.Seed
                        let coder = Coder.create j.Coder device
                        try
                            CoderTraining.prepare j.Train coder (fun i -> CoderJob.pair j.Coder prefetched[i])
                            (use _ = torch.NewDisposeScope()
                             let x, y = CoderJob.pair j.Coder prefetched[0]
                             let centred = j.Coder.InputBias && j.Train.BiasInit <> Normalisation.ZeroBias
                             onProgress (Preparing(sprintf "coder '%s': %s" j.Name (Normalisation.meanStdReport coder centred x y))))
                            created.Add((j, CoderTraining.init j.Train coder))
                        with _ ->
                            (coder :> IDisposable).Dispose()
                            reraise ()
                with _ ->
                    for _, st in created do
                        (st :> IDisposable).Dispose()
                        (st.Coder :> IDisposable).Dispose()
                    for b in prefetched do Batch.dispose b
                    (buffer :> IDisposable).Dispose()
                    reraise ()
                let states = List.ofSeq created
                let prefetched = prefetched.ToArray()
                for j in jobs do
                    Directory.CreateDirectory(Path.Combine(config.Out, j.Name)) |> ignore
                    AtomicFile.writeAllText (logPath j) ""
                buffer, states, prefetched
        let startStep = match resumeFrom with Some(s, _, _) -> s | None -> 0
        let elapsed0 = match resumeFrom with Some(_, _, info) -> info.ElapsedSeconds | None -> 0.0
        let lastLogs = Collections.Generic.Dictionary<string, StepLog>()
        let mutable lastCheckpoint = resumeFrom |> Option.map (fun (s, folder, _) -> s, folder)
        let writers =
            jobs |> List.map (fun j ->
                Directory.CreateDirectory(Path.Combine(config.Out, j.Name)) |> ignore
                j.Name, new Metrics.Log(logPath j))
            |> dict
        try
            try
                for s in startStep .. maxSteps - 1 do
                    use scope = torch.NewDisposeScope()
                    let batch =
                        if s < prefetched.Length then prefetched[s]
                        else
                            match buffer.Next() with
                            | Some b -> b
                            | None -> CoderJob.fail "the activation source ran out at step %d" s
                    let logged = Collections.Generic.List<string * StepLog>()
                    for job, state in states do
                        if state.Step < job.Train.Steps then
                            use stepScope = torch.NewDisposeScope()
                            let x, y = CoderJob.pair job.Coder batch
                            let log =
                                try CoderTraining.stepWith state (fun _ -> x, y) x y
                                with CoderTrainingError msg ->
                                    CoderJob.fail "coder '%s' stopped: %s. No coder was saved. %s" job.Name msg
                                        (match lastCheckpoint with
                                         | Some (c, folder) -> sprintf "The last good checkpoint is %s (step %d)" folder c
                                         | None -> "No checkpoint was written yet")
                            lastLogs[job.Name] <- log
                            if CoderTraining.isLogged job.Train log then
                                writers[job.Name].WriteLine(CoderTraining.logLine log)
                                logged.Add((job.Name, log))
                    onProgress (Trained(s + 1, maxSteps, int64 (s + 1) * config.Store.Buffer.BatchSize, List.ofSeq logged))
                    let stopping = config.Stop.IsCancellationRequested && s + 1 < maxSteps && s + 1 >= prefetched.Length
                    let due = s + 1 = maxSteps || (config.CheckpointEvery > 0 && (s + 1) % config.CheckpointEvery = 0) || stopping
                    if due && s + 1 >= prefetched.Length then
                        let folder = JobCheckpoints.save config description (s + 1) (elapsed0 + sw.Elapsed.TotalSeconds) buffer states
                        lastCheckpoint <- Some(s + 1, folder)
                        onProgress (Checkpointed(s + 1, folder))
                    if stopping then raise (OperationCanceledException(sprintf "stopped after the checkpoint at step %d" (s + 1)))
            finally
                for w in writers.Values do (w :> IDisposable).Dispose()
                for b in prefetched do Batch.dispose b
                (buffer :> IDisposable).Dispose()
            let trainSeconds = sw.Elapsed.TotalSeconds
            // Save (scales and input biases folded), then evaluate what was saved, on the model's device.
            for job, state in states do
                CoderFile.save (Path.Combine(config.Out, job.Name)) state.Coder
            let evalWatch = Stopwatch.StartNew()
            let loaded = [ for job, _ in states -> job.Name, CoderFile.load (Path.Combine(config.Out, job.Name)) model.Device ]
            try
                let evaluated, joint = JobEvaluation.evaluate model text config.Store config.Eval onProgress loaded
                let results =
                    [ for (job, _), (_, metrics, spliced), (_, coder) in List.zip3 states evaluated loaded ->
                        { Name = job.Name
                          Path = Path.Combine(config.Out, job.Name)
                          Config = coder.Config
                          Train = Some job.Train
                          LastLog =
                            (match lastLogs.TryGetValue job.Name with
                             | true, l -> Some l
                             | _ -> Metrics.tryLast CoderTraining.parseLogLine (logPath job)) // resumed at the end: the log's last line
                          Metrics = metrics
                          Spliced = spliced } ]
                for r in results do JobEvaluation.write r
                MetricsTable.write config.Out results joint
                { Coders = results; Joint = joint; Steps = maxSteps; Tokens = int64 maxSteps * config.Store.Buffer.BatchSize
                  ResumedFrom = resumeFrom |> Option.map (fun (s, _, _) -> s); TrainSeconds = trainSeconds; EvalSeconds = evalWatch.Elapsed.TotalSeconds }
            finally
                for _, c in loaded do (c :> IDisposable).Dispose()
        finally
            for _, s in states do
                (s :> IDisposable).Dispose()
                (s.Coder :> IDisposable).Dispose()

    /// `run` with one training configuration for every coder; each coder is named by `CoderJob.name`.
    let trainOnModel (model: Transformer) (text: ModelText) (coders: CoderConfig list) (train: TrainConfig) (config: JobsConfig) (onProgress: JobsProgress -> unit) : JobsResult =
        run model text [ for c in coders -> { Name = CoderJob.name c; Coder = c; Train = train } ] config onProgress
