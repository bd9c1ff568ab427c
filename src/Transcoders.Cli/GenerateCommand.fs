/// `generate PATH`: text from a checkpoint, greedy or sampled, with a KV cache.
module Transcoders.Cli.GenerateCommand

open Argu
open Transcoders.Models
open Transcoders.Text

type Args =
    | [<MainCommand; ExactlyOnce>] Model of path: string
    | Prompt of text: string
    | Max_New_Tokens of int
    | Temperature of float
    | Top_K of int
    | Seed of int64
    | Samples of int
    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Model _ -> "the checkpoint (our folder, Hugging Face folder, or llama2.c .bin)"
            | Prompt _ -> "text to continue (default: start from BOS)"
            | Max_New_Tokens _ -> "tokens to generate (default 200)"
            | Temperature _ -> "0 for greedy (default), > 0 to sample"
            | Top_K _ -> "sample among the k most likely tokens"
            | Seed _ -> "sampling seed (default 0)"
            | Samples _ -> "how many continuations (default 1)"

let run (common: Common.Options) (args: ParseResults<Args>) =
    let path = args.GetResult Model
    let device = Common.device common
    let tokenizer = ModelTokenizer.find path
    let model, _ = ModelFiles.loadWith (Common.loadOptions common) path device
    use _m = model
    let prompt =
        match args.TryGetResult Prompt with
        | Some text -> Tokenizer.encodeDocument tokenizer true false text
        | None -> Tokenizer.bos tokenizer |> Option.toArray
    if prompt.Length = 0 then failwith "the tokenizer has no BOS token: give --prompt"
    let baseSeed = args.GetResult(Seed, 0L)
    for i in 0 .. args.GetResult(Samples, 1) - 1 do
        let options =
            { Generation.GenerateOptions.Greedy with
                MaxNewTokens = args.GetResult(Max_New_Tokens, 200)
                Temperature = args.GetResult(Temperature, 0.0)
                TopK = args.TryGetResult Top_K
                Seed = Some(baseSeed + int64 i)
                StopTokens = Tokenizer.eos tokenizer |> Option.toList |> Set.ofList }
        let g = Generation.generate model options prompt
        printfn "%s" (Tokenizer.decode tokenizer g.Tokens)
        printfn "  [%d new tokens, %A]" g.NewTokens.Length g.Stop
    0
