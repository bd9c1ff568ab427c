/// `inspect PATH`: a checkpoint's configuration and parameter count, without reading its weights.
module Transcoders.Cli.InspectCommand

open Argu
open Transcoders.Models

type Args =
    | [<MainCommand; ExactlyOnce>] Path of path: string
    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Path _ -> "a checkpoint: our model folder, a Hugging Face folder (config.json + safetensors) or a llama2.c .bin"

let run (_: Common.Options) (args: ParseResults<Args>) =
    let info = ModelFiles.inspect (args.GetResult Path)
    let c = info.Config
    printfn "%s" info.Path
    Output.table [
        "kind", sprintf "%A" info.Kind
        "parameters", Output.count info.ParameterCount
        "layers", string c.NLayers
        "d_model", string c.DModel
        "heads (kv)", sprintf "%d (%d), d_head %d" c.NHeads c.NKvHeads (TransformerConfig.dHead c)
        "d_mlp", string c.DMlp
        "context", string c.NCtx
        "vocabulary", string c.VocabSize
        "normalisation", sprintf "%A (eps %g)%s" c.Norm c.NormEps (if c.FinalNorm then ", final norm" else "")
        "positions", sprintf "%A" c.Positions
        "mlp", sprintf "%A" c.Mlp
        "unembedding", (if c.TiedUnembed then "tied to the embedding" else "separate")
        "tokenizer", (match ModelTokenizer.tryFind info.Path with
                      | Some t -> Transcoders.Text.Tokenizer.describe t
                      | None -> "none recorded")
        "training", (match info.Training with Some j -> j.GetRawText() | None -> "-") ]
    0
