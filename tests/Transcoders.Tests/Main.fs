module Transcoders.Tests.Main

open System
open Expecto
open Expecto.Impl

let all =
    testList "Transcoders" [
        ElfTests.tests
        TorchTests.tests
        SafetensorsTests.tests
        SafetensorsTests.pathsTests
        TokenizerTests.tests
        CorpusTests.tests
        BatchesTests.tests
        ModelTests.tests
        ModelFileTests.tests
        GenerationTests.tests
        ActivationTests.tests
        CoderTests.tests
        CoderKernelTests.tests
        ConcurrencyTests.tests
        SpliceTests.tests
        CircuitGraphTests.tests
        CircuitPathTests.tests
        CircuitStoriesTests.tests
        CoderJobTests.tests
        CoderQualityTests.tests
        FacadeTests.tests
        FacadeCircuitTests.tests
        SharedCoreTests.tests
        CliTests.tests
        TrainingTests.tests
        KillTests.tests
        FuzzTests.tests
        ViewsTests.tests
        PaperTests.tests
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
    let passed, failed, skipped =
        match summary with
        | Some s -> s.passed.Length, s.failed.Length + s.errored.Length, s.ignored.Length
        | None -> 0, 0, 0
    // Expecto's own summary carries colour codes; CI reads this plain line, which must come last.
    // Written as one string after Expecto's console output is flushed, so nothing interleaves with it.
    Console.Out.Flush()
    System.Threading.Thread.Sleep 50
    Console.Out.Write(sprintf "\n%d passed, %d failed, %d skipped\n" passed failed skipped)
    Console.Out.Flush()
    code
