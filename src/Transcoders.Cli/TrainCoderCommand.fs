/// `train-coder MODEL`: trains transcoders and/or SAEs on a model's activations (all from one stream), saves them,
/// and prints their evaluation (L0, FVU, spliced CE).
module Transcoders.Cli.TrainCoderCommand

open System
open System.Diagnostics
open System.IO
open Argu
open TorchSharp
open Transcoders.Coders
open Transcoders.Models

type Args =
    | [<MainCommand; ExactlyOnce>] Model of path: string
    | Layers of layers: int list
    | Kind of kinds: string list
    | Activation of string
    | K of int
    | L1 of lambda: float
    | Width of int
    | Expansion of int
    | Steps of int
    | Batch of int
    | Lr of float
    | Out of folder: string
    | Seed of int64
    // the options shared with `sweep` (StoreOptions)
    | Cache_Activations of folder: string
    | Tokens of folder: string
    | Ctx of int
    | Buffer_Rows of int64
    | Checkpoint_Every of int
    | No_Resume
    | Eval_Rows of int64
    | Spliced_Rows of int
    | Matryoshka of prefixes: int list
    | Target_L0 of float
    | Kl_Finetune of steps: int
    | Kl_Finetune_Lr of float
    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Model _ -> "the model: our folder, a Hugging Face folder or a llama2.c .bin (e.g. data/models/stories260K/stories260K.bin)"
            | Layers _ -> "layers to train coders at (default: every layer)"
            | Kind _ -> "transcoder, skip-transcoder, sae (on hook_mlp_out), sae:<hook suffix> (e.g. sae:hook_resid_post) or clt (one cross-layer transcoder over the layers) (default transcoder)"
            | Activation _ -> "topk (default), batchtopk, groupmax, relu (L1 penalty) or jumprelu"
            | K _ -> "features kept per token for topk/batchtopk/groupmax (default d_model/4)"
            | L1 _ -> "sparsity coefficient λ for relu/jumprelu (default 1.0, on activations normalised to E‖x‖ = √d)"
            | Width _ -> "features per coder, d_sae (default: expansion × d_model)"
            | Expansion _ -> "d_sae / d_model when --width is not given (default 16)"
            | Steps _ -> "training steps (default 600)"
            | Batch _ -> "tokens per training batch (default 1024)"
            | Lr _ -> "Adam learning rate (default: 8e-4·√(16384/d_sae), at most 4e-3)"
            | Out _ -> "output folder (default coders/<model>-<kind>)"
            | Seed _ -> "seed of initialisation, text order and shuffling (default 42)"
            | Cache_Activations _ | Tokens _ | Ctx _ | Buffer_Rows _ | Checkpoint_Every _ | No_Resume | Eval_Rows _
            | Spliced_Rows _ -> StoreOptions.usageOf this
            | Matryoshka _ -> "Matryoshka: these nested prefix sizes of the dictionary (and the whole) each reconstruct, e.g. --matryoshka 64 256 (use with --activation batchtopk)"
            | Target_L0 _ -> "jumprelu: pull L0 to this target with the penalty λ·(L0/target − 1)² (λ from --l1; try 10)"
            | Kl_Finetune _ -> "after training, fine-tune the saved transcoders spliced into the model for this many steps on KL + FVU and print the CE gap before/after"
            | Kl_Finetune_Lr _ -> "learning rate of the KL fine-tune (default 1e-4)"

/// Prints progress lines: phases, and every logged step's L0 / FVU / dead fraction per coder.
let printProgress (sw: Stopwatch) =
    let mutable lastPrint = TimeSpan.Zero
    fun (p: JobsProgress) ->
        match p with
        | Preparing what -> printfn "[%6.1fs] %s" sw.Elapsed.TotalSeconds what
        | Evaluating what -> printfn "[%6.1fs] evaluating %s" sw.Elapsed.TotalSeconds what
        | Checkpointed(step, _) -> printfn "[%6.1fs] checkpoint at step %d" sw.Elapsed.TotalSeconds step
        | Trained(step, steps, tokens, logs) ->
            if not logs.IsEmpty && (sw.Elapsed - lastPrint > TimeSpan.FromSeconds 5.0 || step = steps) then
                lastPrint <- sw.Elapsed
                let detail =
                    if logs.Length <= 4 then
                        String.Join(" | ", logs |> List.map (fun (n, l) -> sprintf "%s L0 %.1f FVU %.3f dead %.2f" n l.L0 l.Fvu l.DeadFraction))
                    else
                        let range (f: StepLog -> float) (fmt: Printf.StringFormat<float -> float -> string>) =
                            let vs = logs |> List.map (snd >> f)
                            sprintf fmt (List.min vs) (List.max vs)
                        sprintf "%d coders: L0 %s, FVU %s, dead %s" logs.Length (range (fun l -> l.L0) "%.1f–%.1f")
                            (range (fun l -> l.Fvu) "%.3f–%.3f") (range (fun l -> l.DeadFraction) "%.2f–%.2f")
                printfn "[%6.1fs] step %d/%d (%s tokens) %s" sw.Elapsed.TotalSeconds step steps (Output.count tokens) detail

/// Prints a results table and where the files are.
let printResults (out: string) (result: JobsResult) =
    printfn ""
    printf "%s" (IO.File.ReadAllText(Path.Combine(out, "metrics.md")))
    printfn ""
    printfn "training %s, evaluation %s%s; coders, logs and metrics in %s" (Output.seconds (TimeSpan.FromSeconds result.TrainSeconds))
        (Output.seconds (TimeSpan.FromSeconds result.EvalSeconds))
        (match result.ResumedFrom with Some s -> sprintf " (resumed from step %d)" s | None -> "") out

/// The KL + FVU fine-tune of every saved transcoder of a run, spliced together, on training text (rows after the
/// ones coder training read); prints the CE gap of each set before and after, and saves the tuned coders over the
/// originals (with `metrics.json` and `finetune.json` next to them).
let klFinetune (model: Transformer) (text: ModelText) (config: JobsConfig) (out: string) (steps: int) (lr: float) (result: JobsResult) =
    let transcoders = result.Coders |> List.filter (fun c -> c.Config.Kind = Transcoder || c.Config.Kind = SkipTranscoder)
    if transcoders.IsEmpty then printfn "--kl-finetune: no transcoders to fine-tune"
    else
        let device = model.Device
        let loaded = [ for c in transcoders -> c, CoderFile.load c.Path device ]
        try
            let coders = loaded |> List.map snd
            let validation () = ModelText.tokenBatches device 16 (ModelText.validationRows text config.Store.Ctx config.Eval.SplicedRows)
            let before = SplicedEval.evaluateMany model [ for c in coders -> [ c ] ] (validation ())
            let documents = match text.Bos with Some b -> Transcoders.Text.Batches.splitDocuments b text.Train | None -> [| text.Train |]
            let rows = Transcoders.Text.Batches.PackedRows(documents, config.Store.Ctx, config.Store.TextSeed)
            // training read the same packed order (its text seed): start past its rows, the shuffle buffer's and the
            // dropped BOS positions (25% margin), in batches of 8 rows
            let skip = (result.Tokens + config.Store.Buffer.Rows) * 5L / 4L / int64 config.Store.Ctx / 8L + 1L
            printfn "\nKL + FVU fine-tune of %d transcoder(s), spliced together: %d steps of 8 × %d tokens, lr %g" coders.Length steps config.Store.Ctx lr
            let logs =
                KlFinetune.run model coders { KlFinetune.KlFinetuneConfig.Default with Steps = steps; Lr = lr }
                    (fun step ->
                        let b = rows.Batch(skip + int64 step, 8, device)
                        b.Targets.Dispose()
                        b.Inputs)
                    (fun l -> if l.Step % (max 1 (steps / 5)) = 0 || l.Step = steps - 1 then printfn "  step %d: KL %.4f, FVU %.4f" l.Step l.Kl l.Fvu)
            let after = SplicedEval.evaluateMany model [ for c in coders -> [ c ] ] (validation ())
            printfn "| coder | CE gap before | CE gap after | KL before | KL after | CE recovered before | after |"
            printfn "|---|---|---|---|---|---|---|"
            for ((r, c), b), a in List.zip (List.zip loaded before) after do
                printfn "| %s | %.4f | %.4f | %.4f | %.4f | %.3f | %.3f |" r.Name b.CeDelta a.CeDelta b.KlToClean a.KlToClean b.CeRecovered a.CeRecovered
                CoderFile.save r.Path c
                SaeLensMetrics.write r.Path (SaeLensMetrics.ofResults r.Metrics (Some a))
                let o = Text.Json.Nodes.JsonObject()
                o["steps"] <- steps
                o["lr"] <- lr
                o["ce_gap_before"] <- b.CeDelta
                o["ce_gap_after"] <- a.CeDelta
                o["kl_before"] <- b.KlToClean
                o["kl_after"] <- a.KlToClean
                o["final_kl"] <- (List.last logs).Kl
                o["final_fvu"] <- (List.last logs).Fvu
                File.WriteAllText(Path.Combine(r.Path, "finetune.json"), o.ToJsonString(Text.Json.JsonSerializerOptions(WriteIndented = true)))
        finally
            for _, c in loaded do (c :> IDisposable).Dispose()

/// Trains the coders of `settings` on the model at `modelPath`, printing what it does and the results table;
/// `recipe` adjusts each job's training settings (e.g. Matryoshka, target L0), and `finetune` (steps, learning rate)
/// runs the KL + FVU fine-tune of the transcoders afterwards.
let train (modelPath: string) (settings: CoderRunSettings) (recipe: TrainConfig -> TrainConfig) (finetune: (int * float) option)
          (device: torch.Device) =
    let sw = Stopwatch.StartNew()
    let model, text = CoderRun.loadModelAndText modelPath settings.Tokens device
    use _m = model
    let c = model.Config
    let name = ModelName.ofPath modelPath
    let plan = settings.Plan
    let jobs = CoderPlan.jobs model name plan |> List.map (fun j -> { j with Train = recipe j.Train })
    let out = CoderRun.out name settings
    printfn "%s: %d layers, d_model %d; text %s (%s train tokens)" name c.NLayers c.DModel text.Name (Output.count (int64 text.Train.Length))
    printfn "training %d coder(s) of width %d, %A, %d steps × %d tokens on %O" jobs.Length (CoderPlan.width c.DModel plan)
        (CoderPlan.activation c.DModel plan) plan.Steps plan.Batch device
    let config = CoderRun.jobsConfig model settings out device
    let result = CoderJobs.run model text jobs config (printProgress sw)
    printResults out result
    match finetune with
    | Some(steps, lr) when steps > 0 -> klFinetune model text config out steps lr result
    | _ -> ()
    result

/// The run the arguments describe, on a model of width `dModel`.
let settings (args: ParseResults<Args>) (dModel: int) : CoderRunSettings =
    let plan =
        { CoderPlan.Default with
            Layers = args.GetResult(Layers, [])
            Width = args.TryGetResult Width
            Expansion = args.GetResult(Expansion, 16)
            Activation = Some(CoderRun.activationFor (args.GetResult(Activation, "topk")) (args.TryGetResult K) dModel)
            Lambda = args.GetResult(L1, 1.0)
            Steps = args.GetResult(Steps, 600)
            Batch = args.GetResult(Batch, 1024)
            Seed = args.GetResult(Seed, 42L)
            Lr = args.TryGetResult Lr }
        |> CoderRun.withKinds (args.GetResult(Kind, [ "transcoder" ]))
    { CoderRunSettings.Default with Plan = plan; Out = args.TryGetResult Out } |> StoreOptions.apply args

/// The training recipe the arguments ask for: Matryoshka prefixes, a JumpReLU target L0 (with λ `lambda`).
let recipe (args: ParseResults<Args>) (lambda: float) (t: TrainConfig) =
    let t =
        match args.TryGetResult Matryoshka with
        | Some prefixes -> { t with Loss = { t.Loss with Reconstruction = Reconstruction.Matryoshka(prefixes, t.Loss.Reconstruction) } }
        | None -> t
    match args.TryGetResult Target_L0 with
    | Some target -> { t with Loss = LossConfig.JumpReLUTargetL0(target, lambda) }
    | None -> t

let run (common: Common.Options) (args: ParseResults<Args>) =
    let modelPath = args.GetResult Model
    let device = Common.device common
    let settings = settings args (ModelFiles.inspect modelPath).Config.DModel
    let finetune = args.TryGetResult Kl_Finetune |> Option.map (fun steps -> steps, args.GetResult(Kl_Finetune_Lr, 1e-4))
    train modelPath settings (recipe args settings.Plan.Lambda) finetune device |> ignore
    0
