namespace Transcoders.Views

open System
open System.IO
open System.Text.Json
open System.Text.Json.Nodes
open TorchSharp
open Transcoders.Coders
open Transcoders.Files

/// SAELens' on-disk layout for coders, both directions: a folder with `cfg.json` and `sae_weights.safetensors`.
///
/// Mapping (SAELens 6 `cfg.json` with the pre-6 top-level hook fields also written, so both generations read it):
///   architecture: SAE + ReLU → "standard", SAE + JumpReLU → "jumprelu", SAE + TopK → "topk" (with `k`),
///   transcoder + ReLU → "transcoder", transcoder + JumpReLU → "jumprelu_transcoder", skip transcoder + ReLU →
///   "skip_transcoder". Other combinations (TopK/BatchTopK/GroupMax transcoders, cross-layer transcoders) have no
///   SAELens architecture and are refused with a message saying so.
///   Weights (our keys already are SAELens'): `W_enc` [d_in, d_sae], `b_enc` [d_sae], `W_dec` [d_sae, d_out], `b_dec`
///   [d_out], `threshold` [d_sae] (JumpReLU), `W_skip` [d_out, d_in] (skip transcoders). Activation scales are folded
///   in before export, so `normalize_activations` is "none"; an SAE's input bias is SAELens' `apply_b_dec_to_input`;
///   a transcoder's is folded into `b_enc`, so `apply_b_dec_to_input` is false.
///   Hooks: `hook_name` (and `metadata.hook_name`) is the input hook, `hook_name_out` the output hook of transcoders,
///   `hook_layer` the layer; `model_name` our config's model. Our own `coder.json` is kept under
///   `metadata.transcoders_config` so a round trip restores every field.
/// Importing reads `cfg.json` of SAELens 3–6 (hook fields at the top level or under `metadata`; `log_threshold`
/// accepted for `threshold`) and refuses files that need a scaling factor not stored in the weights.
[<RequireQualifiedAccess>]
module SaeLens =

    let private fail fmt = Printf.kprintf (fun s -> raise (CoderFile.CoderFileError s)) fmt

    /// SAELens' architecture name for a coder configuration, or an explanation of why there is none.
    let architecture (c: CoderConfig) : Result<string, string> =
        match c.Kind, c.Activation with
        | Sae, ReLU -> Ok "standard"
        | Sae, JumpReLU _ -> Ok "jumprelu"
        | Sae, TopK _ -> Ok "topk"
        | Transcoder, ReLU -> Ok "transcoder"
        | Transcoder, JumpReLU _ -> Ok "jumprelu_transcoder"
        | SkipTranscoder, ReLU -> Ok "skip_transcoder"
        | CrossLayerTranscoder, _ -> Error "SAELens has no cross-layer transcoder architecture (export it per layer with circuit-tracer's layout, or keep our format)"
        | k, a -> Error (sprintf "SAELens has no architecture for a %s with %A activation (convert BatchTopK to JumpReLU first; SAELens' transcoders are ReLU or JumpReLU)" (CoderConfig.kindName k) a)

    /// Writes `cfg.json` and `sae_weights.safetensors` into `folder`; returns the folder.
    let export (folder: string) (coder: Coder) : string =
        let arch =
            match architecture coder.Config with
            | Ok a -> a
            | Error e -> fail "SAELens export of %s: %s" (Splicing.describe coder) e
        Directory.CreateDirectory folder |> ignore
        // our own format first (it folds scales and the input bias), then the same tensors under SAELens' names
        let tmp = Path.Combine(folder, ".transcoders-export")
        CoderFile.save tmp coder
        try
            let cfg = CoderFile.loadConfig tmp
            let stPath, _ = CoderFile.paths tmp
            let tensors = Safetensors.load stPath torch.CPU
            try
                let kept = tensors |> List.filter (fun (n, _) -> n <> "batchtopk_threshold")
                Safetensors.save (Path.Combine(folder, "sae_weights.safetensors")) (Map [ "format", "pt" ]) kept
            finally for _, t in tensors do t.Dispose()
            let layer = cfg.Layers[0]
            let o = JsonObject()
            o["architecture"] <- Page.str arch
            o["d_in"] <- Page.int cfg.DIn
            o["d_sae"] <- Page.int cfg.DSae
            if cfg.Kind <> Sae then o["d_out"] <- Page.int cfg.DOut
            o["dtype"] <- Page.str "float32"
            o["device"] <- Page.str "cpu"
            o["apply_b_dec_to_input"] <- Page.bool (cfg.Kind = Sae && cfg.InputBias)
            o["normalize_activations"] <- Page.str "none"
            o["reshape_activations"] <- Page.str "none"
            match cfg.Activation with TopK k -> o["k"] <- Page.int k | _ -> ()
            o["model_name"] <- Page.str cfg.Model
            o["hook_name"] <- Page.str cfg.HookIn[0]
            o["hook_layer"] <- Page.int layer
            o["hook_head_index"] <- null
            if cfg.Kind <> Sae then
                o["hook_name_out"] <- Page.str cfg.HookOut[0]
                o["hook_layer_out"] <- Page.int layer
            o["prepend_bos"] <- Page.bool true
            o["metadata"] <-
                Page.obj [ "model_name", Page.str cfg.Model
                           "hook_name", Page.str cfg.HookIn[0]
                           "hook_head_index", null
                           "prepend_bos", Page.bool true
                           "sae_lens_training_version", null
                           "transcoders_config", JsonNode.Parse(CoderConfig.toJson cfg) ]
            AtomicFile.writeAllText (Path.Combine(folder, "cfg.json")) (o.ToJsonString(JsonSerializerOptions(WriteIndented = true)))
            folder
        finally
            for p in [ fst (CoderFile.paths tmp); snd (CoderFile.paths tmp) ] do
                if File.Exists p then File.Delete p
            if Directory.Exists tmp then Directory.Delete(tmp, true)

    /// Reads a SAELens folder (`cfg.json` + `sae_weights.safetensors`) as a coder on `device`.
    let import (folder: string) (device: torch.Device) : Coder =
        let cfgPath = Path.Combine(folder, "cfg.json")
        let stPath = Path.Combine(folder, "sae_weights.safetensors")
        if not (File.Exists cfgPath) then fail "%s: no cfg.json (a SAELens folder holds cfg.json and sae_weights.safetensors)" folder
        if not (File.Exists stPath) then fail "%s: no sae_weights.safetensors" folder
        let root =
            try JsonNode.Parse(File.ReadAllText cfgPath).AsObject()
            with e -> fail "%s: not a JSON object (%s)" cfgPath e.Message
        let meta = match root["metadata"] with :? JsonObject as m -> m | _ -> JsonObject()
        let tryStr (name: string) =
            let pick (o: JsonObject) = match o[name] with null -> None | v -> (try Some (v.GetValue<string>()) with _ -> None)
            match pick root with Some s -> Some s | None -> pick meta
        let tryInt (name: string) =
            let pick (o: JsonObject) = match o[name] with null -> None | v -> (try Some (v.GetValue<int>()) with _ -> None)
            match pick root with Some s -> Some s | None -> pick meta
        let req (name: string) = match tryInt name with Some v -> v | None -> fail "%s: '%s' is missing" cfgPath name
        let arch = defaultArg (tryStr "architecture") "standard"
        match tryStr "normalize_activations" with
        | None | Some "none" | Some "" -> ()
        | Some n -> fail "%s: normalize_activations '%s' needs a scaling factor that sae_weights.safetensors does not hold; fold it into the weights first" cfgPath n
        let dIn, dSae = req "d_in", req "d_sae"
        let dOut = defaultArg (tryInt "d_out") dIn
        let hookIn = match tryStr "hook_name" with Some h -> h | None -> fail "%s: 'hook_name' is missing" cfgPath
        let layer =
            match tryInt "hook_layer" with
            | Some l -> l
            | None ->
                let m = Text.RegularExpressions.Regex.Match(hookIn, @"^blocks\.(\d+)\.")
                if m.Success then int m.Groups[1].Value else fail "%s: no 'hook_layer' and no layer in hook '%s'" cfgPath hookIn
        let hookOut = defaultArg (tryStr "hook_name_out") hookIn
        let model = defaultArg (tryStr "model_name") ""
        let applyBDec = match root["apply_b_dec_to_input"] with null -> true | v -> (try v.GetValue<bool>() with _ -> true)
        let kind, activation =
            match arch with
            | "standard" | "relu" -> Sae, ReLU
            | "jumprelu" -> Sae, JumpReLU JumpReLUSpec.Default
            | "topk" -> Sae, TopK (req "k")
            | "transcoder" -> Transcoder, ReLU
            | "jumprelu_transcoder" -> Transcoder, JumpReLU JumpReLUSpec.Default
            | "skip_transcoder" -> SkipTranscoder, ReLU
            | a -> fail "%s: architecture '%s' is not one this library reads (standard, jumprelu, topk, transcoder, jumprelu_transcoder, skip_transcoder)" cfgPath a
        if kind <> Sae && applyBDec && root["apply_b_dec_to_input"] <> null && dIn <> dOut then
            fail "%s: apply_b_dec_to_input with d_in %d ≠ d_out %d cannot be applied" cfgPath dIn dOut
        let ours =
            match meta["transcoders_config"] with
            | null -> None
            | n -> (try Some (CoderConfig.ofJson cfgPath (n.ToJsonString())) with _ -> None)
        let baseCfg =
            { Kind = kind; Layers = [| layer |]; HookIn = [| hookIn |]; HookOut = [| hookOut |]
              DIn = dIn; DOut = dOut; DSae = dSae; Activation = activation
              InputBias = (kind = Sae && applyBDec); Decoder = UnitNorm
              Scale = ActivationScale.Ones 1; FoldedScale = None; Model = model }
        let cfg =
            match ours with
            | Some o when o.Kind = kind && o.DIn = dIn && o.DSae = dSae -> { o with Scale = ActivationScale.Ones 1; InputBias = baseCfg.InputBias }
            | _ -> baseCfg
        let cfg = CoderConfig.validate cfg
        use scope = torch.NewDisposeScope()
        let tensors = Safetensors.load stPath device |> dict
        let get (name: string) (shape: int64[]) =
            match tensors.TryGetValue name with
            | true, t ->
                if t.shape <> shape then fail "%s: '%s' has shape %A; cfg.json (d_in %d, d_sae %d, d_out %d) needs %A" stPath name t.shape dIn dSae dOut shape
                t.to_type(torch.float32)
            | _ -> fail "%s: tensor '%s' is missing for architecture '%s'" stPath name arch
        let wEnc = get "W_enc" [| int64 dIn; int64 dSae |]
        let bEnc = get "b_enc" [| int64 dSae |]
        let wDec = get "W_dec" [| int64 dSae; int64 dOut |]
        let bDec = get "b_dec" [| int64 dOut |]
        // SAELens does not promise unit-norm decoder rows: claim them only where they hold, or further training would
        // renormalise the rows and change what the coder computes
        let cfg =
            let deviation = (wDec.square().sum(1L).sqrt() - 1.0).abs().max().item<float32> ()
            if deviation > 1e-3f then { cfg with Decoder = Free } else cfg
        // a transcoder that subtracts b_dec from its input (d_in = d_out): fold it into b_enc, as our files do
        let bEnc =
            if kind <> Sae && applyBDec && root["apply_b_dec_to_input"] <> null then bEnc - bDec.unsqueeze(0).matmul(wEnc).squeeze 0 else bEnc
        let internalTensors =
            [ yield "W_enc", wEnc.unsqueeze 0
              yield "b_enc", bEnc.unsqueeze 0
              match activation with
              | JumpReLU _ ->
                  let logT =
                      match tensors.TryGetValue "threshold", tensors.TryGetValue "log_threshold" with
                      | (true, t), _ -> t.to_type(torch.float32).clamp_min(Scalars.sc 1e-30).log()
                      | _, (true, t) -> t.to_type(torch.float32)
                      | _ -> fail "%s: a JumpReLU coder needs 'threshold'" stPath
                  if logT.shape <> [| int64 dSae |] then fail "%s: 'threshold' has shape %A, expected [%d]" stPath logT.shape dSae
                  yield "log_threshold", logT.unsqueeze 0
              | _ -> ()
              yield "W_dec_0", wDec.unsqueeze 1
              yield "b_dec", bDec.unsqueeze 0
              if kind = SkipTranscoder then yield "W_skip", (get "W_skip" [| int64 dOut; int64 dIn |]).unsqueeze 0 ]
        let coder = Coder.ofTensors cfg device internalTensors
        for KeyValue(_, t) in tensors do t.Dispose()
        coder

    /// SAELens-style `metrics.json` of an evaluation: `l0`, `explained_variance` (1 − FVU), `mse` (mean over tokens of
    /// ‖ŷ − y‖², summed over dimensions), `ce_loss_score` (CE loss recovered), `kl_div_score` (1 − KL(clean‖spliced) /
    /// KL(clean‖ablated)) at the top level and in SAELens' evaluation groups, with the raw values beside them.
    let metricsJson (eval: EvalResult option) (spliced: SplicedEval.SplicedMetrics option) : JsonObject =
        let o = JsonObject()
        let put (name: string) (v: float) = o[name] <- Page.num v
        match eval with
        | Some e ->
            put "l0" e.L0; put "explained_variance" (1.0 - e.Fvu); put "mse" e.Mse; put "fvu" e.Fvu
            put "cossim" e.CosineSimilarity; put "dead_fraction" e.DeadFraction; put "dense_fraction" e.DenseFraction
            o["tokens"] <- Page.int64 e.Tokens
        | None -> ()
        match spliced with
        | Some s ->
            put "ce_loss_score" s.CeRecovered; put "kl_div_score" s.KlRecovered
            put "ce_loss_without_sae" s.CeClean; put "ce_loss_with_sae" s.CeSpliced; put "ce_loss_with_ablation" s.CeAblated
            put "kl_div_with_sae" s.KlToClean; put "kl_div_with_ablation" s.KlAblated
        | None -> ()
        let group (names: string list) = Page.obj [ for n in names do if o.ContainsKey n then yield n, o[n].DeepClone() ]
        o["model_behavior_preservation"] <- group [ "kl_div_score"; "ce_loss_score"; "kl_div_with_sae"; "kl_div_with_ablation" ]
        o["model_performance_preservation"] <- group [ "ce_loss_score"; "ce_loss_with_ablation"; "ce_loss_with_sae"; "ce_loss_without_sae" ]
        o["reconstruction_quality"] <- group [ "explained_variance"; "mse"; "cossim" ]
        o["sparsity"] <- group [ "l0" ]
        o

    /// Writes `metrics.json` into `folder`; returns its path.
    let writeMetrics (folder: string) (eval: EvalResult option) (spliced: SplicedEval.SplicedMetrics option) : string =
        Directory.CreateDirectory folder |> ignore
        let path = Path.Combine(folder, "metrics.json")
        AtomicFile.writeAllText path ((metricsJson eval spliced).ToJsonString(JsonSerializerOptions(WriteIndented = true)))
        path
