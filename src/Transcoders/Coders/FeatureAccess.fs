/// Feature activations by tag, as tinymodel's `lm['M1N123']`: `M{layer}N{feature}` is one feature of the MLP coder
/// (transcoder, skip transcoder or cross-layer transcoder) of a layer, `M{layer}` the whole layer. Runs the original
/// model only as far as the coder's input, then encodes only what was asked for.
module Transcoders.Coders.FeatureAccess

open System
open System.Text.RegularExpressions
open TorchSharp
open Transcoders.Models

type Tensor = torch.Tensor

/// Which coder of a layer a tag names (tinymodel's prefixes).
type FeatureKind =
    /// `M`: the MLP's coder: a transcoder, skip transcoder or cross-layer transcoder reading the layer's MLP input.
    | Mlp
    /// `A`: an SAE on the attention output (`hook_attn_out`, or `attn.hook_z`).
    | Attn
    /// `Mo`: an SAE on the MLP output (`hook_mlp_out`).
    | MlpOut
    /// `Rm`: an SAE on the residual stream before the MLP (`hook_resid_mid`, or the MLP input `ln2.hook_normalized`).
    | ResidMid
    /// `Ra`: an SAE on the residual stream before attention (`hook_resid_pre`, or `ln1.hook_normalized`).
    | ResidPre

/// A parsed tag: a layer's coder, and one feature of it or all of them.
type FeatureTag =
    { Kind: FeatureKind
      Layer: int
      /// None: the whole layer's features.
      Feature: int option }

    /// The canonical text: `M1N123`, `M1`, `Mo2N5`, ...
    override t.ToString() =
        let prefix = match t.Kind with Mlp -> "M" | Attn -> "A" | MlpOut -> "Mo" | ResidMid -> "Rm" | ResidPre -> "Ra"
        match t.Feature with
        | Some f -> sprintf "%s%dN%d" prefix t.Layer f
        | None -> sprintf "%s%d" prefix t.Layer

// tinymodel's grammar: a prefix, the layer, then optionally one non-digit and the feature (M1N123, M1.123, M1_123)
let private grammar = Regex(@"^(Mo|Rm|Ra|M|A)(\d+)(?:(\D)(\d+))?$", RegexOptions.CultureInvariant)

/// Parses a tag, or says what is wrong with it.
let tryParse (tag: string) : Result<FeatureTag, string> =
    if isNull tag then Error "the feature tag is null"
    else
        let m = grammar.Match(tag.Trim())
        if not m.Success then
            Error (sprintf "'%s' is not a feature tag: write M{layer}N{feature} (M1N123, also M1.123 or M1_123), M{layer} for a whole layer, or the prefixes A, Mo, Rm, Ra for SAEs on attn_out, mlp_out, resid_mid, resid_pre" tag)
        else
            let number (g: Group) what =
                match Int32.TryParse(g.Value, Globalization.NumberStyles.None, Globalization.CultureInfo.InvariantCulture) with
                | true, v -> Ok v
                | _ -> Error (sprintf "'%s': the %s %s is too large" tag what g.Value)
            let kind = match m.Groups[1].Value with "M" -> Mlp | "A" -> Attn | "Mo" -> MlpOut | "Rm" -> ResidMid | _ -> ResidPre
            match number m.Groups[2] "layer" with
            | Error e -> Error e
            | Ok layer ->
                if not m.Groups[4].Success then Ok { Kind = kind; Layer = layer; Feature = None }
                else
                    match number m.Groups[4] "feature" with
                    | Ok f -> Ok { Kind = kind; Layer = layer; Feature = Some f }
                    | Error e -> Error e

/// Parses a tag (an ArgumentException saying what is wrong otherwise).
let parse (tag: string) : FeatureTag =
    match tryParse tag with
    | Ok t -> t
    | Error e -> invalidArg "tag" e

let private hooksOf (kind: FeatureKind) (layer: int) : string list =
    match kind with
    | Mlp -> []
    | Attn -> [ HookNames.attnOut layer; HookNames.z layer ]
    | MlpOut -> [ HookNames.mlpOut layer ]
    | ResidMid -> [ HookNames.residMid layer; HookNames.ln2Normalized layer ]
    | ResidPre -> [ HookNames.residPre layer; HookNames.ln1Normalized layer ]

/// The coder a tag names among `coders` and the index of the tag's layer in it, checking the layer against the
/// model and the feature against the coder's width. Errors list what the coders do cover.
let resolve (config: TransformerConfig) (coders: Coder list) (tag: FeatureTag) : Coder * int =
    if tag.Layer >= config.NLayers then
        invalidArg "tag" (sprintf "%O: the model has %d layers (0..%d)" tag config.NLayers (config.NLayers - 1))
    let matches (c: Coder) =
        let cfg = c.Config
        match Array.tryFindIndex ((=) tag.Layer) cfg.Layers with
        | None -> None
        | Some i ->
            let ok =
                match tag.Kind with
                | Mlp -> cfg.Kind <> Sae
                | k -> cfg.Kind = Sae && List.contains cfg.HookIn[i] (hooksOf k tag.Layer)
            if ok then Some (c, i) else None
    let available () =
        let tags =
            [ for c in coders do
                  let cfg = c.Config
                  for i in 0 .. cfg.NLayers - 1 do
                      let l = cfg.Layers[i]
                      if cfg.Kind <> Sae then yield sprintf "M%d" l
                      else
                          match [ Attn; MlpOut; ResidMid; ResidPre ] |> List.tryFind (fun k -> List.contains cfg.HookIn[i] (hooksOf k l)) with
                          | Some k -> yield string { Kind = k; Layer = l; Feature = None }
                          | None -> () ]
        if tags.IsEmpty then "none" else String.concat ", " (List.distinct tags)
    match coders |> List.choose matches with
    | [] -> invalidArg "tag" (sprintf "%O: no coder for it among the %d given (tags available: %s)" tag coders.Length (available ()))
    | [ (c, i) ] ->
        match tag.Feature with
        | Some f when f >= c.Config.DSae ->
            invalidArg "tag" (sprintf "%O: feature %d does not exist; %s has %d features per layer (0..%d)" tag f (Splicing.describe c) c.Config.DSae (c.Config.DSae - 1))
        | _ -> c, i
    | several ->
        invalidArg "tag" (sprintf "%O is ambiguous: %s all cover it; pass only one of them" tag (several |> List.map (fst >> Splicing.describe) |> String.concat " and "))

/// Where the run can stop once `hook` has been computed (None: it needs the whole model).
let private stopAfter (config: TransformerConfig) (hook: string) : int option =
    if hook = HookNames.embed || hook = HookNames.posEmbed then Some 0
    else
        let m = Regex.Match(hook, @"^blocks\.(\d+)\.(.+)$")
        if not m.Success then None
        else
            let l = int m.Groups[1].Value
            if m.Groups[2].Value = "hook_resid_pre" then Some l else Some (min config.NLayers (l + 1))

/// The activations of `features` (all of the layer's when None) of the coder layer a tag resolved to, on the
/// original model: [batch, pos, k] (or [batch, pos, d_sae]). No gradients; the caller owns the result.
let activationsOf (model: Transformer) (coder: Coder) (layerIndex: int) (features: int[] option) (tokens: Tensor) : Tensor =
    let cfg = coder.Config
    Splicing.validate model.Config [ coder ]
    let hook = cfg.HookIn[layerIndex]
    use _ = torch.no_grad ()
    use scope = torch.NewDisposeScope()
    let tokens = if tokens.device_type = model.Device.``type`` then tokens else tokens.``to``(model.Device)
    let r =
        Transformer.run model { RunOptions.Default with Cache = set [ hook ]; StopAtLayer = stopAfter model.Config hook } tokens
    use _ = r
    let x = r[hook]
    let x = x.reshape(x.shape[0], x.shape[1], -1L)
    let a =
        match features with
        | None -> Splicing.encodeLayer coder layerIndex x
        | Some fs -> Splicing.encodeFeatures coder layerIndex fs x
    a.MoveToOuterDisposeScope()

/// Activations of the feature or layer a tag names, on the original model: `"M1N123"` gives [batch, pos], `"M1"`
/// gives [batch, pos, d_sae]. `tokens`: [batch, pos] (or [pos]) token ids.
let features (model: Transformer) (coders: Coder list) (tag: string) (tokens: Tensor) : Tensor =
    let t = parse tag
    let coder, i = resolve model.Config coders t
    match t.Feature with
    | Some f ->
        use a = activationsOf model coder i (Some [| f |]) tokens
        a.squeeze(-1L)
    | None -> activationsOf model coder i None tokens

/// Activations [batch, pos, k] of several features of one layer's coder (`layerTag` as `"M1"`), computing only their
/// encoder columns.
let featureColumns (model: Transformer) (coders: Coder list) (layerTag: string) (indices: int[]) (tokens: Tensor) : Tensor =
    let t = parse layerTag
    if t.Feature.IsSome then invalidArg "layerTag" (sprintf "'%s' names one feature; give the layer (e.g. %O) and the features as indices" layerTag { t with Feature = None })
    if indices.Length = 0 then invalidArg "indices" "no features asked for"
    let coder, i = resolve model.Config coders t
    activationsOf model coder i (Some indices) tokens

/// tinymodel's `lm`: a model with its coders, indexed by feature tag. `lm.["M1N123"] tokens` gives that feature's
/// activations [batch, pos]; `lm.["M1"] tokens` the whole layer's [batch, pos, d_sae]. The model and coders are
/// borrowed; they are checked once here.
type FeatureModel(model: Transformer, coders: Coder list) =
    do
        for c in coders do Splicing.validate model.Config [ c ]

    member _.Model = model
    member _.Coders = coders

    /// The activations of the tagged feature (or layer) on these tokens.
    member _.Item
        with get (tag: string) : Tensor -> Tensor =
            let t = parse tag
            resolve model.Config coders t |> ignore
            fun tokens -> features model coders tag tokens

    /// Several features of one layer (`"M1"`) at once: [batch, pos, k].
    member _.Columns(layerTag: string, indices: int[], tokens: Tensor) = featureColumns model coders layerTag indices tokens
