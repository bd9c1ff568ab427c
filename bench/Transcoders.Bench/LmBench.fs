/// The language-model training-step benchmark: our step (Transcoders.Training's Stepper, AdamW, clipping,
/// one dispose scope per step) against the same model and step in PyTorch (bench/pytorch/lm_step.py),
/// interleaved in one run, plus the 1024³ matmul rate of each side and a memory-stability check.
module Transcoders.Bench.LmBench

open System
open System.Diagnostics
open System.IO
open System.Text.Json
open TorchSharp
open TorchSharp.Modules
open Transcoders.Training
open Transcoders.Bench.Gpt
open Transcoders.Bench.Stats

/// Benchmark settings (the defaults are the task's LM config).
type Options =
    { Model: GptConfig
      Batch: int
      Rounds: int
      StepsPerRound: int
      WarmupSteps: int
      Threads: int
      Device: string
      /// One dispose scope per transformer block inside the step's scope (lower peak memory; bench model only).
      BlockScope: bool
      /// Train `Transcoders.Models.Transformer` (true) or the benchmark's own GPT (Gpt.fs).
      Library: bool
      Python: string
      Script: string
      Seed: int64 }
    static member Default =
        { Model = { Layers = 4; DModel = 256; Heads = 8; Context = 256; Vocab = 4096 }
          Batch = 16
          Rounds = 5
          StepsPerRound = 5
          WarmupSteps = 2
          Threads = 2
          Device = "cpu"
          BlockScope = true
          Library = true
          Python = "/usr/bin/python3"
          Script = "bench/pytorch/lm_step.py"
          Seed = 0L }

/// What the benchmark trains: named parameters and the loss of a [batch, context+1] token window.
/// Swapping in `Transcoders.Models` means building this record from the library's model.
type LmUnderTest =
    { Parameters: (string * Parameter) list
      Loss: torch.Tensor -> torch.Tensor
      Dispose: unit -> unit }

/// The benchmark's own GPT (Gpt.fs), written before the library's model existed.
let benchModel (cfg: GptConfig) (blockScope: bool) (device: torch.Device) : LmUnderTest =
    let gpt = new Gpt(cfg, blockScope)
    gpt.``to``(device) |> ignore
    { Parameters = gpt.named_parameters () |> Seq.map (fun struct (n, p) -> n, p) |> List.ofSeq
      Loss = gpt.Loss
      Dispose = gpt.Dispose }

/// The library's transformer (Transcoders.Models) in the same GPT-2 shape.
let libraryModel (cfg: GptConfig) (device: torch.Device) : LmUnderTest =
    let config =
        { Transcoders.Models.TransformerConfig.gpt2 with
            DModel = cfg.DModel; NLayers = cfg.Layers; NHeads = cfg.Heads; NKvHeads = cfg.Heads
            DMlp = 4 * cfg.DModel; NCtx = cfg.Context; VocabSize = cfg.Vocab; Dropout = 0.0 }
    let m = Transcoders.Models.Transformer.Create(config, device)
    { Parameters = [ for struct (n, p) in m.named_parameters () -> n, p ]
      Loss =
        fun window ->
            let t = window.shape[1] - 1L
            let logits = m.forward (window.narrow(1L, 0L, t))
            torch.nn.functional.cross_entropy(logits.reshape(-1L, int64 cfg.Vocab), window.narrow(1L, 1L, t).reshape(-1L))
      Dispose = m.Dispose }

/// The model under test.
let model (o: Options) (device: torch.Device) : LmUnderTest =
    if o.Library then libraryModel o.Model device else benchModel o.Model o.BlockScope device

/// Training FLOPs per token (PaLM's count: 6·N for the matmul parameters incl. the tied LM head,
/// plus 12·L·d·T for attention scores and values).
let flopsPerToken (c: GptConfig) =
    let n = 12.0 * float c.Layers * float c.DModel * float c.DModel + float c.Vocab * float c.DModel
    6.0 * n + 12.0 * float c.Layers * float c.DModel * float c.Context

let private sync (device: torch.Device) =
    if device.``type`` = DeviceType.CUDA then torch.cuda.synchronize device

/// Our side: the library's training step on the model under test.
type Ours(o: Options, device: torch.Device) =
    do torch.manual_seed o.Seed |> ignore
    let lm = model o device
    let window (step: int) =
        use g = new torch.Generator(uint64 (o.Seed * 1_000_003L + int64 step))
        torch.randint(0L, int64 o.Model.Vocab, [| int64 o.Batch; int64 o.Model.Context + 1L |], generator = g).``to``(device)
    let config =
        { Trainer.TrainConfig.Default with
            Steps = Int32.MaxValue
            Schedule = Schedule.Constant 3e-4
            Optimizer = { Beta1 = 0.9; Beta2 = 0.95; Eps = 1e-8; WeightDecay = 0.1 }
            ClipGradNorm = Some 1.0
            OutputDir = Path.GetTempPath()
            Seed = o.Seed
            Progress = Progress.Silent }
    let objective = Trainer.objective lm.Parameters (int64 (o.Batch * o.Model.Context)) (fun i -> lm.Loss(window i))
    let stepper = new Trainer.Stepper(config, objective)
    let mutable next = 0
    member _.TokensPerStep = o.Batch * o.Model.Context
    member _.ParameterCount = lm.Parameters |> List.sumBy (fun (_, p) -> p.numel ())
    /// Runs `steps` updates; returns each one's seconds and the last loss.
    member _.Train(steps: int) =
        let seconds = Array.zeroCreate steps
        let mutable loss = nan
        for i in 0 .. steps - 1 do
            sync device
            let sw = Stopwatch.StartNew()
            let s = stepper.Update next
            sync device
            seconds[i] <- sw.Elapsed.TotalSeconds
            loss <- s.Loss
            next <- next + 1
        seconds, loss
    member _.Matmul(n: int, reps: int) =
        use x = torch.randn([| int64 n; int64 n |], device = device)
        use y = torch.randn([| int64 n; int64 n |], device = device)
        (use z = x.matmul y in z.sum().item<float32>()) |> ignore
        [| for _ in 1 .. reps do
               sync device
               let sw = Stopwatch.StartNew()
               use z = x.matmul y
               sync device
               yield 2.0 * float n ** 3.0 / sw.Elapsed.TotalSeconds / 1e9 |]
    interface IDisposable with
        member _.Dispose() =
            (stepper :> IDisposable).Dispose()
            lm.Dispose()

/// Their side: lm_step.py in server mode, one JSON command per line.
type Theirs(o: Options) =
    let psi =
        ProcessStartInfo(
            o.Python,
            [ o.Script; "--server"; "--threads"; string o.Threads; "--device"; o.Device
              "--layers"; string o.Model.Layers; "--d-model"; string o.Model.DModel; "--heads"; string o.Model.Heads
              "--context"; string o.Model.Context; "--vocab"; string o.Model.Vocab; "--batch"; string o.Batch
              "--seed"; string o.Seed ],
            RedirectStandardInput = true,
            RedirectStandardOutput = true,
            UseShellExecute = false)
    do
        psi.Environment["OMP_WAIT_POLICY"] <- "PASSIVE"
        if not (File.Exists o.Script) then failwithf "cannot find %s (run from the repository root or pass --script)" o.Script
    let proc = Process.Start psi
    let readJson () =
        match proc.StandardOutput.ReadLine() with
        | null -> failwithf "%s exited (code %s) without answering" o.Script (if proc.HasExited then string proc.ExitCode else "?")
        | line -> JsonDocument.Parse(line).RootElement.Clone()
    let hello = readJson ()
    let ask (cmd: string) =
        proc.StandardInput.WriteLine cmd
        proc.StandardInput.Flush()
        readJson ()
    member _.Info = hello
    member _.Train(steps: int) =
        let r = ask (sprintf """{"cmd": "train", "steps": %d}""" steps)
        [| for s in r.GetProperty("seconds").EnumerateArray() -> s.GetDouble() |], r.GetProperty("loss").GetDouble()
    member _.Matmul(n: int, reps: int) =
        let r = ask (sprintf """{"cmd": "matmul", "n": %d, "reps": %d}""" n reps)
        [| for s in r.GetProperty("gflops").EnumerateArray() -> s.GetDouble() |]
    member _.PeakRssMiB = (ask """{"cmd": "memory"}""").GetProperty("peak_rss_mib").GetDouble()
    interface IDisposable with
        member _.Dispose() =
            try
                proc.StandardInput.WriteLine """{"cmd": "quit"}"""
                proc.StandardInput.Flush()
                if not (proc.WaitForExit 10_000) then proc.Kill()
            with _ -> ()
            proc.Dispose()

let private tokensPerSecond (tokensPerStep: int) (seconds: float[]) = float tokensPerStep * float seconds.Length / Array.sum seconds

/// Runs the interleaved comparison and prints the table.
let run (o: Options) =
    let device = Transcoders.Tensors.Device.resolve (Transcoders.Tensors.Device.parse o.Device)
    torch.set_num_threads o.Threads
    let c = o.Model
    printfn "LM training step: %d layers, d_model %d, %d heads, context %d, vocab %d, batch %d; AdamW, clip 1.0; %s, %d threads"
        c.Layers c.DModel c.Heads c.Context c.Vocab o.Batch (string device) o.Threads
    printfn "model: %s; OMP_WAIT_POLICY=%s"
        (if o.Library then "Transcoders.Models.Transformer" else sprintf "the benchmark's GPT (block dispose scopes: %b)" o.BlockScope)
        (Environment.GetEnvironmentVariable "OMP_WAIT_POLICY")
    use ours = new Ours(o, device)
    use theirs = new Theirs(o)
    printfn "PyTorch: %s" (theirs.Info.ToString())
    printfn "parameters: ours %d, PyTorch %d" ours.ParameterCount (theirs.Info.GetProperty("parameters").GetInt64())
    ours.Train o.WarmupSteps |> ignore
    theirs.Train o.WarmupSteps |> ignore
    let mmOurs, mmTheirs = ResizeArray(), ResizeArray()
    let measureMatmul () =
        mmOurs.AddRange(ours.Matmul(1024, 5))
        mmTheirs.AddRange(theirs.Matmul(1024, 5))
    measureMatmul ()
    let tpsOurs, tpsTheirs, ratios = ResizeArray(), ResizeArray(), ResizeArray()
    for r in 1 .. o.Rounds do
        // alternate who goes first, so a drift in machine speed favours neither side
        let runOurs () = let s, l = ours.Train o.StepsPerRound in tokensPerSecond ours.TokensPerStep s, l
        let runTheirs () = let s, l = theirs.Train o.StepsPerRound in tokensPerSecond ours.TokensPerStep s, l
        let (a, la), (b, lb) =
            if r % 2 = 1 then let x = runOurs () in x, runTheirs ()
            else let y = runTheirs () in runOurs (), y
        tpsOurs.Add a; tpsTheirs.Add b; ratios.Add(a / b)
        printfn "round %d: ours %8.0f tok/s (loss %.5f)   PyTorch %8.0f tok/s (loss %.5f)   ratio %.2f" r a la b lb (a / b)
    measureMatmul ()
    let fpt = flopsPerToken c
    let mo, mt = median mmOurs, median mmTheirs
    let to', tt = median tpsOurs, median tpsTheirs
    let peakOurs = peakWorkingSetMiB ()
    let peakTheirs = theirs.PeakRssMiB
    printfn ""
    printfn "| side | tokens/s (median of %d rounds) | step (ms) | model GFLOP/s | matmul 1024³ GFLOP/s | fraction of matmul | peak RSS (MiB) |" o.Rounds
    printfn "|---|---:|---:|---:|---:|---:|---:|"
    let row name tps mm peak =
        printfn "| %s | %.0f | %.0f | %.1f | %.1f | %.2f | %.0f |" name tps (1000.0 * float ours.TokensPerStep / tps) (tps * fpt / 1e9) mm
            (tps * fpt / 1e9 / mm) peak
    row "ours (TorchSharp)" to' mo peakOurs
    row (sprintf "PyTorch %s" (theirs.Info.GetProperty("torch").GetString())) tt mt peakTheirs
    printfn ""
    printfn "ratio ours/PyTorch: %.2f (medians); %.2f (median of paired rounds, min %.2f, max %.2f)"
        (to' / tt) (median ratios) (Seq.min ratios) (Seq.max ratios)
    printfn "FLOPs per token: %.1f M (6N + 12·L·d·T)" (fpt / 1e6)

/// Resident memory after `steps` updates vs after `early` of them: it must not grow (within 10%).
/// Prints the working set every `every` steps (after a full GC, so only native memory and live objects count).
let memoryCheck (o: Options) (steps: int) (early: int) (every: int) =
    let device = Transcoders.Tensors.Device.resolve (Transcoders.Tensors.Device.parse o.Device)
    torch.set_num_threads o.Threads
    use ours = new Ours(o, device)
    printfn "memory check: %d steps of the LM config (%s) on %s; resident memory every %d steps"
        steps (if o.Library then "Transcoders.Models.Transformer" else "bench GPT") (string device) every
    let mutable atEarly = nan
    let sw = Stopwatch.StartNew()
    let mutable doneSteps = 0
    while doneSteps < steps do
        let boundary = if doneSteps < early then min early every else every
        let n = min boundary (steps - doneSteps)
        let _, loss = ours.Train n
        doneSteps <- doneSteps + n
        GC.Collect()
        let ws = workingSetMiB ()
        if doneSteps = early then atEarly <- ws
        printfn "step %5d  loss %.3f  working set %7.1f MiB  (%.0f s)" doneSteps loss ws sw.Elapsed.TotalSeconds
        Console.Out.Flush()
    let atEnd = workingSetMiB ()
    let growth = atEnd / atEarly - 1.0
    printfn "working set after %d steps: %.1f MiB; after %d: %.1f MiB; growth %+.1f%% -> %s" early atEarly steps atEnd (100.0 * growth)
        (if abs growth <= 0.10 then "OK (within 10%)" else "FAIL (more than 10%)")
    if abs growth <= 0.10 then 0 else 1
