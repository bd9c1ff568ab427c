/// Components of a prompt's computation as plain data, with the transcoder paper's display names (Dunefsky et al.,
/// `transcoder_circuits`): a transcoder feature `mlp8tc[89]@9` (layer 8, feature 89, token position 9), an attention
/// head read at a source position `attn2[2]@8` (layer 2, head 2, source 8; the destination is the position of the node
/// it feeds), the token embedding `embed@3`, the learned position embedding `pos@3`, error terms `tc_error4@7`,
/// `bias_error4@7`, `prune_error4@7`, and the roots `logit[464]@9` (a logit) and `logit[464-318]@9` (a logit difference).
namespace Transcoders.Circuits

open System
open System.Globalization
open System.Text.RegularExpressions

/// The error terms of the transcoder paper's graphs.
type ErrorKind =
    /// What the transcoder of a layer misses of its MLP's output there (mlp_out − TC(x)); the whole MLP output for a
    /// layer without a transcoder.
    | TranscoderError
    /// The constant part of a node: encoder bias (b_enc − b_in·w_enc), the norm's bias read by the node, value biases,
    /// and the output biases (b_O, b_dec) of the sublayers feeding it.
    | BiasError
    /// What the kept children of a graph node do not explain: the node's value minus its kept edges and other errors.
    | PruneError

/// Where a transcoder feature fires: the model layer whose MLP input it reads, the token position, and its index within
/// that layer's coder. The one order of a feature's coordinates in the library (layer, position, feature).
type FeatureAt =
    { Layer: int
      Position: int
      Feature: int }

/// One component of the computation on one prompt.
[<StructuredFormatDisplay("{Display}")>]
type Component =
    /// A feature of the transcoder reading a layer's MLP input, at a token position: `mlp3tc[12]@5` (layer 3,
    /// feature 12, position 5).
    | TranscoderFeature of FeatureAt
    /// Head `head` of layer `layer`'s attention, reading source position `source` (through its OV circuit, weighted by
    /// the attention pattern): `attn1[0]@2`.
    | AttentionHead of layer: int * head: int * source: int
    /// The token embedding of the token at `position`: `embed@2`.
    | Embedding of position: int
    /// The learned position embedding of `position` (models with learned positions): `pos@2`.
    | PositionEmbedding of position: int
    /// An error term at (layer, position): `tc_error3@5`, `bias_error3@5`, `prune_error3@5`.
    | ErrorTerm of kind: ErrorKind * layer: int * position: int
    /// The logit of `token` at `position` (a root): `logit[17]@5`.
    | TokenLogit of token: int * position: int
    /// The logit of `token` minus that of `other` at `position` (a root): `logit[17-4]@5`.
    | LogitDifference of token: int * other: int * position: int

    /// The paper's display name.
    member c.Display =
        let i (n: int) = n.ToString(CultureInfo.InvariantCulture)
        match c with
        | TranscoderFeature f -> "mlp" + i f.Layer + "tc[" + i f.Feature + "]@" + i f.Position
        | AttentionHead (l, h, s) -> "attn" + i l + "[" + i h + "]@" + i s
        | Embedding p -> "embed@" + i p
        | PositionEmbedding p -> "pos@" + i p
        | ErrorTerm (k, l, p) ->
            let name = match k with TranscoderError -> "tc_error" | BiasError -> "bias_error" | PruneError -> "prune_error"
            name + i l + "@" + i p
        | TokenLogit (t, p) -> "logit[" + i t + "]@" + i p
        | LogitDifference (t, o, p) -> "logit[" + i t + "-" + i o + "]@" + i p

    override c.ToString() = c.Display

/// The kinds of components, for filters.
type ComponentKind =
    | FeatureComponent
    | HeadComponent
    | EmbeddingComponent
    | PositionComponent
    | ErrorComponent
    | LogitComponent

/// Functions over components.
[<RequireQualifiedAccess>]
module Component =

    /// The token position a component sits at (the source position of a head).
    let position (c: Component) =
        match c with
        | TranscoderFeature { Position = p } | AttentionHead (_, _, p) | Embedding p | PositionEmbedding p
        | ErrorTerm (_, _, p) | TokenLogit (_, p) | LogitDifference (_, _, p) -> p

    /// The layer of a component: the embeddings are layer 0; logits are layer `nLayers`, given as None here.
    let layer (c: Component) : int option =
        match c with
        | TranscoderFeature { Layer = l } | AttentionHead (l, _, _) | ErrorTerm (_, l, _) -> Some l
        | Embedding _ | PositionEmbedding _ -> Some 0
        | TokenLogit _ | LogitDifference _ -> None

    /// The kind of a component (for filters).
    let kind (c: Component) : ComponentKind =
        match c with
        | TranscoderFeature _ -> FeatureComponent
        | AttentionHead _ -> HeadComponent
        | Embedding _ -> EmbeddingComponent
        | PositionEmbedding _ -> PositionComponent
        | ErrorTerm _ -> ErrorComponent
        | TokenLogit _ | LogitDifference _ -> LogitComponent

    /// Whether nothing feeds this component in the analysis (embeddings and error terms).
    let isLeaf (c: Component) =
        match c with
        | Embedding _ | PositionEmbedding _ | ErrorTerm _ -> true
        | _ -> false

    /// The display name (`mlp8tc[89]@9`, ...).
    let display (c: Component) = c.Display

    let private grammar =
        Regex(@"^(?:mlp(?<l>\d+)tc\[(?<f>\d+)\]|attn(?<l>\d+)\[(?<h>\d+)\]|(?<e>embed)0?|(?<pos>pos)|(?<err>tc_error|bias_error|prune_error)(?<l>\d+)|logit\[(?<t>\d+)(?:-(?<o>\d+))?\])@(?<p>\d+)$",
              RegexOptions.CultureInvariant ||| RegexOptions.ExplicitCapture)

    /// Parses a display name (also the paper's `embed0@3`), or says what is wrong with it.
    let tryParse (text: string) : Result<Component, string> =
        if isNull text then Error "the component name is null"
        else
            let m = grammar.Match(text.Trim())
            if not m.Success then
                Error (sprintf "'%s' is not a component name: expected mlp{layer}tc[{feature}]@{pos}, attn{layer}[{head}]@{source}, embed@{pos}, pos@{pos}, tc_error{layer}@{pos}, bias_error{layer}@{pos}, prune_error{layer}@{pos}, logit[{token}]@{pos} or logit[{token}-{other}]@{pos}" text)
            else
                let fits (g: string) = fst (Int32.TryParse(m.Groups[g].Value, NumberStyles.None, CultureInfo.InvariantCulture))
                match [ "l"; "f"; "h"; "t"; "o"; "p" ] |> List.tryFind (fun g -> m.Groups[g].Success && not (fits g)) with
                | Some g -> Error (sprintf "'%s': the number %s is too large" text m.Groups[g].Value)
                | None ->
                    let n (g: string) = Int32.Parse(m.Groups[g].Value, CultureInfo.InvariantCulture)
                    let p = n "p"
                    if m.Groups["f"].Success then Ok (TranscoderFeature { FeatureAt.Layer = n "l"; Position = p; Feature = n "f" })
                    elif m.Groups["h"].Success then Ok (AttentionHead (n "l", n "h", p))
                    elif m.Groups["e"].Success then Ok (Embedding p)
                    elif m.Groups["pos"].Success then Ok (PositionEmbedding p)
                    elif m.Groups["err"].Success then
                        let kind =
                            match m.Groups["err"].Value with
                            | "tc_error" -> TranscoderError
                            | "bias_error" -> BiasError
                            | _ -> PruneError
                        Ok (ErrorTerm (kind, n "l", p))
                    elif m.Groups["o"].Success then Ok (LogitDifference (n "t", n "o", p))
                    else Ok (TokenLogit (n "t", p))

    /// Parses a display name (an ArgumentException saying what is wrong otherwise).
    let parse (text: string) : Component =
        match tryParse text with
        | Ok c -> c
        | Error e -> invalidArg "text" e

/// Which block structures the circuit analyses handle.
[<RequireQualifiedAccess>]
module BlockOrder =
    /// An ArgumentException for a model with a parallel residual (GPT-NeoX / Pythia): path finding and attribution
    /// graphs linearise each block as resid_mid = x + attn(ln1 x) followed by mlp(ln2 resid_mid), so the MLP (and its
    /// transcoder) would be credited with reading the same layer's attention output, which in such a model it never sees.
    let requireSequential (analysis: string) (config: Transcoders.Models.TransformerConfig) =
        if config.ParallelResidual then
            invalidArg "model" (sprintf "%s needs blocks of the sequential kind (x + attn(ln1 x), then + mlp(ln2 ·)); this model has a parallel residual (GPT-NeoX's use_parallel_residual: the MLP reads ln2 of the block's input), which the linearised analysis does not model. Splicing coders, training and evaluating them, and hooked interventions work on it" analysis)

/// Where a feature vector lives on the residual stream of one position.
type Stream =
    /// The stream entering layer `layer`'s attention (`blocks.{layer}.hook_resid_pre`); layer n_layers is the stream
    /// after the last block (what the final norm and unembedding read).
    | ResidPre of layer: int
    /// The stream entering layer `layer`'s MLP (`blocks.{layer}.hook_resid_mid`), which its transcoder reads.
    | ResidMid of layer: int

/// A feature vector (the paper's `FeatureVector`): a direction on the residual stream at one position such that the
/// node's value is `Vector · stream + Bias` on this prompt (norms linearised by their per-token scale), carrying the
/// product of the connections along the path from the root, so that `Contribution` is the attribution of this node
/// to the root along that path.
type FeatureVector =
    { /// The node this vector belongs to.
      Component: Component
      /// Where the vector is read.
      Stream: Stream
      /// The token position it is read at.
      Position: int
      /// The direction [d_model] (float64).
      Vector: float[]
      /// The constant part of the node's value along this path: Value = Vector · stream + Bias.
      Bias: float
      /// The node's attribution to the root along its path (the root's own value for a root).
      Contribution: float }

/// A path from a root back towards the embeddings: nodes root first, each with its attribution to the root along the
/// path (the last node's is the path's attribution).
type ComputationalPath =
    { Nodes: FeatureVector list }

    /// The path's attribution: its last node's.
    member p.Attribution = (List.last p.Nodes).Contribution
    /// The last node.
    member p.Last = List.last p.Nodes
    /// `mlp3tc[12]@5 <- attn1[0]@2 <- embed@2`.
    member p.Display = p.Nodes |> List.map (fun n -> n.Component.Display) |> String.concat " <- "
    override p.ToString() = p.Display
