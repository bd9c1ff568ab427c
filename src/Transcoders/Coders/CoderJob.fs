namespace Transcoders.Coders

open System
open System.IO
open TorchSharp
open Transcoders.Activations
open Transcoders.Models

/// One coder to train: its name (the folder it is saved in), its configuration and how it is trained. (`Train.LogPath`
/// is not used: each coder logs to `<Out>/<name>/log.jsonl`.)
type CoderJob =
    { Name: string
      Coder: CoderConfig
      Train: TrainConfig }

/// Evaluation of trained coders.
type JobEval =
    { /// Held-out activation rows (from the validation text) for L0, FVU, MSE, dead features; 0 skips it.
      ActivationRows: int64
      /// Validation rows of `StoreConfig.Ctx` tokens for the spliced model (CE, KL, top-1); 0 skips it.
      SplicedRows: int
      /// Rows per model pass of the spliced evaluation.
      SplicedBatch: int
      /// Also splice all transcoders of the run at once (when they sit at distinct layers), as the transcoder
      /// paper's "every MLP replaced".
      Joint: bool }

    /// 32,768 held-out rows; 128 validation rows spliced, 16 at a time; the joint replacement too.
    static member Default = { ActivationRows = 32_768L; SplicedRows = 128; SplicedBatch = 16; Joint = true }

/// Settings of a training run on a model (shared by all its coders).
type JobsConfig =
    { /// Output folder: one sub-folder per coder, checkpoints, run description and metrics tables.
      Out: string
      /// Text rows, passes and the shuffle buffer; `Buffer.BatchSize` must equal every job's `Train.BatchSize`,
      /// and `Buffer.ServeDevice` is where the coders train.
      Store: StoreConfig
      /// Cache activations on disk (written once, then read by this and later runs) instead of running the
      /// model for every batch.
      Cache: DiskCache option
      /// Steps between checkpoints (0: only the final one). Resuming from one continues bit for bit.
      CheckpointEvery: int
      /// Continue from the newest intact checkpoint in `Out` when there is one (it must come from the same run
      /// description; damaged newer ones are skipped and named); otherwise the checkpoints there are discarded and
      /// training starts over.
      Resume: bool
      Eval: JobEval
      /// Keep the newest this many checkpoints (0: all), so that a damaged one leaves an older one to resume from.
      KeepCheckpoints: int
      /// Once cancelled (a scheduler's SIGTERM), the run writes a checkpoint after the current step and stops with
      /// `OperationCanceledException`; resuming from that checkpoint continues bit for bit.
      Stop: Threading.CancellationToken }

    static member Default(out: string) =
        { Out = out; Store = StoreConfig.Default; Cache = None; CheckpointEvery = 1000; Resume = true; Eval = JobEval.Default
          KeepCheckpoints = 3; Stop = Threading.CancellationToken.None }

/// What a run reports while it works.
type JobsProgress =
    | Preparing of what: string
    /// After a step: the step (from 1), the total, tokens per coder so far, and the coders logged at this step.
    | Trained of step: int * steps: int * tokens: int64 * logs: (string * StepLog) list
    | Checkpointed of step: int * folder: string
    | Evaluating of coder: string

/// One coder's evaluation: activation metrics (held-out rows) and spliced-model metrics (validation text).
type CoderResult =
    { Name: string
      /// The folder the coder is saved in (`CoderFile.load` reads it).
      Path: string
      /// The saved configuration (scales folded).
      Config: CoderConfig
      Train: TrainConfig option
      /// The last logged training step.
      LastLog: StepLog option
      Metrics: EvalResult option
      Spliced: SplicedEval.SplicedMetrics option }

/// What `CoderJobs.run` did.
type JobsResult =
    { Coders: CoderResult list
      /// Every transcoder spliced at once (see `JobEval.Joint`).
      Joint: SplicedEval.SplicedMetrics option
      Steps: int
      /// Tokens each coder trained on.
      Tokens: int64
      /// The step training resumed from (None: it started fresh).
      ResumedFrom: int option
      TrainSeconds: float
      EvalSeconds: float }

/// A coder that does not fit the model, a run that cannot resume, a diverged coder: the message says which and why.
exception CoderJobError of string with
    override this.Message = this.Data0

/// Functions over coder jobs: their names, the hooks they read, whether they fit a model, their batches.
[<RequireQualifiedAccess>]
module CoderJob =
    /// Raises `CoderJobError` with a formatted message.
    let internal fail fmt = Printf.kprintf (fun s -> raise (CoderJobError s)) fmt

    /// The one naming scheme of coder folders: `transcoder-L1`, `skip-transcoder-L1`, `sae-L1` (an SAE on the MLP
    /// output), `sae-hook_resid_post-L1` (an SAE on another hook of the block), `clt-L0-1` (a cross-layer transcoder).
    /// (Folders named otherwise, such as the `tc-L1` of earlier versions, still load: `CoderFolders` reads what a
    /// folder holds, not its name.)
    let name (c: CoderConfig) : string =
        let layers = String.Join("-", c.Layers |> Array.map string)
        match c.Kind with
        | Transcoder -> sprintf "transcoder-L%s" layers
        | SkipTranscoder -> sprintf "skip-transcoder-L%s" layers
        | CrossLayerTranscoder -> sprintf "clt-L%s" layers
        | Sae ->
            let hook = c.HookIn[0]
            let suffix = let p = sprintf "blocks.%d." c.Layers[0] in if hook.StartsWith p then hook.Substring p.Length else hook
            if suffix = "hook_mlp_out" then sprintf "sae-L%s" layers
            else sprintf "sae-%s-L%s" (suffix.Replace(":", "-").Replace(".", "-")) layers

    /// The block index of a `blocks.{l}.…` hook.
    let private hookLayer (hook: string) =
        if hook.StartsWith "blocks." then
            match Int32.TryParse(hook.Split('.')[1]) with
            | true, l -> Some l
            | _ -> None
        else None

    /// The hooks a coder reads and predicts, as the activation layer names them.
    let hooksOf (name: string) (c: CoderConfig) : CoderHooks =
        CoderHooks.crossLayer name (List.ofArray c.HookIn) (List.ofArray c.HookOut)

    /// Every problem that keeps `job` from training on `model` (empty when it fits): an invalid configuration, a
    /// hook the model does not have, a hook at another layer than the coder's, widths that differ from the model's
    /// activations, an invalid training configuration.
    let problems (model: Transformer) (job: CoderJob) : string list =
        let c = job.Coder
        let known = HookNames.all model.Config
        let configProblems = CoderConfig.problems c
        let unknown =
            [ for h in Array.append c.HookIn c.HookOut |> Array.distinct do
                  if not (List.contains h known) then
                      let hint = try HookNames.resolveAmong known h |> ignore; "globs are not allowed" with e -> e.Message
                      yield sprintf "hook '%s' is not a hook point of this model: %s" h hint ]
        let layers =
            [ for i in 0 .. min c.Layers.Length c.HookIn.Length - 1 do
                  for h in [ c.HookIn[i]; (if i < c.HookOut.Length then c.HookOut[i] else c.HookIn[i]) ] do
                      match hookLayer h with
                      | Some l when l <> c.Layers[i] -> yield sprintf "hook '%s' is in block %d, but the coder's layer %d is %d" h l i c.Layers[i]
                      | _ -> () ]
        let widths =
            if not configProblems.IsEmpty || not unknown.IsEmpty then []
            else
                let w = ActivationStore.Widths(model, List.ofArray (Array.append c.HookIn c.HookOut |> Array.distinct))
                [ for h in c.HookIn do
                      if w[h] <> int64 c.DIn then yield sprintf "d_in is %d, but the model's '%s' has width %d" c.DIn h w[h]
                  for h in c.HookOut do
                      if w[h] <> int64 c.DOut then yield sprintf "d_out is %d, but the model's '%s' has width %d" c.DOut h w[h] ]
        configProblems @ unknown @ layers @ widths @ job.Train.Problems

    /// Fails with `CoderJobError` listing every problem of every job (see `problems`), duplicate or unusable names,
    /// and batch sizes that differ from the store's.
    let validate (model: Transformer) (store: StoreConfig) (jobs: CoderJob list) =
        if jobs.IsEmpty then fail "no coders to train"
        let issues =
            [ for name, n in jobs |> List.countBy (fun j -> j.Name) do
                  if n > 1 then yield sprintf "coder name '%s' is used %d times" name n
              for j in jobs do
                  if String.IsNullOrWhiteSpace j.Name || j.Name.IndexOfAny(Path.GetInvalidFileNameChars()) >= 0
                     || j.Name = "checkpoint" || j.Name.StartsWith "." then
                      yield sprintf "coder name '%s' cannot be a folder name (no path separators, not 'checkpoint')" j.Name
                  if j.Train.BatchSize <> int store.Buffer.BatchSize then
                      yield sprintf "coder '%s': Train.BatchSize %d differs from the store's batch size %d (one stream feeds every coder)" j.Name j.Train.BatchSize store.Buffer.BatchSize
                  for p in problems model j do yield sprintf "coder '%s': %s" j.Name p ]
        if not issues.IsEmpty then
            raise (CoderJobError("the coders do not fit the model:\n  " + String.Join("\n  ", issues)))

    /// The coder's (input, target) of a batch: [B, d] for one layer, [B, L, d] for a cross-layer transcoder.
    let pair (c: CoderConfig) (batch: Batch) : torch.Tensor * torch.Tensor =
        let pick (hooks: string[]) =
            if hooks.Length = 1 then (Batch.hook hooks[0] batch).alias()
            else torch.stack([| for h in hooks -> Batch.hook h batch |], 1L)
        pick c.HookIn, pick c.HookOut
