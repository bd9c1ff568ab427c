namespace Transcoders.Coders

open System.IO
open System.Text.Json
open System.Text.Json.Nodes
open TorchSharp
open Transcoders.Activations
open Transcoders.Files
open Transcoders.Models
open Transcoders.Training

/// Evaluating trained coders: held-out activation metrics and the spliced model, one JSON file per coder.
[<RequireQualifiedAccess>]
module JobEvaluation =
    let private json (o: JsonNode) = o.ToJsonString(JsonSerializerOptions(WriteIndented = true))

    /// Evaluates named coders on `model`: `CoderEval` metrics on `eval.ActivationRows` held-out rows of the
    /// validation text (taken as `store` takes training rows, unshuffled), and `SplicedEval` on `eval.SplicedRows`
    /// validation rows; with `eval.Joint`, also every transcoder at once. Coders must be on the model's device.
    let evaluate (model: Transformer) (text: ModelText) (store: StoreConfig) (eval: JobEval) (onProgress: JobsProgress -> unit)
                 (coders: (string * Coder) list) : (string * EvalResult option * SplicedEval.SplicedMetrics option) list * SplicedEval.SplicedMetrics option =
        if coders.IsEmpty then [], None
        else
        let spec = { Coders = [ for n, c in coders -> CoderJob.hooksOf n c.Config ] }
        let metrics =
            if eval.ActivationRows <= 0L then coders |> List.map (fun (n, _) -> n, None)
            else
                onProgress (Preparing(sprintf "collecting %d held-out activation rows" eval.ActivationRows))
                let valStore = ActivationStore(model, text.Validation, text.Bos, spec, { store with Rows = Packed; TextSeed = 0L }, text.Name + " (validation)")
                let rows = valStore.Collect eval.ActivationRows
                try
                    let n = Rows.count rows
                    let b = max 1L store.Buffer.BatchSize
                    [ for name, c in coders ->
                        onProgress (Evaluating name)
                        let batches =
                            seq {
                                for start in 0L .. b .. n - 1L do
                                    let part = rows |> Map.map (fun _ t -> t.narrow(0L, start, min b (n - start)))
                                    yield CoderJob.pair c.Config part
                            }
                        use _ = torch.NewDisposeScope()
                        name, Some(CoderEval.evaluate c batches) ]
                finally Rows.dispose rows
        let transcoders =
            coders |> List.map snd |> List.filter (fun c -> c.Config.Kind = Transcoder || c.Config.Kind = SkipTranscoder)
        let jointWanted =
            let outs = transcoders |> List.collect (fun c -> List.ofArray c.Config.HookOut)
            eval.Joint && transcoders.Length > 1 && List.distinct outs = outs
        let spliced =
            if eval.SplicedRows <= 0 then None
            else
                onProgress (Evaluating(sprintf "%d coder(s) spliced into the model" coders.Length))
                let validation = ModelText.validationRows text store.Ctx eval.SplicedRows
                let sets = [ for _, c in coders -> [ c ] ] @ (if jointWanted then [ transcoders ] else [])
                Some(SplicedEval.evaluateMany model sets (ModelText.tokenBatches model.Device eval.SplicedBatch validation))
        let results =
            [ for i, ((name, m), _) in List.indexed (List.zip metrics coders) -> name, m, spliced |> Option.map (fun s -> s[i]) ]
        let joint = if jointWanted then spliced |> Option.map List.last else None
        results, joint

    let evalJson (r: CoderResult) =
        let o = JsonObject()
        o["name"] <- r.Name
        o["coder"] <- CoderConfig.toJsonNode r.Config
        match r.Metrics with
        | Some e ->
            let m = JsonObject()
            m["tokens"] <- e.Tokens
            m["l0"] <- JsonNumbers.node e.L0
            m["l0_per_layer"] <- JsonArray([| for v in e.L0PerLayer -> JsonNumbers.node v |])
            m["mse"] <- JsonNumbers.node e.Mse
            m["normalized_mse"] <- JsonNumbers.node e.NormalizedMse
            m["fvu"] <- JsonNumbers.node e.Fvu
            m["fvu_per_layer"] <- JsonArray([| for v in e.FvuPerLayer -> JsonNumbers.node v |])
            m["variance_explained"] <- JsonNumbers.node e.VarianceExplained
            m["cosine_similarity"] <- JsonNumbers.node e.CosineSimilarity
            m["dead_fraction"] <- JsonNumbers.node e.DeadFraction
            m["dense_fraction"] <- JsonNumbers.node e.DenseFraction
            let h = JsonObject()
            h["edges_log10"] <- JsonArray([| for v in e.Histogram.Edges -> JsonValue.Create v :> JsonNode |])
            h["counts"] <- JsonArray([| for v in e.Histogram.Counts -> JsonValue.Create v :> JsonNode |])
            h["dead"] <- e.Histogram.Dead
            m["density_histogram"] <- h
            o["activations"] <- m
        | None -> ()
        match r.Spliced with
        | Some s ->
            let m = JsonObject()
            m["tokens"] <- s.Tokens
            m["ce_clean"] <- JsonNumbers.node s.CeClean
            m["ce_spliced"] <- JsonNumbers.node s.CeSpliced
            m["ce_ablated"] <- JsonNumbers.node s.CeAblated
            m["ce_recovered"] <- JsonNumbers.node s.CeRecovered
            m["ce_delta"] <- JsonNumbers.node s.CeDelta
            m["kl_to_clean"] <- JsonNumbers.node s.KlToClean
            m["kl_ablated"] <- JsonNumbers.node s.KlAblated
            m["kl_recovered"] <- JsonNumbers.node s.KlRecovered
            m["top1_agreement_ablated"] <- JsonNumbers.node s.Top1AgreementAblated
            m["logit_cosine"] <- JsonNumbers.node s.LogitCosine
            m["top1_agreement"] <- JsonNumbers.node s.Top1Agreement
            o["spliced"] <- m
        | None -> ()
        json o

    /// Writes a coder's evaluation into its folder: `eval.json`, SAELens' metrics files and, with activation
    /// metrics, `feature_frequencies.safetensors`.
    let write (r: CoderResult) =
        AtomicFile.writeAllText (Path.Combine(r.Path, "eval.json")) (evalJson r)
        SaeLensMetrics.write r.Path (SaeLensMetrics.ofResults r.Metrics r.Spliced)
        match r.Metrics with
        | Some e ->
            use flat = torch.tensor(Array.concat e.Frequencies |> Array.map float32)
            use f = flat.reshape(int64 e.Frequencies.Length, int64 r.Config.DSae)
            Safetensors.save (Path.Combine(r.Path, "feature_frequencies.safetensors")) (Map.ofList [ "format", "pt" ]) [ "frequency", f ]
        | None -> ()
