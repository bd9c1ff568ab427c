/// `eval-coder MODEL --coders DIR...`: evaluates saved coders on a model (held-out L0, FVU, MSE, dead features;
/// spliced CE, CE recovered, KL, top-1 agreement) and prints a table.
module Transcoders.Cli.EvalCoderCommand

open System
open System.Diagnostics
open System.IO
open Argu
open Transcoders.Coders

type Args =
    | [<MainCommand; ExactlyOnce>] Model of path: string
    | [<Mandatory>] Coders of folders: string list
    | Validation_Tokens of int
    | Activation_Tokens of int64
    | Activation_Text of string
    | Train_Offset of int64
    | Tokens of folder: string
    | Ctx of int
    | Batch of int
    | No_Joint
    | Out of folder: string
    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Model _ -> "the model the coders belong to"
            | Coders _ -> "coder folders (or name.safetensors / name.json paths) saved by train-coder or CoderFile.save"
            | Validation_Tokens _ -> "validation tokens to evaluate on (default 16384): as held-out activation rows and as spliced text"
            | Activation_Tokens _ -> "activation tokens for L0/FVU/dead features, streamed in constant memory (default: --validation-tokens); count dead features over ≥ 1M"
            | Activation_Text _ -> "where those tokens come from: validation (default; it repeats when shorter) or train (the training stream after --train-offset tokens)"
            | Train_Offset _ -> "with --activation-text train: skip this many training tokens in the training run's text order (default 1,048,576: past what 600 steps of 1,024 tokens read)"
            | Tokens _ -> "token shards (a folder with train/ and validation/; default: TinyStories in the model's tokenizer)"
            | Ctx _ -> "tokens per text row (default 128, at most the model's context)"
            | Batch _ -> "rows per model pass in the spliced evaluation (default 16)"
            | No_Joint -> "do not also splice every transcoder at once"
            | Out _ -> "also write metrics.csv and metrics.md here"

let run (common: Common.Options) (args: ParseResults<Args>) =
    let sw = Stopwatch.StartNew()
    let modelPath = args.GetResult Model
    let device = Common.device common
    let model, text = CoderRun.loadModelAndText modelPath (args.TryGetResult Tokens) device
    use _m = model
    let paths = args.GetResult Coders
    let coders = [ for p in paths -> CoderFolders.name p, CoderFile.load p device ]
    try
        // The paper's training settings are valid, so only the coder's fit to the model is checked.
        let problems =
            [ for n, c in coders do
                  for p in CoderJob.problems model { Name = n; Coder = c.Config; Train = TrainConfig.Paper } do
                      yield sprintf "coder '%s': %s" n p ]
        if not problems.IsEmpty then failwithf "the coders do not fit the model:\n  %s" (String.Join("\n  ", problems))
        let tokens = args.GetResult(Validation_Tokens, 16384)
        let streamed = args.Contains Activation_Tokens || args.Contains Activation_Text
        // the training run's text order (train-coder's default seed) so that an offset skips what training read
        let store = CoderPlan.store model (args.TryGetResult Ctx) 4096 None 42L device
        let eval =
            { ActivationRows = (if streamed then 0L else int64 tokens)
              SplicedRows = max 1 (tokens / store.Ctx)
              SplicedBatch = args.GetResult(Batch, 16)
              Joint = not (args.Contains No_Joint) }
        let evaluated, joint = JobEvaluation.evaluate model text store eval (TrainCoderCommand.printProgress sw) coders
        let evaluated =
            if not streamed then evaluated
            else
                let source =
                    match args.GetResult(Activation_Text, "validation").ToLowerInvariant() with
                    | "validation" -> StreamedEval.ValidationText
                    | "train" -> StreamedEval.TrainTextFrom(args.GetResult(Train_Offset, 1_048_576L) / int64 (store.PassRows * store.Ctx))
                    | t -> failwithf "--activation-text: '%s' is not validation or train" t
                let n = args.GetResult(Activation_Tokens, int64 tokens)
                printfn "[%6.1fs] streaming %d activation tokens (%A) through %d coder(s)" sw.Elapsed.TotalSeconds n source coders.Length
                let mutable last = 0L
                let results =
                    StreamedEval.evaluate model text store { StreamedEval.StreamedEvalConfig.Default with Source = source; Tokens = n }
                        (fun t -> if t - last >= 262_144L || t >= n then (last <- t; printfn "[%6.1fs] %d tokens" sw.Elapsed.TotalSeconds t))
                        coders
                [ for (name, _, spliced), (_, r) in List.zip evaluated results -> name, Some r, spliced ]
        printfn ""
        printfn "dead features (never fired over the activation tokens), per layer:"
        for name, m, _ in evaluated do
            match m with
            | Some e ->
                printfn "  %s: %s over %d tokens (L0 %.2f, FVU %.4f)" name
                    (String.Join(" ", e.DeadFractionPerLayer |> Array.map (fun v -> v.ToString("F4", Globalization.CultureInfo.InvariantCulture)))) e.Tokens e.L0 e.Fvu
            | None -> ()
        let results =
            [ for (name, metrics, spliced), (_, c) in List.zip evaluated coders ->
                { Name = name; Path = ""; Config = c.Config; Train = None; LastLog = None; Metrics = metrics; Spliced = spliced } ]
        let rows = results |> List.map MetricsTable.row
        printfn ""
        printf "%s" (MetricsTable.markdown rows)
        match joint with
        | Some j -> printfn "\nevery transcoder spliced at once: CE %.4f (clean %.4f, ablated %.4f), CE recovered %.3f, KL %.4f" j.CeSpliced j.CeClean j.CeAblated j.CeRecovered j.KlToClean
        | None -> ()
        match args.TryGetResult Out with
        | Some out ->
            MetricsTable.write out results joint
            for r in results do SaeLensMetrics.write (Path.Combine(out, r.Name)) (SaeLensMetrics.ofResults r.Metrics r.Spliced)
            printfn "metrics written to %s" out
        | None -> ()
        printfn "(%s)" (Output.seconds sw.Elapsed)
        0
    finally
        for _, c in coders do (c :> IDisposable).Dispose()
