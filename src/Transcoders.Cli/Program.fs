module Transcoders.Cli.Program

open Argu

type Args =
    | [<CliPrefix(CliPrefix.None)>] Version
    interface IArgParserTemplate with
        member this.Usage =
            match this with
            | Version -> "print the version"

[<EntryPoint>]
let main argv =
    let parser = ArgumentParser.Create<Args>(programName = "transcoders")
    try
        let r = parser.ParseCommandLine argv
        printfn "transcoders %s" (typeof<Args>.Assembly.GetName().Version.ToString())
        0
    with :? ArguParseException as e ->
        eprintfn "%s" e.Message
        2
