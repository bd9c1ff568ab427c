module Transcoders.Tests.Main

open Expecto
open Expecto.Impl

let all =
    testList "Transcoders" [
        ElfTests.tests
        TorchTests.tests
        SafetensorsTests.tests
        TrainingTests.tests
    ]

[<EntryPoint>]
let main argv =
    Transcoders.Tensors.Device.init ()
    let mutable summary = None
    let printer =
        { TestPrinters.defaultPrinter with
            summary = fun config s ->
                summary <- Some s
                TestPrinters.defaultPrinter.summary config s }
    let code = runTestsWithCLIArgs [ Printer printer; No_Spinner ] argv all
    match summary with
    | Some s ->
        // Expecto's own summary carries colour codes; CI reads this plain line, which must come last.
        printfn "\n%d passed, %d failed, %d skipped" s.passed.Length (s.failed.Length + s.errored.Length) s.ignored.Length
    | None -> printfn "\n0 passed, 0 failed, 0 skipped"
    code
