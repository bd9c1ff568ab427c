namespace Transcoders.Coders

open System.Globalization
open Transcoders.Models

/// What to train at one layer of a model (a plan's or a sweep's kinds).
type LayerCoderKind =
    /// A transcoder of the layer's MLP: reads `blocks.{l}.ln2.hook_normalized`, predicts `blocks.{l}.hook_mlp_out`.
    | MlpTranscoder
    /// The same with an affine skip path (Paulo et al.).
    | MlpSkipTranscoder
    /// An SAE on the layer's MLP output, `blocks.{l}.hook_mlp_out`: the transcoder paper's baseline.
    | MlpOutSae
    /// An SAE on another hook of the layer, `blocks.{l}.<suffix>` (e.g. "hook_resid_post").
    | SaeOn of suffix: string

    /// "transcoder", "skip-transcoder", "sae" (on mlp_out) or "sae:<suffix>".
    member k.Name =
        match k with
        | MlpTranscoder -> "transcoder"
        | MlpSkipTranscoder -> "skip-transcoder"
        | MlpOutSae -> "sae"
        | SaeOn s -> "sae:" + s

    /// Parses `Name`'s forms.
    static member Parse(s: string) =
        match s.Trim().ToLowerInvariant() with
        | "transcoder" | "tc" -> MlpTranscoder
        | "skip-transcoder" | "skip_transcoder" | "skiptc" -> MlpSkipTranscoder
        | "sae" | "sae:hook_mlp_out" -> MlpOutSae
        | x when x.StartsWith "sae:" && x.Length > 4 -> SaeOn(s.Trim().Substring 4)
        | _ -> invalidArg "kind" (sprintf "unknown coder kind '%s': expected transcoder, skip-transcoder, sae or sae:<hook suffix>" s)

/// One sparsity setting of a sweep.
type SparsityLevel =
    /// TopK activation keeping k features per token.
    | TopKLevel of k: int
    /// ReLU activation with sparsity coefficient λ (L1 penalty).
    | L1Level of lambda: float

    member l.Name =
        match l with
        | TopKLevel k -> sprintf "k%d" k
        | L1Level lambda -> "l1-" + lambda.ToString("G3", CultureInfo.InvariantCulture)

/// Coders of a kind at a layer.
[<RequireQualifiedAccess>]
module LayerCoder =
    /// The coder configuration of a kind at a layer with a width and a sparsity setting.
    let config (model: string) (dModel: int) (kind: LayerCoderKind) (layer: int) (width: int) (level: SparsityLevel) : CoderConfig =
        let baseConfig =
            match kind with
            | MlpTranscoder -> CoderConfig.transcoder model layer dModel width
            | MlpSkipTranscoder -> CoderConfig.skipTranscoder model layer dModel width
            | MlpOutSae -> CoderConfig.sae model (CoderConfig.mlpOutHook layer) layer dModel width
            | SaeOn suffix -> CoderConfig.sae model (sprintf "blocks.%d.%s" layer suffix) layer dModel width
        let activation =
            match level with
            | TopKLevel k -> TopK k
            | L1Level _ -> ReLU
        CoderConfig.validate { baseConfig with Activation = activation }

    /// The input width of a kind at a layer of `model`: d_model, or for an SAE on another hook that hook's width
    /// (an unknown hook raises an error naming it).
    let inputWidth (model: Transformer) (kind: LayerCoderKind) (layer: int) : int =
        match kind with
        | SaeOn suffix ->
            let hook = sprintf "blocks.%d.%s" layer suffix
            HookNames.resolve model.Config hook |> ignore
            int (ActivationStore.Widths(model, [ hook ])[hook])
        | _ -> model.Config.DModel
