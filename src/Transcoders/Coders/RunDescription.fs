namespace Transcoders.Coders

open System.IO
open System.Text.Json
open System.Text.Json.Nodes

/// The description of a coder training run saved as `run.json`: a checkpoint resumes only under the same one.
[<RequireQualifiedAccess>]
module RunDescription =
    /// The file of a run's description in its output folder.
    let path (out: string) = Path.Combine(out, "run.json")

    let private json (o: JsonNode) = o.ToJsonString(JsonSerializerOptions(WriteIndented = true))

    let private trainJson (t: TrainConfig) =
        let o = JsonObject()
        o["steps"] <- t.Steps
        o["batch_size"] <- t.BatchSize
        o["lr"] <- t.Lr
        o["betas"] <- JsonArray(JsonValue.Create t.Beta1, JsonValue.Create t.Beta2)
        o["eps"] <- t.Eps
        o["schedule"] <- sprintf "%A" t.Schedule
        o["loss"] <- sprintf "%A" t.Loss
        o["sparsity_warmup_steps"] <- t.SparsityWarmupSteps
        o["dead_after_tokens"] <- t.DeadAfterTokens
        o["resampling"] <- sprintf "%A" t.Resampling
        o["normalise"] <- t.Normalise
        o["normalisation_batches"] <- t.NormalisationBatches
        o["bias_init"] <- sprintf "%A" t.BiasInit
        o["bias_init_batches"] <- t.BiasInitBatches
        o["encoder_init"] <- sprintf "%A" t.EncoderInit
        o["batchtopk_momentum"] <- t.BatchTopKMomentum
        o["seed"] <- t.Seed
        o["log_every"] <- t.LogEvery
        o["density_window_steps"] <- t.DensityWindowSteps
        o

    /// The run description saved as `run.json`: a checkpoint resumes only under the same description.
    let ofRun (store: ActivationStore) (config: JobsConfig) (jobs: CoderJob list) =
        let o = JsonObject()
        o["format"] <- "transcoders.coder-run"
        o["version"] <- 1
        let src = JsonObject()
        for KeyValue(k, v) in store.Provenance do src[k] <- v
        o["source"] <- src
        let s = config.Store
        let st = JsonObject()
        st["ctx"] <- s.Ctx
        st["pass_rows"] <- s.PassRows
        st["buffer_rows"] <- s.Buffer.Rows
        st["batch_size"] <- s.Buffer.BatchSize
        st["mix"] <- s.Buffer.Mix
        st["buffer_seed"] <- s.Buffer.Seed
        st["storage_dtype"] <- string s.Buffer.StorageDType
        st["cache"] <- (match config.Cache with Some c -> Path.GetFullPath c.Dir | None -> "")
        o["store"] <- st
        let arr = JsonArray()
        for j in jobs do
            let e = JsonObject()
            e["name"] <- j.Name
            e["coder"] <- CoderConfig.toJsonNode j.Coder
            e["train"] <- trainJson j.Train
            arr.Add e
        o["coders"] <- arr
        json o
