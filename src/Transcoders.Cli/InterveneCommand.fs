/// `intervene MODEL --coders DIR --prompt TEXT --feature mlp1tc[12]@5 --set 10`: sets, scales or ablates a transcoder
/// feature and shows what changes: the next-token predictions (free: through the real model; constrained: attention
/// and normalisation frozen, the direct effect), the attribution graph's predicted effect next to both, and
/// optionally a generation with the intervention.
module Transcoders.Cli.InterveneCommand

open System
open Argu
open TorchSharp
open Transcoders.Circuits
open Transcoders.Coders
open Transcoders.Models
open Transcoders.Text

type Args =
    | [<MainCommand; ExactlyOnce>] Model of path: string
    | [<Mandatory>] Coders of folders: string list
    | [<Mandatory>] Prompt of text: string
    | [<Mandatory>] Feature of components: string list
    | Set of value: float
    | Scale of factor: float
    | Ablate
    | From_Position
    | Generate of tokens: int
    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Model _ -> "the model (our folder, a Hugging Face folder or a llama2.c .bin)"
            | Coders _ -> "transcoders or a cross-layer transcoder (coder folders, or folders holding them)"
            | Prompt _ -> "the prompt (BOS first)"
            | Feature _ -> "features in the transcoder paper's names, mlpLtc[F]@P (P may be 'last')"
            | Set _ -> "set the features' activations to this value"
            | Scale _ -> "multiply the features' activations by this factor"
            | Ablate -> "set the features' activations to 0 (the default action)"
            | From_Position -> "apply from the position on, to every later position and generated token (steering)"
            | Generate _ -> "also generate this many tokens greedily, with and without the intervention"

/// Runs the interventions on one prompt and prints the three views side by side.
let intervene (model: Transformer) (tokenizer: Tokenizer) (coders: Coder list) (tokens: int[]) (interventions: FeatureIntervention list)
              (generate: int option) =
    use lr = LocalReplacement.create model coders tokens
    use clean = LocalReplacement.forward lr
    use constrained = Interventions.constrained lr interventions
    use free = Interventions.free model coders tokens interventions
    for iv in interventions do
        let p = match iv.Position with At p | From p -> p
        let a =
            use t = PromptTokens.tensor tokens model.Device
            use acts = FeatureAccess.features model coders (sprintf "M%dN%d" iv.Layer iv.Feature) t
            acts[0L, int64 p].to_type(torch.float64).item<float> ()
        printfn "feature mlp%dtc[%d]@%d on %A: activation %.4f, %A" iv.Layer iv.Feature p (Tokenizer.decode tokenizer [| tokens[p] |]) a iv.Action
    let before = NextToken.probabilities clean
    let show (title: string) (logits: torch.Tensor) =
        printfn "%s" title
        for t, pr in NextToken.top 5 (NextToken.probabilities logits) do
            printfn "  %-28s p = %.4f (was %.4f, %+.4f)" (PromptTokens.display tokenizer t) pr before[t] (pr - before[t])
    printfn "next token, original model:"
    TraceCommand.printTop tokenizer 5 clean
    show "with the intervention, free (through the real model; error terms keep everything else exact):" free
    show "with the intervention, constrained (attention and normalisation frozen: the direct effect):" constrained
    let atOnly = interventions |> List.forall (fun iv -> match iv.Position with At _ -> true | From _ -> false)
    if atOnly then
        let graph = AttributionGraph.build model coders tokens { GraphConfig.Default with MaxFeatureNodes = None }
        let index = Graph.featureIndex graph
        let inGraph = interventions |> List.forall (fun iv -> match iv.Position with At p -> index.ContainsKey { FeatureAt.Layer = iv.Layer; Position = p; Feature = iv.Feature } | From _ -> false)
        if inGraph then
            printfn "change of each explained logit (de-meaned): the graph's prediction, constrained, free"
            for c in Interventions.compareWithGraph lr graph interventions do
                printfn "  %-28s predicted %+9.4f  constrained %+9.4f  free %+9.4f" (PromptTokens.display tokenizer c.Token) c.Predicted c.Constrained c.Free
        else printfn "(a feature that is not active on the prompt is no node of the graph: no graph prediction)"
    match generate with
    | Some n when n > 0 ->
        let options = { Generation.GenerateOptions.Greedy with MaxNewTokens = n }
        let plain = Generation.generate model options tokens
        let steered = Interventions.generate model coders options tokens interventions
        printfn "greedy continuation, original: %s" (Tokenizer.decode tokenizer plain.NewTokens)
        printfn "greedy continuation, with the intervention: %s" (Tokenizer.decode tokenizer steered.NewTokens)
    | _ -> ()

let run (common: Common.Options) (args: ParseResults<Args>) =
    match args.TryGetResult Generate with
    | Some n when n < 0 -> invalidArg "generate" (sprintf "--generate takes a number of tokens (0 or more), got %d" n)
    | _ -> ()
    let modelPath = args.GetResult Model
    let device = Common.device common
    let model, tokenizer, tokens = PromptTokens.loadWith (Common.loadOptions common) modelPath (args.GetResult Prompt) device
    use _m = model
    let coders = CoderFolders.load (args.GetResult Coders) device
    try
        let action =
            match args.TryGetResult Set, args.TryGetResult Scale with
            | Some v, None -> SetTo v
            | None, Some k -> ScaleBy k
            | None, None -> InterventionAction.Ablate
            | Some _, Some _ -> invalidArg "set" "give one of --set, --scale and --ablate"
        let interventions =
            [ for text in args.GetResult Feature ->
                let at = Interventions.parseFeature tokens.Length text
                { Layer = at.Layer; Feature = at.Feature; Position = (if args.Contains From_Position then From at.Position else At at.Position); Action = action } ]
        intervene model tokenizer coders tokens interventions (args.TryGetResult Generate)
        0
    finally
        for c in coders do (c :> IDisposable).Dispose()
