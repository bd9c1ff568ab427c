namespace Transcoders.Coders

open System
open System.Globalization
open System.IO
open Transcoders.Files

/// One row of a metrics table (NaN where a metric was not computed).
type MetricsRow =
    { Name: string
      Kind: string
      Layers: string
      HookIn: string
      HookOut: string
      Width: int
      Activation: string
      /// TopK / BatchTopK / GroupMax k (NaN otherwise).
      K: float
      /// The sparsity coefficient λ (NaN for TopK coders, which have none).
      Lambda: float
      Tokens: int64
      L0: float
      Fvu: float
      Mse: float
      NormalizedMse: float
      CosineSimilarity: float
      DeadFraction: float
      DenseFraction: float
      CeClean: float
      CeSpliced: float
      CeAblated: float
      CeRecovered: float
      KlToClean: float
      KlRecovered: float
      Top1Agreement: float }

/// Metrics tables (CSV for plots, markdown for reading).
module MetricsTable =
    let private inv (v: float) = if Double.IsNaN v then "" else v.ToString("G6", CultureInfo.InvariantCulture)

    let private csvField (s: string) =
        if s.IndexOfAny([| ','; '"'; '\n' |]) >= 0 then "\"" + s.Replace("\"", "\"\"") + "\"" else s

    /// The activation's name and its k (NaN when it has none).
    let activationOf (c: CoderConfig) =
        match c.Activation with
        | ReLU -> "relu", nan
        | JumpReLU _ -> "jumprelu", nan
        | TopK k -> "topk", float k
        | BatchTopK k -> "batchtopk", k
        | GroupMax k -> "groupmax", float k

    /// The row of a coder result.
    let row (r: CoderResult) : MetricsRow =
        let c = r.Config
        let act, k = activationOf c
        let lambda =
            match c.Activation, r.Train with
            | (TopK _ | BatchTopK _), _ -> nan
            | _, Some t -> t.Loss.SparsityCoefficient
            | _, None -> nan
        let m f = match r.Metrics with Some e -> f e | None -> nan
        let s f = match r.Spliced with Some e -> f e | None -> nan
        { Name = r.Name; Kind = CoderConfig.kindName c.Kind
          Layers = String.Join("-", c.Layers |> Array.map string)
          HookIn = String.Join(";", c.HookIn); HookOut = String.Join(";", c.HookOut)
          Width = c.DSae; Activation = act; K = k; Lambda = lambda
          Tokens = (match r.LastLog with Some l -> l.Tokens | None -> 0L)
          L0 = m (fun e -> e.L0); Fvu = m (fun e -> e.Fvu); Mse = m (fun e -> e.Mse); NormalizedMse = m (fun e -> e.NormalizedMse)
          CosineSimilarity = m (fun e -> e.CosineSimilarity); DeadFraction = m (fun e -> e.DeadFraction)
          DenseFraction = m (fun e -> e.DenseFraction)
          CeClean = s (fun e -> e.CeClean); CeSpliced = s (fun e -> e.CeSpliced); CeAblated = s (fun e -> e.CeAblated)
          CeRecovered = s (fun e -> e.CeRecovered); KlToClean = s (fun e -> e.KlToClean)
          KlRecovered = s (fun e -> e.KlRecovered); Top1Agreement = s (fun e -> e.Top1Agreement) }

    let private columns : (string * (MetricsRow -> string)) list =
        [ "name", (fun r -> r.Name); "kind", (fun r -> r.Kind); "layers", (fun r -> r.Layers)
          "hook_in", (fun r -> r.HookIn); "hook_out", (fun r -> r.HookOut); "width", (fun r -> string r.Width)
          "activation", (fun r -> r.Activation); "k", (fun r -> inv r.K); "lambda", (fun r -> inv r.Lambda)
          "tokens", (fun r -> string r.Tokens); "l0", (fun r -> inv r.L0); "fvu", (fun r -> inv r.Fvu)
          "mse", (fun r -> inv r.Mse); "nmse", (fun r -> inv r.NormalizedMse); "cosine", (fun r -> inv r.CosineSimilarity)
          "dead_fraction", (fun r -> inv r.DeadFraction); "dense_fraction", (fun r -> inv r.DenseFraction)
          "ce_clean", (fun r -> inv r.CeClean); "ce_spliced", (fun r -> inv r.CeSpliced); "ce_ablated", (fun r -> inv r.CeAblated)
          "ce_recovered", (fun r -> inv r.CeRecovered); "kl", (fun r -> inv r.KlToClean); "kl_recovered", (fun r -> inv r.KlRecovered); "top1_agreement", (fun r -> inv r.Top1Agreement) ]

    /// CSV text with a header line (numbers in invariant culture, empty where not computed).
    let csv (rows: MetricsRow list) =
        let lines =
            [ yield String.Join(",", columns |> List.map fst)
              for r in rows -> String.Join(",", columns |> List.map (fun (_, f) -> csvField (f r))) ]
        String.Join("\n", lines) + "\n"

    let private fmt (digits: int) (v: float) = if Double.IsNaN v then "–" else v.ToString("F" + string digits, CultureInfo.InvariantCulture)

    /// A markdown table of the main metrics.
    let markdown (rows: MetricsRow list) =
        let header = [ "coder"; "kind"; "layer"; "width"; "k / λ"; "L0"; "FVU"; "MSE"; "CE clean"; "CE spliced"; "CE ablated"; "CE rec."; "KL"; "top-1"; "dead" ]
        let sparsity (r: MetricsRow) =
            if not (Double.IsNaN r.K) then sprintf "k=%s" (r.K.ToString("G4", CultureInfo.InvariantCulture))
            elif not (Double.IsNaN r.Lambda) then sprintf "λ=%s" (r.Lambda.ToString("G3", CultureInfo.InvariantCulture))
            else "–"
        let cells (r: MetricsRow) =
            [ r.Name; r.Kind; r.Layers; string r.Width; sparsity r; fmt 1 r.L0; fmt 3 r.Fvu; fmt 4 r.Mse
              fmt 4 r.CeClean; fmt 4 r.CeSpliced; fmt 4 r.CeAblated; fmt 3 r.CeRecovered; fmt 4 r.KlToClean
              fmt 3 r.Top1Agreement; fmt 3 r.DeadFraction ]
        let line (xs: string list) = "| " + String.Join(" | ", xs) + " |"
        String.Join("\n", [ yield line header; yield line (header |> List.map (fun _ -> "---")); for r in rows -> line (cells r) ]) + "\n"

    /// Writes `metrics.csv` and `metrics.md` for `results` (plus the joint replacement, when evaluated) into `out`.
    let write (out: string) (results: CoderResult list) (joint: SplicedEval.SplicedMetrics option) =
        Directory.CreateDirectory out |> ignore
        let rows = results |> List.map row
        AtomicFile.writeAllText (Path.Combine(out, "metrics.csv")) (csv rows)
        let jointText =
            match joint with
            | Some j ->
                sprintf "\nEvery transcoder spliced at once (%d tokens): CE clean %.4f, spliced %.4f, ablated %.4f, CE recovered %.3f, KL %.4f, top-1 agreement %.3f\n"
                    j.Tokens j.CeClean j.CeSpliced j.CeAblated j.CeRecovered j.KlToClean j.Top1Agreement
            | None -> ""
        AtomicFile.writeAllText (Path.Combine(out, "metrics.md")) (markdown rows + jointText)
