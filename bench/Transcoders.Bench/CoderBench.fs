/// The coder training-step benchmark: the library's transcoder step (`CoderTraining.step`: forward, loss, backward,
/// decoder-gradient projection, Adam, renormalisation, firing statistics, one host sync for the logged values)
/// against the same step in PyTorch (bench/pytorch/coder_step.py), interleaved in one run; plus a memory check.
module Transcoders.Bench.CoderBench

open System
open System.Diagnostics
open System.IO
open System.Text.Json
open TorchSharp
open Transcoders.Coders
open Transcoders.Bench.Stats

/// One benchmarked variant: the activation and how the step computes.
type Case =
    { /// relu | topk | batchtopk | jumprelu | groupmax
      Activation: string
      SparseDecode: bool }
    member c.Name = c.Activation + (if c.SparseDecode then "+sparse" else "")
    static member Parse(s: string) =
        let parts = s.Split('+')
        if parts.Length > 2 || (parts.Length = 2 && parts[1] <> "sparse") then failwithf "case '%s': expected ACT or ACT+sparse" s
        if not (List.contains parts[0] [ "relu"; "topk"; "batchtopk"; "jumprelu"; "groupmax" ]) then
            failwithf "case '%s': activation must be relu, topk, batchtopk, jumprelu or groupmax" s
        if parts.Length = 2 && not (List.contains parts[0] [ "topk"; "groupmax" ]) then failwithf "case '%s': sparse decoding needs topk or groupmax" s
        { Activation = parts[0]; SparseDecode = parts.Length = 2 }

/// Benchmark settings (defaults: the issue's CPU config).
type Options =
    { DModel: int
      Widths: int list
      K: int
      Batch: int
      Cases: Case list
      /// L1 coefficient of the ReLU case (loss = MSE + λ·L1).
      Lambda: float
      /// fp32 | bf16 | fp16: dtype of the matrix products (parameters and Adam stay float32 on both sides).
      Dtype: string
      Rounds: int
      StepsPerRound: int
      WarmupSteps: int
      Threads: int
      Device: string
      /// Also time forward + loss + backward alone (what the reference figures of anchors.md §4 measure).
      ForwardBackward: bool
      MatmulN: int
      /// glibc: keep freed large blocks for reuse on both sides (`Malloc.retainFreedMemory`; env vars for PyTorch).
      RetainMemory: bool
      /// coder-memory: malloc_trim before each working-set sample.
      TrimBeforeSample: bool
      Python: string
      Script: string
      Seed: int64 }
    static member Default =
        { DModel = 256; Widths = [ 8192 ]; K = 32; Batch = 4096
          Cases = [ Case.Parse "relu"; Case.Parse "topk"; Case.Parse "topk+sparse" ]
          Lambda = 1e-3; Dtype = "fp32"; Rounds = 5; StepsPerRound = 3; WarmupSteps = 2; Threads = 2
          Device = "cpu"; ForwardBackward = false; MatmulN = 1024; RetainMemory = true; TrimBeforeSample = true
          Python = "/usr/bin/python3"; Script = "bench/pytorch/coder_step.py"; Seed = 0L }

let scalarType (dtype: string) =
    match dtype with
    | "fp32" | "float32" -> torch.float32
    | "bf16" | "bfloat16" -> torch.bfloat16
    | "fp16" | "float16" -> torch.float16
    | s -> failwithf "unknown dtype '%s' (fp32, bf16 or fp16)" s

let private sync (device: torch.Device) =
    if device.``type`` = DeviceType.CUDA then torch.cuda.synchronize device

/// Matrix-product FLOPs of one step as each side computes it. PyTorch (autograd): encoder 6·B·d·F (forward, ∂W, ∂x
/// for the input bias), decoder 6·B·F·d, or 6·B·k·d with sparse decoding. Ours: the encoder's backward skips the
/// ∂x product (4·B·d·F + 2·d·F), and with sparse decoding it is sparse too (2·B·d·F + 2·B·k·d + 2·d·F).
let stepFlops (o: Options) (width: int) (c: Case) (ours: bool) =
    let b, d, f, k = float o.Batch, float o.DModel, float width, float o.K
    let decoder = if c.SparseDecode then 6.0 * b * k * d else 6.0 * b * f * d
    let encoder =
        if not ours then 6.0 * b * d * f
        elif c.SparseDecode then 2.0 * b * d * f + 2.0 * b * k * d + 2.0 * d * f
        else 4.0 * b * d * f + 2.0 * d * f
    encoder + decoder

/// The library's configuration for a case: a transcoder (input bias, unit-norm decoder), MSE, + λ·L1 for ReLU,
/// + λ·L0 (step function with the rectangle-kernel estimator for θ, Gemma Scope) for JumpReLU.
let configs (o: Options) (width: int) (c: Case) =
    let act =
        match c.Activation with
        | "relu" -> ReLU
        | "topk" -> TopK o.K
        | "batchtopk" -> BatchTopK(float o.K)
        | "jumprelu" -> JumpReLU JumpReLUSpec.Default
        | _ -> GroupMax o.K
    let coder = { CoderConfig.transcoder "bench" 0 o.DModel width with Activation = act }
    let sparsity = match act with ReLU -> L1 false | JumpReLU _ -> L0 | _ -> NoSparsity
    let loss =
        { Reconstruction = Mse; Sparsity = sparsity
          SparsityCoefficient = (if sparsity = NoSparsity then 0.0 else o.Lambda)
          PreActCoefficient = 0.0; PreActDeadOnly = true; Auxiliary = NoAuxiliary }
    let train =
        { TrainConfig.Paper with
            Steps = 1_000_000_000; Lr = 4e-4; Schedule = { WarmupSteps = 0; DecayFraction = 0.0; FinalFraction = 0.0 }
            Loss = loss; DeadAfterTokens = Int64.MaxValue / 2L; Resampling = None; Normalise = false
            BiasInit = Normalisation.ZeroBias; Seed = o.Seed; LogPath = None; DensityWindowSteps = 0
            Compute = { Dtype = scalarType o.Dtype; SparseDecode = c.SparseDecode } }
    coder, train

/// Our side: `CoderTraining.step` on a pool of random batches held on the device.
type Ours(o: Options, width: int, c: Case, device: torch.Device) =
    let coderCfg, trainCfg = configs o width c
    do Transcoders.Tensors.Device.seed o.Seed
    let coder = Coder.create coderCfg device
    let state = CoderTraining.init trainCfg coder
    let pool =
        [| for _ in 1 .. 4 ->
            let x = torch.randn([| int64 o.Batch; int64 o.DModel |], device = device).DetachFromDisposeScope()
            let y = torch.randn([| int64 o.Batch; int64 o.DModel |], device = device).DetachFromDisposeScope()
            x, y |]
    let mutable next = 0
    member _.Train(steps: int) =
        let seconds = Array.zeroCreate steps
        let mutable loss = nan
        for i in 0 .. steps - 1 do
            let x, y = pool[next % pool.Length]
            sync device
            let sw = Stopwatch.StartNew()
            let log = CoderTraining.step state x y
            sync device
            seconds[i] <- sw.Elapsed.TotalSeconds
            loss <- log.Loss
            next <- next + 1
        seconds, loss
    /// Forward, loss and backward only (no update).
    member _.ForwardBackward(steps: int) =
        [| for _ in 1 .. steps ->
            let x, y = pool[next % pool.Length]
            next <- next + 1
            sync device
            let sw = Stopwatch.StartNew()
            (use scope = torch.NewDisposeScope()
             let f = CoderTraining.forwardLoss state x y
             state.Optimizer.ZeroGrad()
             f.Terms.Total.backward()
             SparseActivations.BackwardTensors.release ())
            sync device
            sw.Elapsed.TotalSeconds |]
    /// One step split into its phases (device-synchronised), seconds per phase in order; the same work as `step`.
    member _.Phases() : (string * float)[] =
        let x, y = pool[next % pool.Length]
        next <- next + 1
        let times = ResizeArray<string * float>()
        let sw = Stopwatch()
        let mark (name: string) =
            sync device
            times.Add(name, sw.Elapsed.TotalSeconds)
            sw.Restart()
        use scope = torch.NewDisposeScope()
        sync device
        sw.Start()
        let f = CoderTraining.forwardLoss state x y
        mark "forward + loss"
        let diag = CoderTraining.diagnostics f
        mark "diagnostics (host sync)"
        state.Optimizer.ZeroGrad()
        mark "zero grad"
        f.Terms.Total.backward()
        SparseActivations.BackwardTensors.release ()
        mark "backward"
        CoderTraining.afterBackward state
        mark "decoder-gradient projection"
        state.Optimizer.SetLearningRate 4e-4
        state.Optimizer.Step()
        mark "Adam"
        CoderTraining.afterStep state f (fun _ -> x, y) (fun _ _ -> ()) |> ignore
        mark "renormalise + firing stats"
        ignore diag
        times.ToArray()
    member _.Matmul(n: int, reps: int) =
        let dt = scalarType o.Dtype
        use x = torch.randn([| int64 n; int64 n |], dtype = dt, device = device)
        use y = torch.randn([| int64 n; int64 n |], dtype = dt, device = device)
        (use z = x.matmul y in use s = z.sum() in s.to_type(torch.float32).item<float32>()) |> ignore
        [| for _ in 1 .. reps do
               sync device
               let sw = Stopwatch.StartNew()
               use z = x.matmul y
               sync device
               yield 2.0 * float n ** 3.0 / sw.Elapsed.TotalSeconds / 1e9 |]
    interface IDisposable with
        member _.Dispose() =
            (state :> IDisposable).Dispose()
            (coder :> IDisposable).Dispose()
            for x, y in pool do
                x.Dispose()
                y.Dispose()

/// Their side: coder_step.py in server mode, one JSON command per line.
type Theirs(o: Options, width: int, c: Case) =
    let psi =
        ProcessStartInfo(
            o.Python,
            [ o.Script; "--server"; "--threads"; string o.Threads; "--device"; o.Device; "--d-model"; string o.DModel
              "--width"; string width; "--k"; string o.K; "--batch"; string o.Batch; "--activation"; c.Activation
              "--decode"; (if c.SparseDecode then "sparse" else "dense"); "--lambda"; string o.Lambda
              "--dtype"; o.Dtype; "--seed"; string o.Seed ],
            RedirectStandardInput = true,
            RedirectStandardOutput = true,
            UseShellExecute = false)
    do
        psi.Environment["OMP_WAIT_POLICY"] <- "PASSIVE"
        if o.RetainMemory then
            // the same allocator behaviour as ours (Transcoders.Native.Malloc.retainFreedMemory)
            psi.Environment["MALLOC_MMAP_MAX_"] <- "0"
            psi.Environment["MALLOC_TRIM_THRESHOLD_"] <- string Int32.MaxValue
            psi.Environment["MALLOC_TOP_PAD_"] <- string (64 <<< 20)
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
        let r = readJson ()
        match r.TryGetProperty "error" with
        | true, e -> failwithf "%s: %s" o.Script (e.GetString())
        | _ -> r
    member _.Info = hello
    member _.Train(steps: int) =
        let r = ask (sprintf """{"cmd": "train", "steps": %d}""" steps)
        [| for s in r.GetProperty("seconds").EnumerateArray() -> s.GetDouble() |], r.GetProperty("loss").GetDouble()
    member _.ForwardBackward(steps: int) =
        let r = ask (sprintf """{"cmd": "fwdbwd", "steps": %d}""" steps)
        [| for s in r.GetProperty("seconds").EnumerateArray() -> s.GetDouble() |]
    member _.Matmul(n: int, reps: int) =
        let r = ask (sprintf """{"cmd": "matmul", "n": %d, "reps": %d}""" n reps)
        [| for s in r.GetProperty("gflops").EnumerateArray() -> s.GetDouble() |]
    member _.PeakMiB = (ask """{"cmd": "memory"}""").GetProperty("peak_mib").GetDouble()
    interface IDisposable with
        member _.Dispose() =
            try
                proc.StandardInput.WriteLine """{"cmd": "quit"}"""
                proc.StandardInput.Flush()
                if not (proc.WaitForExit 10_000) then proc.Kill()
            with _ -> ()
            proc.Dispose()

/// One table row's numbers.
type private Row =
    { Case: string; Width: int; Side: string; StepMs: float; FwdBwdMs: float; Gflops: float; MatmulGflops: float; PeakMiB: float; Ratio: string }

/// Runs the interleaved comparison of every case at every width and prints the table.
let private setup (o: Options) =
    let retained = o.RetainMemory && Transcoders.Native.Malloc.retainFreedMemory ()
    let device = Transcoders.Tensors.Device.resolve (Transcoders.Tensors.Device.parse o.Device)
    torch.set_num_threads o.Threads
    printfn "glibc large blocks: %s" (if retained then "kept for reuse on both sides (Malloc.retainFreedMemory)" else "default (mmap per block)")
    device

let run (o: Options) =
    let device = setup o
    printfn "coder training step: transcoder d=%d, batch %d, k=%d, widths %A, %s products, Adam, unit-norm decoder; %s, %d threads, OMP_WAIT_POLICY=%s"
        o.DModel o.Batch o.K o.Widths o.Dtype (string device) o.Threads (Environment.GetEnvironmentVariable "OMP_WAIT_POLICY")
    let rows = ResizeArray<Row>()
    let mmOurs, mmTheirs = ResizeArray<float>(), ResizeArray<float>()
    let mutable torchVersion = "?"
    let printHeader () =
        printfn "| case | F | side | step (ms) | tokens/s | fwd+bwd (ms) | step GFLOP | GFLOP/s | matmul %d³ GFLOP/s | fraction of matmul | peak MiB | speed ours/PyTorch |" o.MatmulN
        printfn "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    let printRow (r: Row) =
        let c = o.Cases |> List.find (fun c -> c.Name = r.Case)
        printfn "| %s | %d | %s | %.1f | %.0f | %s | %.1f | %.1f | %.1f | %.2f | %s | %s |" r.Case r.Width r.Side r.StepMs
            (float o.Batch / (r.StepMs / 1000.0)) (if Double.IsNaN r.FwdBwdMs then "–" else sprintf "%.1f" r.FwdBwdMs)
            (stepFlops o r.Width c (r.Side.StartsWith "ours") / 1e9) r.Gflops r.MatmulGflops (r.Gflops / r.MatmulGflops) (if Double.IsNaN r.PeakMiB then "–" else sprintf "%.0f" r.PeakMiB) r.Ratio
    for width in o.Widths do
        for c in o.Cases do
          try
            Console.Out.Flush()
            use ours = new Ours(o, width, c, device)
            use theirs = new Theirs(o, width, c)
            torchVersion <- theirs.Info.GetProperty("torch").GetString()
            printfn "-- %s, F=%d; PyTorch: %s" c.Name width (theirs.Info.ToString())
            ours.Train o.WarmupSteps |> ignore
            theirs.Train o.WarmupSteps |> ignore
            if mmOurs.Count = 0 then
                mmOurs.AddRange(ours.Matmul(o.MatmulN, 5))
                mmTheirs.AddRange(theirs.Matmul(o.MatmulN, 5))
            let msOurs, msTheirs, ratios = ResizeArray(), ResizeArray(), ResizeArray()
            let fbOurs, fbTheirs = ResizeArray(), ResizeArray()
            for r in 1 .. o.Rounds do
                let runOurs () = let s, l = ours.Train o.StepsPerRound in 1000.0 * median s, l
                let runTheirs () = let s, l = theirs.Train o.StepsPerRound in 1000.0 * median s, l
                let (a, la), (b, lb) =
                    if r % 2 = 1 then let x = runOurs () in x, runTheirs ()
                    else let y = runTheirs () in runOurs (), y
                msOurs.Add a; msTheirs.Add b; ratios.Add(b / a)
                if o.ForwardBackward then
                    if r % 2 = 1 then
                        fbOurs.Add(1000.0 * median (ours.ForwardBackward o.StepsPerRound))
                        fbTheirs.Add(1000.0 * median (theirs.ForwardBackward o.StepsPerRound))
                    else
                        fbTheirs.Add(1000.0 * median (theirs.ForwardBackward o.StepsPerRound))
                        fbOurs.Add(1000.0 * median (ours.ForwardBackward o.StepsPerRound))
                printfn "round %d: ours %9.1f ms (loss %.5f)   PyTorch %9.1f ms (loss %.5f)   speed ratio %.2f" r a la b lb (b / a)
                Console.Out.Flush()
            let flops = stepFlops o width c true
            let flopsTheirs = stepFlops o width c false
            let so, st = median msOurs, median msTheirs
            let ratio = sprintf "%.2f (paired: %.2f, %.2f–%.2f)" (st / so) (median ratios) (Seq.min ratios) (Seq.max ratios)
            let peakOurs =
                if device.``type`` = DeviceType.CUDA then nan else peakWorkingSetMiB () // TorchSharp exposes no CUDA allocator statistics
            rows.Add { Case = c.Name; Width = width; Side = "ours (TorchSharp)"; StepMs = so; FwdBwdMs = median fbOurs
                       Gflops = flops / (so / 1000.0) / 1e9; MatmulGflops = median mmOurs; PeakMiB = peakOurs; Ratio = ratio }
            rows.Add { Case = c.Name; Width = width; Side = "PyTorch " + torchVersion; StepMs = st; FwdBwdMs = median fbTheirs
                       Gflops = flopsTheirs / (st / 1000.0) / 1e9; MatmulGflops = median mmTheirs; PeakMiB = theirs.PeakMiB; Ratio = "" }
            // each case's rows as soon as they exist, so that a later failure (e.g. out of memory) loses nothing
            printHeader ()
            for r in rows |> Seq.skip (rows.Count - 2) do printRow r
          with e -> printfn "case %s at F=%d failed: %s" c.Name width (e.Message.Split('\n')[0])
    printfn ""
    printHeader ()
    for r in rows do printRow r
    printfn ""
    printfn "step GFLOP: matrix products as each side computes them (see stepFlops); GFLOP/s = step GFLOP / step time; fraction = that over the side's own matmul rate."
    printfn "Peak MiB: peak resident set of the process so far (CPU; ours accumulates over cases); PyTorch's max allocated (CUDA; TorchSharp has no allocator statistics)."

/// Resident memory of the coder step after `steps` updates vs after the first `early`: must stay within 10%.
let memoryCheck (o: Options) (width: int) (c: Case) (steps: int) (early: int) (every: int) =
    let device = setup o
    use ours = new Ours(o, width, c, device)
    printfn "coder memory check: %d steps of a %s transcoder d=%d F=%d batch %d (%s) on %s; working set every %d steps"
        steps c.Name o.DModel width o.Batch o.Dtype (string device) every
    let mutable atEarly = nan
    let sw = Stopwatch.StartNew()
    let mutable doneSteps = 0
    let mutable peak = 0.0
    let mutable nativeEarly, nativeLast = nan, nan
    while doneSteps < steps do
        let boundary = if doneSteps < early then min early every else every
        let n = min boundary (steps - doneSteps)
        let _, loss = ours.Train n
        doneSteps <- doneSteps + n
        GC.Collect()
        GC.WaitForPendingFinalizers()
        // free chunks left in glibc's per-thread arenas count as resident until trimmed: trim, so that the
        // working set measures what is held, not what the allocator happens to cache
        if o.TrimBeforeSample then Transcoders.Native.Malloc.trim () |> ignore
        let ws = workingSetMiB ()
        let native = Transcoders.Native.Malloc.inUseBytes () |> Option.map (fun b -> float b / 1048576.0)
        let managed = float (GC.GetTotalMemory false) / 1048576.0
        if doneSteps >= early then peak <- max peak ws
        if doneSteps = early then
            atEarly <- ws
            nativeEarly <- defaultArg native nan
        nativeLast <- defaultArg native nan
        printfn "step %5d  loss %.4f  working set %7.1f MiB  malloc in use %7.1f MiB  managed heap %6.1f MiB  (%.0f s)"
            doneSteps loss ws (defaultArg native nan) managed sw.Elapsed.TotalSeconds
        Console.Out.Flush()
    let atEnd = workingSetMiB ()
    let growth = atEnd / atEarly - 1.0
    let peakGrowth = peak / atEarly - 1.0
    let ok = growth <= 0.10 && peakGrowth <= 0.10
    printfn "working set after %d steps: %.1f MiB; after %d: %.1f MiB (%+.1f%%); largest sample from step %d on: %.1f MiB (%+.1f%%); malloc in use %.1f -> %.1f MiB -> %s"
        early atEarly steps atEnd (100.0 * growth) early peak (100.0 * peakGrowth) nativeEarly nativeLast
        (if ok then "OK (no growth beyond 10%)" else "FAIL (grew more than 10%)")
    if ok then 0 else 1

/// Where our step's time goes: median seconds of each phase over `steps` steps, for every case and width.
let profile (o: Options) =
    let device = setup o
    for width in o.Widths do
        for c in o.Cases do
            use ours = new Ours(o, width, c, device)
            for _ in 1 .. o.WarmupSteps do ours.Phases() |> ignore
            let runs = [| for _ in 1 .. o.StepsPerRound -> ours.Phases() |]
            printfn "profile %s F=%d d=%d batch %d %s on %s (median ms of %d steps):" c.Name width o.DModel o.Batch o.Dtype (string device) runs.Length
            let names = runs[0] |> Array.map fst
            let meds = names |> Array.mapi (fun i n -> n, 1000.0 * median [ for r in runs -> snd r[i] ])
            for n, ms in meds do printfn "  %-30s %9.2f" n ms
            printfn "  %-30s %9.2f" "total" (meds |> Array.sumBy snd)
            Console.Out.Flush()
