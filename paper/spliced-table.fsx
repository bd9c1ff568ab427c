#load "common.fsx"
// The transcoder paper's spliced-model table (the walkthrough's GPT-2 numbers: original CE, MLPs replaced by
// transcoders, MLPs zero-ablated, KL of the replaced model): the clean CE, each MLP replaced alone, all replaced at
// once, the same MLPs zero-ablated, KL to the clean model and top-1 agreement, for the per-layer transcoders, the
// skip transcoders and the cross-layer transcoder among CODERS. Coders are spliced without error terms.
//
//   dotnet build src/Transcoders -c Release
//   dotnet fsi paper/spliced-table.fsx [MODEL] [CODERS] [options]
//
//   --rows N      held-out rows (default 64)   --ctx N   tokens per row (default min(128, n_ctx))
//   --batch N     rows per model pass (default 8)
//   --out DIR     results folder (default paper/results)   --device cpu|cuda|auto, --threads N

open System
open System.Diagnostics
open Transcoders.Coders
open Transcoders.Models
open Common

let run = setup "spliced-table" fsi.CommandLineArgs
let args, sw, device, model, tokenizer, modelPath = run.Args, run.Clock, run.Device, run.Model, run.Tokenizer, run.ModelPath
let c = model.Config
let coders = run.Coders()
let ctx = args.Int("ctx", min 128 c.NCtx)
let rows = validationRows tokenizer ctx (args.Int("rows", 64))

// The sets spliced: each layer's coder of a family alone, then the whole family (a CLT only as a whole: its
// decoders write to every later layer).
let families =
    [ "transcoder", Transcoder; "skip transcoder", SkipTranscoder; "cross-layer transcoder", CrossLayerTranscoder ]
    |> List.choose (fun (label, kind) ->
        match coders |> List.filter (fun x -> x.Config.Kind = kind) |> List.sortBy (fun x -> x.Config.Layers[0]) with
        | [] -> None
        | cs -> Some(label, kind, cs))
if families.IsEmpty then failwithf "no transcoders, skip transcoders or cross-layer transcoders in %s" (codersPath args)
let sets =
    [ for label, kind, cs in families do
        if kind <> CrossLayerTranscoder then
            for x in cs do yield label, sprintf "MLP %d" x.Config.Layers[0], [ x ]
        if cs.Length > 1 || kind = CrossLayerTranscoder then
            let layers = cs |> List.collect (fun x -> List.ofArray x.Config.Layers) |> List.distinct |> List.sort
            let what = if layers.Length = c.NLayers then "all MLPs" else sprintf "MLPs %s" (String.Join(", ", layers))
            // one coder of a kind per layer: the first of each layer
            let distinct = cs |> List.distinctBy (fun x -> x.Config.Layers[0])
            yield label, what, (if kind = CrossLayerTranscoder then [ cs.Head ] else distinct) ]
printfn "%s: %d layers; %d spliced sets over %d rows of %d tokens" (ModelName.ofPath modelPath) c.NLayers sets.Length rows.Length ctx
let metrics = SplicedEval.evaluateMany model [ for _, _, s in sets -> s ] (ModelText.tokenBatches model.Device (args.Int("batch", 8)) rows)
let clean = (List.head metrics).CeClean
let body =
    String.concat "\n"
        [ sprintf "Model `%s` (%d layers, d_model %d); %d held-out rows of %d tokens (%d next-token predictions) from the shipped validation stories; coders from `%s`, spliced without error terms."
              (ModelName.ofPath modelPath) c.NLayers c.DModel rows.Length ctx (List.head metrics).Predictions (codersPath args)
          ""
          sprintf "Clean model: CE **%s** nats." (f4 clean)
          ""
          table [ "coder"; "replaced"; "CE spliced"; "ΔCE"; "CE zero-ablated"; "CE recovered"; "KL to clean"; "KL zero-ablated"; "top-1 agreement"; "top-1 zero-ablated" ]
              [ for (family, what, _), m in List.zip sets metrics ->
                  [ family; what; f4 m.CeSpliced; f4 m.CeDelta; f4 m.CeAblated; f3 m.CeRecovered; f4 m.KlToClean; f4 m.KlAblated
                    f3 m.Top1Agreement; f3 m.Top1AgreementAblated ] ] ]
writeResults args "spliced-table.md" "The spliced model: MLPs replaced by coders" sw body |> ignore
for (family, what, _), m in List.zip sets metrics do
    printfn "  %-24s %-10s CE %.4f (clean %.4f, ablated %.4f), KL %.4f, top-1 %.3f" family what m.CeSpliced m.CeClean m.CeAblated m.KlToClean m.Top1Agreement
