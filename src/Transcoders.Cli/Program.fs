module Transcoders.Cli.Program

open System
open Argu

type Command =
    | [<CliPrefix(CliPrefix.None)>] Corpus of ParseResults<CorpusCommand.Args>
    | [<CliPrefix(CliPrefix.None)>] Inspect of ParseResults<InspectCommand.Args>
    | [<CliPrefix(CliPrefix.None)>] Generate of ParseResults<GenerateCommand.Args>
    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Corpus _ -> "tokenize TinyStories into token shards and print corpus statistics"
            | Inspect _ -> "print a checkpoint's configuration and parameter count"
            | Generate _ -> "generate text with a checkpoint"

[<EntryPoint>]
let main argv =
    let parser = ArgumentParser.Create<Command>(programName = "transcoders", errorHandler = ProcessExiter())
    let args = parser.ParseCommandLine argv
    Transcoders.Tensors.Device.init ()
    try
        match args.GetSubCommand() with
        | Corpus a -> CorpusCommand.run a
        | Inspect a -> InspectCommand.run a
        | Generate a -> GenerateCommand.run a
    with e when not (isNull e.Message) && Environment.GetEnvironmentVariable "TRANSCODERS_DEBUG" <> "1" ->
        // Errors from the library name the file, field or shape at fault; a stack trace adds nothing for a user.
        eprintfn "error: %s" e.Message
        1
