namespace Transcoders.Coders

open System
open System.IO
open System.Text.Json.Nodes
open TorchSharp
open Transcoders.Activations
open Transcoders.Training

/// The checkpoints of a coder training run.
[<RequireQualifiedAccess>]
module JobCheckpoints =

    // Checkpoints go through Training's `Checkpointing` (atomic folders with a manifest of checksums, the newest
    // intact one resumed, older ones kept): every coder's parameters under "{name}/" in model.safetensors, its
    // BatchTopK threshold and firing statistics as buffers, its AdamW state under "{name}/" in
    // optimizer.safetensors, the shuffle buffer as the extra file buffer.safetensors, and per coder its step,
    // configuration (with the normalisation scale) and firing-window counters in trainer.json's state.

    let dir (config: JobsConfig) = Path.Combine(config.Out, "checkpoint")
    let [<Literal>] BufferFile = "buffer.safetensors"

    let private prefix (job: CoderJob) = job.Name + "/"

    /// The live tensors of a coder's training state that a checkpoint holds (loading copies into them):
    /// parameters, and as buffers the BatchTopK threshold and the firing statistics.
    let private stateTensors (job: CoderJob) (s: TrainState) =
        let p = prefix job
        [ for n, t in s.Coder.NamedParameters -> p + n, t :> torch.Tensor ],
        [ match s.Coder.BatchTopKThreshold with
          | Some t -> yield p + "batchtopk_threshold", t
          | None -> ()
          yield p + "stats.since_fired", s.Stats.TokensSinceFired
          yield p + "stats.counts", s.Stats.Counts ]

    /// Writes every coder's training state and the buffer's state as the checkpoint after `step` steps, and prunes
    /// the oldest beyond `KeepCheckpoints`. Returns its folder.
    let save (config: JobsConfig) (description: string) (step: int) (elapsed: float) (buffer: ShuffleBuffer)
                               (states: (CoderJob * TrainState) list) =
        let root = dir config
        let coders = JsonArray()
        for job, s in states do
            let o = JsonObject()
            o["name"] <- job.Name
            o["step"] <- s.Step
            o["config"] <- CoderConfig.toJsonNode s.Coder.Config
            o["window_tokens"] <- s.Stats.WindowTokens
            o["total_tokens"] <- s.Stats.TotalTokens
            coders.Add o
        let state = JsonObject()
        state["coders"] <- coders
        let info: Checkpointing.Info =
            { Step = step; Tokens = int64 step * config.Store.Buffer.BatchSize; ElapsedSeconds = elapsed
              Config = JsonNode.Parse(description).AsObject(); Metadata = Map.empty; State = state }
        let parameters, buffers = states |> List.map (fun (j, s) -> stateTensors j s) |> List.unzip
        let folder =
            Checkpointing.saveWith root info (List.concat parameters) (List.concat buffers)
                [ for j, s in states -> prefix j, s.Optimizer ]
                [ { File = BufferFile; Write = fun path -> buffer.SaveState path } ]
        Checkpointing.prune root config.KeepCheckpoints
        folder

    /// Every job's training state from a checkpoint folder that `Checkpointing.newestIntact` verified (with its `info`).
    let load (folder: string) (info: Checkpointing.Info) (jobs: CoderJob list) (device: torch.Device) =
        let path = Path.Combine(folder, Checkpointing.TrainerFile)
        let saved =
            match info.State["coders"] with
            | :? JsonArray as a -> [ for o in a -> o["name"].GetValue<string>(), o.AsObject() ] |> Map.ofList
            | _ -> CoderJob.fail "%s: the checkpoint holds no coder states" path
        let states = Collections.Generic.List<CoderJob * TrainState * JsonObject>()
        try
            for job in jobs do
                let o =
                    match saved.TryFind job.Name with
                    | Some o -> o
                    | None -> CoderJob.fail "%s: the checkpoint has no state for coder '%s'" path job.Name
                let cfg = CoderConfig.ofJsonNode (sprintf "%s coder '%s'" path job.Name) (o["config"].AsObject())
                if { cfg with Scale = job.Coder.Scale; FoldedScale = job.Coder.FoldedScale } <> job.Coder then
                    CoderJob.fail "%s: coder '%s' was saved with another configuration" path job.Name
                let coder = Coder.create cfg device
                try states.Add((job, CoderTraining.init job.Train coder, o))
                with _ ->
                    (coder :> IDisposable).Dispose()
                    reraise ()
            let parameters, buffers = [ for j, s, _ in states -> stateTensors j s ] |> List.unzip
            (try
                Checkpointing.loadVerifiedWith folder info (List.concat parameters) (List.concat buffers) [ for j, s, _ in states -> prefix j, s.Optimizer ]
             with Checkpointing.CheckpointError (p, problem) -> CoderJob.fail "%s: %s" p problem)
            [ for j, s, o in states do
                  s.Stats.LoadStateDict(s.Stats.TokensSinceFired, s.Stats.Counts, o["window_tokens"].GetValue<int64>(),
                                        o["total_tokens"].GetValue<int64>())
                  s.Step <- o["step"].GetValue<int>()
                  yield j, s ]
        with _ ->
            for _, s, _ in states do
                (s :> IDisposable).Dispose()
                (s.Coder :> IDisposable).Dispose()
            reraise ()

    /// Where a run resumes: None (and the checkpoints removed) when `config.Resume` is off or none is intact; else the
    /// step, folder and info of the newest intact checkpoint, which must come from the same run description
    /// (`RunDescription.ofRun`); damaged newer ones are reported through `onProgress` and skipped.
    let resumePoint (config: JobsConfig) (description: string) (onProgress: JobsProgress -> unit) : (int * string * Checkpointing.Info) option =
        let root = dir config
        let runFile = RunDescription.path config.Out
        if not config.Resume then
            if Directory.Exists root then Directory.Delete(root, true)
            None
        else
            if File.Exists(Path.Combine(root, "latest.json")) then
                CoderJob.fail "%s holds a checkpoint of an older version of this program, which cannot be resumed: start over (JobsConfig.Resume = false; --no-resume on the command line)" config.Out
            let found, skipped =
                try Checkpointing.newestIntact root
                with Checkpointing.CheckpointError (p, problem) -> CoderJob.fail "%s: %s" p problem
            for d, why in skipped do
                onProgress (Preparing(sprintf "skipped checkpoint %s: %s" d why))
            match found with
            | Some(folder, info) ->
                let saved = if File.Exists runFile then File.ReadAllText runFile else ""
                if saved <> description then
                    let a = saved.Split('\n')
                    let b = description.Split('\n')
                    let i = Seq.zip a b |> Seq.tryFindIndex (fun (x, y) -> x <> y) |> Option.defaultValue (min a.Length b.Length)
                    CoderJob.fail "%s holds a checkpoint of another run (run.json differs at line %d: '%s' here, '%s' now): use another output folder, or start over (JobsConfig.Resume = false; --no-resume on the command line)"
                        config.Out (i + 1) (if i < a.Length then a[i].Trim() else "") (if i < b.Length then b[i].Trim() else "")
                Some(info.Step, folder, info)
            | None -> None
