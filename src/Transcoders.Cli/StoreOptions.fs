/// The options `train-coder` and `sweep` share: where the text and the activations come from, checkpoints and
/// evaluation. Argu cannot splice one union into another without making it a sub-command, so each command declares
/// these cases under the same names and takes their usage text and their meaning from here, matched by case name.
module Transcoders.Cli.StoreOptions

open Argu
open Microsoft.FSharp.Reflection
open Transcoders.Coders

/// The shared options (a command's Args has a case of the same name and fields for each).
type StoreOption =
    | Cache_Activations of folder: string
    | Tokens of folder: string
    | Ctx of int
    | Buffer_Rows of int64
    | Checkpoint_Every of int
    | No_Resume
    | Eval_Rows of int64
    | Spliced_Rows of int

    member this.Usage =
        match this with
        | Cache_Activations _ -> "cache the model's activations in this folder (written once, reused by later runs)"
        | Tokens _ -> "token shards (a folder with train/ and validation/; default: TinyStories tokenized with the model's tokenizer)"
        | Ctx _ -> "tokens per text row (default 128, at most the model's context)"
        | Buffer_Rows _ -> "shuffle buffer rows (default 64 batches)"
        | Checkpoint_Every _ -> "steps between checkpoints (default 500; 0: only at the end)"
        | No_Resume -> "start over even if the output folder holds a checkpoint"
        | Eval_Rows _ -> "held-out activation rows per coder for L0/FVU (default 32768)"
        | Spliced_Rows _ -> "validation rows spliced for CE/KL (default 128)"

let private cases =
    FSharpType.GetUnionCases typeof<StoreOption> |> Array.map (fun c -> c.Name, c) |> dict

/// The shared option a command's argument stands for, if it is one (matched by case name).
let tryOf (arg: 'A) : StoreOption option =
    let case, fields = FSharpValue.GetUnionFields(arg, typeof<'A>)
    match cases.TryGetValue case.Name with
    | true, c -> Some(FSharpValue.MakeUnion(c, fields) :?> StoreOption)
    | _ -> None

/// The usage text of a command's case that is a shared option.
let usageOf (arg: 'A) : string =
    match tryOf arg with
    | Some o -> o.Usage
    | None -> invalidArg "arg" (sprintf "%A is not a shared store option" arg)

/// `settings` with the shared options given on the command line (the last of each wins).
let apply (args: ParseResults<'A>) (settings: CoderRunSettings) : CoderRunSettings =
    args.GetAllResults()
    |> List.choose tryOf
    |> List.fold (fun s o ->
        match o with
        | Cache_Activations d -> { s with CacheActivations = Some d }
        | Tokens d -> { s with Tokens = Some d }
        | Ctx n -> { s with Ctx = Some n }
        | Buffer_Rows n -> { s with BufferRows = Some n }
        | Checkpoint_Every n -> { s with CheckpointEvery = n }
        | No_Resume -> { s with Resume = false }
        | Eval_Rows n -> { s with EvalRows = n }
        | Spliced_Rows n -> { s with SplicedRows = n }) settings
