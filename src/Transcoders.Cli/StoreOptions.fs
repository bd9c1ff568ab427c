/// The options `train-coder` and `sweep` share: where the text and the activations come from, checkpoints and
/// evaluation. Argu cannot splice one union into another without making it a sub-command, so each command declares
/// these cases (`Cache_Activations of folder: string`, `Tokens of folder: string`, `Ctx of int`, `Buffer_Rows of int64`,
/// `Checkpoint_Every of int`, `No_Resume`, `Eval_Rows of int64`, `Spliced_Rows of int`) and takes their usage text and
/// their meaning from here, by case name.
module Transcoders.Cli.StoreOptions

open Argu
open Microsoft.FSharp.Reflection
open Transcoders.Coders

/// Usage text and meaning (the settings with the option's fields applied) of each shared option, by case name.
let private options : Map<string, string * (obj[] -> CoderRunSettings -> CoderRunSettings)> =
    Map [
        "Cache_Activations", ("cache the model's activations in this folder (written once, reused by later runs)",
                              fun f s -> { s with CacheActivations = Some(f[0] :?> string) })
        "Tokens", ("token shards (a folder with train/ and validation/; default: TinyStories tokenized with the model's tokenizer)",
                   fun f s -> { s with Tokens = Some(f[0] :?> string) })
        "Ctx", ("tokens per text row (default 128, at most the model's context)", fun f s -> { s with Ctx = Some(f[0] :?> int) })
        "Buffer_Rows", ("shuffle buffer rows (default 64 batches)", fun f s -> { s with BufferRows = Some(f[0] :?> int64) })
        "Checkpoint_Every", ("steps between checkpoints (default 500; 0: only at the end)", fun f s -> { s with CheckpointEvery = f[0] :?> int })
        "No_Resume", ("start over even if the output folder holds a checkpoint", fun _ s -> { s with Resume = false })
        "Eval_Rows", ("held-out activation rows per coder for L0/FVU (default 32768)", fun f s -> { s with EvalRows = f[0] :?> int64 })
        "Spliced_Rows", ("validation rows spliced for CE/KL (default 128)", fun f s -> { s with SplicedRows = f[0] :?> int }) ]

let private lookup (arg: 'A) =
    let case, fields = FSharpValue.GetUnionFields(arg, typeof<'A>)
    options.TryFind case.Name |> Option.map (fun o -> o, fields)

/// The usage text of a command's case that is a shared option.
let usageOf (arg: 'A) : string =
    match lookup arg with
    | Some((usage, _), _) -> usage
    | None -> invalidArg "arg" (sprintf "%A is not a shared store option" arg)

/// `settings` with the shared options given on the command line (the last of each wins).
let apply (args: ParseResults<'A>) (settings: CoderRunSettings) : CoderRunSettings =
    args.GetAllResults()
    |> List.fold (fun s a -> match lookup a with Some((_, set), fields) -> set fields s | None -> s) settings
