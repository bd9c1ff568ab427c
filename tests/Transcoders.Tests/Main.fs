module Transcoders.Tests.Main

open System
open Expecto
open Expecto.Impl

let all =
    testList "Transcoders" [
        ElfTests.tests
        SlurmTests.tests
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

/// Runs every synchronous test and property inside a TorchSharp dispose scope that, when the test ends, releases its tensors to
/// the garbage collector again (nothing is disposed that the test did not dispose itself). Why: a TorchSharp tensor
/// is a finalisable wrapper of a native handle, and its methods do not keep `this` alive during the native call, so
/// a temporary receiver such as `torch.tensor(xs)` in `torch.tensor(xs).to_type(…)` can be finalised by a GC on another
/// thread while `to_type` runs — a segmentation fault in `at::_ops::to_dtype::call`, seen about once in 40 parallel
/// runs. A scope references every tensor made in it, so none is finalised before the test is over. The library keeps
/// its own temporaries in scopes for the same reason.
let rec private keepTensorsAlive (t: Test) : Test =
    let inScope (f: unit -> unit) () =
        let scope = TorchSharp.torch.NewDisposeScope()
        try f ()
        finally
            scope.Detach(Seq.toArray scope.DisposablesView)
            scope.Dispose()
    match t with
    | TestCase (Sync f, focus) -> TestCase(Sync (inScope f), focus)
    | TestCase (SyncWithCancel f, focus) -> TestCase(SyncWithCancel (fun ct -> inScope (fun () -> f ct) ()), focus)
    | TestCase (AsyncFsCheck (testConfig, stressConfig, check), focus) ->
        // Expecto.FsCheck runs the property when `check` is called and returns a finished async
        let inScopeCheck config =
            let mutable result = async.Return ()
            inScope (fun () -> result <- check config) ()
            result
        TestCase(AsyncFsCheck(testConfig, stressConfig, inScopeCheck), focus)
    | TestCase _ -> t
    | TestList (tests, focus) -> TestList(List.map keepTensorsAlive tests, focus)
    | TestLabel (label, test, focus) -> TestLabel(label, keepTensorsAlive test, focus)
    | Test.Sequenced (method, test) -> Test.Sequenced(method, keepTensorsAlive test)

[<EntryPoint>]
let main argv =
    Transcoders.Tensors.Device.init ()
    let mutable summary = None
    let printer =
        { TestPrinters.defaultPrinter with
            summary = fun config s ->
                summary <- Some s
                TestPrinters.defaultPrinter.summary config s }
    let code = runTestsWithCLIArgs [ Printer printer; No_Spinner ] argv (keepTensorsAlive all)
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
