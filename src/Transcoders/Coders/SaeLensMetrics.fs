/// Evaluation results in SAELens' vocabulary (`sae_lens.evals`, whose names Neuronpedia and SAEBench's "core" eval
/// reuse), so that our coders' numbers sit next to published ones: `metrics.json`, written next to our `eval.json`.
/// Keys are SAELens' own; `dead_fraction` and `tokens` are ours (SAELens reports densities, not a dead count).
module Transcoders.Coders.SaeLensMetrics

open System
open System.IO
open System.Text.Json
open System.Text.Json.Nodes

/// One coder's metrics under SAELens' names (NaN where not measured, e.g. no spliced evaluation).
type SaeLensMetrics =
    { /// `l0`: mean active features per token.
      L0: float
      /// `l1`: mean over tokens of Σ_i |a_i|.
      L1: float
      /// `explained_variance`: 1 − FVU.
      ExplainedVariance: float
      /// `mse`: mean over tokens of ‖ŷ − y‖².
      Mse: float
      /// `cossim`: mean cosine of ŷ and y.
      Cossim: float
      /// `l2_ratio`: mean ‖ŷ‖ / ‖y‖.
      L2Ratio: float
      /// `ce_loss_score`: (CE_ablated − CE_spliced) / (CE_ablated − CE_clean).
      CeLossScore: float
      /// `kl_div_score`: (KL_ablated − KL_spliced) / KL_ablated.
      KlDivScore: float
      /// `ce_loss_with_sae`, `ce_loss_without_sae`, `ce_loss_with_ablation`: nats per predicted token.
      CeLossWithSae: float
      CeLossWithoutSae: float
      CeLossWithAblation: float
      /// `kl_div_with_sae`, `kl_div_with_ablation`: KL(clean ‖ ·) per position, nats.
      KlDivWithSae: float
      KlDivWithAblation: float
      /// `dead_fraction` (ours): fraction of features that never fired over the evaluated tokens.
      DeadFraction: float
      /// `tokens` (ours): activation tokens the first group was measured on.
      Tokens: int64 }

/// The keys written, in order (SAELens names, then ours).
let keys =
    [ "l0"; "l1"; "explained_variance"; "mse"; "cossim"; "l2_ratio"; "ce_loss_score"; "kl_div_score"
      "ce_loss_with_sae"; "ce_loss_without_sae"; "ce_loss_with_ablation"; "kl_div_with_sae"; "kl_div_with_ablation"
      "dead_fraction"; "tokens" ]

/// SAELens' nested layout (`run_evals`): the category each key sits under.
let private categories =
    [ "sparsity", [ "l0"; "l1" ]
      "reconstruction_quality", [ "explained_variance"; "mse"; "cossim" ]
      "shrinkage", [ "l2_ratio" ]
      "model_performance_preservation", [ "ce_loss_score"; "ce_loss_with_sae"; "ce_loss_without_sae"; "ce_loss_with_ablation" ]
      "model_behavior_preservation", [ "kl_div_score"; "kl_div_with_sae"; "kl_div_with_ablation" ] ]

/// The SAELens metrics of our evaluation results (either may be missing: its metrics are NaN).
let ofResults (activations: EvalResult option) (spliced: SplicedEval.SplicedMetrics option) : SaeLensMetrics =
    let a f = match activations with Some e -> f e | None -> nan
    let s f = match spliced with Some m -> f m | None -> nan
    { L0 = a (fun e -> e.L0); L1 = a (fun e -> e.L1); ExplainedVariance = a (fun e -> e.VarianceExplained); Mse = a (fun e -> e.Mse)
      Cossim = a (fun e -> e.CosineSimilarity); L2Ratio = a (fun e -> e.L2Ratio)
      CeLossScore = s (fun m -> m.CeRecovered); KlDivScore = s (fun m -> m.KlRecovered)
      CeLossWithSae = s (fun m -> m.CeSpliced); CeLossWithoutSae = s (fun m -> m.CeClean); CeLossWithAblation = s (fun m -> m.CeAblated)
      KlDivWithSae = s (fun m -> m.KlToClean); KlDivWithAblation = s (fun m -> m.KlAblated)
      DeadFraction = a (fun e -> e.DeadFraction)
      Tokens = (match activations with Some e -> e.Tokens | None -> 0L) }

let private values (m: SaeLensMetrics) =
    [ m.L0; m.L1; m.ExplainedVariance; m.Mse; m.Cossim; m.L2Ratio; m.CeLossScore; m.KlDivScore
      m.CeLossWithSae; m.CeLossWithoutSae; m.CeLossWithAblation; m.KlDivWithSae; m.KlDivWithAblation; m.DeadFraction ]

/// The flat JSON object (non-finite values as null, as Python's json would need them).
let toJson (m: SaeLensMetrics) : string =
    let o = JsonObject()
    for k, v in List.zip (List.take 14 keys) (values m) do
        o[k] <- (if Double.IsFinite v then JsonValue.Create v :> JsonNode else null)
    o["tokens"] <- m.Tokens
    o.ToJsonString(JsonSerializerOptions(WriteIndented = true))

/// Reads a metrics object: our flat layout, or SAELens' nested one (keys under their categories). Missing or null
/// keys read as NaN (`tokens` as 0); a value that is not a number is an error naming the key.
let ofJson (source: string) (json: string) : SaeLensMetrics =
    let root =
        match (try JsonNode.Parse json with e -> failwithf "%s: not valid JSON (%s)" source e.Message) with
        | :? JsonObject as o -> o
        | _ -> failwithf "%s: a JSON object was expected" source
    let find (key: string) : JsonNode =
        match root[key] with
        | null ->
            categories
            |> List.tryPick (fun (cat, ks) ->
                match root[cat] with
                | :? JsonObject as c when List.contains key ks -> Option.ofObj c[key]
                | _ -> None)
            |> Option.toObj
        | n -> n
    let num (key: string) =
        match find key with
        | null -> nan
        | n ->
            try n.GetValue<float>()
            with _ -> failwithf "%s: '%s' should be a number (got %s)" source key (n.ToJsonString())
    { L0 = num "l0"; L1 = num "l1"; ExplainedVariance = num "explained_variance"; Mse = num "mse"; Cossim = num "cossim"
      L2Ratio = num "l2_ratio"; CeLossScore = num "ce_loss_score"; KlDivScore = num "kl_div_score"
      CeLossWithSae = num "ce_loss_with_sae"; CeLossWithoutSae = num "ce_loss_without_sae"; CeLossWithAblation = num "ce_loss_with_ablation"
      KlDivWithSae = num "kl_div_with_sae"; KlDivWithAblation = num "kl_div_with_ablation"
      DeadFraction = num "dead_fraction"
      Tokens = (let t = num "tokens" in if Double.IsNaN t then 0L else int64 t) }

/// The file name used next to `eval.json`.
[<Literal>]
let FileName = "metrics.json"

/// Writes `metrics.json` in `folder` (atomically).
let write (folder: string) (m: SaeLensMetrics) =
    Directory.CreateDirectory folder |> ignore
    Transcoders.Files.AtomicFile.writeAllText (Path.Combine(folder, FileName)) (toJson m)

/// Reads a `metrics.json` (a file, or a folder holding one).
let read (path: string) : SaeLensMetrics =
    let file = if Directory.Exists path then Path.Combine(path, FileName) else path
    ofJson file (File.ReadAllText file)
