/// Schedules, AdamW, clipping, the training loop, metrics log, checkpoints and exact resume, on tiny
/// models defined here.
module Transcoders.Tests.TrainingTests

open System
open System.IO
open System.Text.Json
open Expecto
open FsCheck
open TorchSharp
open TorchSharp.Modules
open Transcoders.Tensors
open Transcoders.Training
open Transcoders.Training.Schedule
open Transcoders.Tests.Fixtures


// ---------------------------------------------------------------- a tiny learnable problem

/// A two-layer MLP with dropout, learning a fixed random linear map y = x·A. Batches are a pure
/// function of (dataSeed, step).
type TinyProblem(initSeed: int64, ?hidden: int, ?dropout: float) =
    let hidden = defaultArg hidden 16
    let dIn, dOut, batch = 8, 4, 32
    let model =
        let layer (name: string) (m: torch.nn.Module<Tensor, Tensor>) = name, m
        torch.nn.Sequential(
            [| layer "fc1" (torch.nn.Linear(int64 dIn, int64 hidden))
               layer "act" (torch.nn.Tanh())
               layer "drop" (torch.nn.Dropout(defaultArg dropout 0.1))
               layer "ln" (torch.nn.LayerNorm([| int64 hidden |]))
               layer "fc2" (torch.nn.Linear(int64 hidden, int64 dOut)) |])
    do
        // initialised from a private generator: other tests drawing from torch's global one cannot change it
        use g = new torch.Generator(uint64 initSeed)
        use _ = torch.no_grad ()
        for struct (name, p) in model.named_parameters () do
            if name.StartsWith "ln" then ()
            else p.copy_(torch.randn(p.shape, generator = g) * 0.3) |> ignore
    let target =
        use g = new torch.Generator(12345UL)
        torch.randn([| int64 dIn; int64 dOut |], generator = g).DetachFromDisposeScope()
    member _.Model = model
    member _.Parameters = model.named_parameters () |> Seq.map (fun struct (n, p) -> n, p) |> List.ofSeq
    member _.TokensPerStep = int64 batch
    /// The mean squared error of batch `step`.
    member _.Loss(step: int) : Tensor =
        use g = new torch.Generator(uint64 (1000 + step))
        let x = torch.randn([| int64 batch; int64 dIn |], generator = g)
        let y = x.matmul target
        torch.nn.functional.mse_loss(model.forward x, y)
    member this.Objective = Trainer.objective this.Parameters this.TokensPerStep this.Loss
    /// Copies of the parameters' values.
    member this.Snapshot() = this.Parameters |> List.map (fun (n, p) -> n, p.detach().clone().DetachFromDisposeScope())
    interface IDisposable with
        member _.Dispose() = model.Dispose(); target.Dispose()

/// The exception of type 'E that `f` raises (fails the test when it raises nothing or another type).
let private throwsWith<'E when 'E :> exn> (f: unit -> unit) : 'E =
    let outcome =
        try f (); Error "nothing was thrown"
        with
        | :? 'E as e -> Ok e
        | e -> Error(sprintf "%s was thrown: %s" (e.GetType().Name) e.Message)
    match outcome with
    | Ok e -> e
    | Error what -> failtestf "expected %s, but %s" typeof<'E>.Name what

let private bitEqual (a: Tensor) (b: Tensor) =
    a.shape = b.shape && a.dtype = b.dtype && a.eq(b).all().item<bool>()

let private config (dir: string) steps =
    { Trainer.TrainConfig.Default with
        Steps = steps
        Schedule = WarmupCosine(0.01, 3, 10, 0.1)
        Optimizer = { Optim.AdamWConfig.Default with WeightDecay = 0.1 }
        ClipGradNorm = Some 1.0
        LogEvery = 2
        CheckpointEvery = 5
        KeepCheckpoints = 0
        OutputDir = dir
        Seed = 7L
        Resume = Trainer.Latest
        Progress = Progress.Silent }

let private close (tol: float) (expected: float) (actual: float) = abs (expected - actual) <= tol * max 1.0 (abs expected)

// ---------------------------------------------------------------- schedules

let scheduleTests =
    testList "schedule" [
        test "warmup-cosine at key steps" {
            let s = WarmupCosine(1.0, 10, 110, 0.1)
            let at = lrAt s
            Expect.floatClose Accuracy.veryHigh (at 0) 0.1 "first warmup step: 1/10 of peak"
            Expect.floatClose Accuracy.veryHigh (at 4) 0.5 "5/10 of peak"
            Expect.floatClose Accuracy.veryHigh (at 9) 1.0 "last warmup step reaches peak"
            Expect.floatClose Accuracy.veryHigh (at 10) 1.0 "decay starts at the peak"
            Expect.floatClose Accuracy.veryHigh (at 35) (0.1 + 0.45 * (1.0 + sqrt 0.5)) "a quarter through: cos(π/4)"
            Expect.floatClose Accuracy.veryHigh (at 60) 0.55 "half way: mean of peak and floor"
            Expect.floatClose Accuracy.veryHigh (at 110) 0.1 "floor at total"
            Expect.floatClose Accuracy.veryHigh (at 500) 0.1 "floor after total"
        }
        test "warmup-linear-decay and constant at key steps" {
            let s = WarmupLinearDecay(2.0, 0, 100, 0.0)
            Expect.floatClose Accuracy.veryHigh (lrAt s 0) 2.0 "no warmup: peak at 0"
            Expect.floatClose Accuracy.veryHigh (lrAt s 25) 1.5 "a quarter down"
            Expect.floatClose Accuracy.veryHigh (lrAt s 50) 1.0 "half"
            Expect.floatClose Accuracy.veryHigh (lrAt s 100) 0.0 "zero at total"
            let w = WarmupLinearDecay(1.0, 4, 20, 0.5)
            Expect.floatClose Accuracy.veryHigh (lrAt w 1) 0.5 "2/4 warm"
            Expect.floatClose Accuracy.veryHigh (lrAt w 12) 0.75 "half way between peak and 0.5"
            Expect.equal (lrAt (Constant 3e-4) 12345) 3e-4 "constant"
        }
        test "warmup-stable-decay at key steps" {
            let s = WarmupStableDecay(1.0, 5, 100, 20, 0.0)
            Expect.floatClose Accuracy.veryHigh (lrAt s 0) 0.2 "warmup 1/5"
            Expect.floatClose Accuracy.veryHigh (lrAt s 4) 1.0 "peak"
            Expect.floatClose Accuracy.veryHigh (lrAt s 79) 1.0 "stable until the decay"
            Expect.floatClose Accuracy.veryHigh (lrAt s 80) 1.0 "decay starts at the peak"
            Expect.floatClose Accuracy.veryHigh (lrAt s 90) 0.5 "half the decay"
            Expect.floatClose Accuracy.veryHigh (lrAt s 100) 0.0 "floor at total"
            let noDecay = WarmupStableDecay(1.0, 5, 100, 0, 0.0)
            Expect.equal (lrAt noDecay 100) 1.0 "decay 0: warmup then constant, also past total"
        }
        test "invalid schedules are rejected with the problem named" {
            let e = throwsWith<ArgumentException> (fun () -> validate (WarmupCosine(1.0, 20, 10, 0.1)))
            Expect.stringContains e.Message "warmup (20) must not exceed total (10)" "names the problem"
            Expect.isNonEmpty (problems (WarmupStableDecay(1.0, 5, 10, 8, 0.0))) "warmup + decay > total"
            Expect.isNonEmpty (problems (Constant -1.0)) "negative lr"
            Expect.isNonEmpty (problems (WarmupLinearDecay(1.0, 0, 10, 1.5))) "ratio > 1"
        }
        test "warmup-fraction-decay (the coders' schedule): warmup times a linear decay over the last fraction" {
            let s = WarmupFractionDecay(2.0, 10, 100, 0.2, 0.0)
            Expect.floatClose Accuracy.veryHigh (lrAt s 0) 0.2 "first warmup step"
            Expect.floatClose Accuracy.veryHigh (lrAt s 9) 2.0 "end of warm-up"
            Expect.floatClose Accuracy.veryHigh (lrAt s 79) 2.0 "constant until 80% of the run"
            Expect.floatClose Accuracy.veryHigh (lrAt s 90) 1.0 "half-way through the decay"
            Expect.floatClose Accuracy.veryHigh (lrAt s 100) 0.0 "floor at total"
            let overlap = WarmupFractionDecay(1.0, 50, 10, 0.5, 0.5)
            Expect.floatClose Accuracy.veryHigh (lrAt overlap 7) (8.0 / 50.0 * (1.0 - 0.5 * 0.4)) "warmup past the decay's start: the factors multiply"
            validate overlap
            Expect.equal (Schedule.ofJson (Schedule.toJson s)) s "JSON round trip"
            Expect.isNonEmpty (problems (WarmupFractionDecay(1.0, 5, 10, 1.5, 0.0))) "fraction > 1"
        }
        testProperty "rates stay in [0, peak], at least peak·minRatio after warmup; warmup rises, decay falls" <| fun (seed: int) ->
            let rng = Random seed
            let total = rng.Next(1, 400)
            let warmup = rng.Next(0, total + 1)
            let decay = rng.Next(0, total - warmup + 1)
            let lr, ratio = rng.NextDouble() + 1e-3, rng.NextDouble()
            for s in [ WarmupCosine(lr, warmup, total, ratio); WarmupLinearDecay(lr, warmup, total, ratio)
                       WarmupStableDecay(lr, warmup, total, decay, ratio) ] do
                validate s
                let rates = Array.init (total + 5) (lrAt s)
                rates |> Array.iteri (fun i r ->
                    let floor = if i < warmup then 0.0 else lr * ratio * (1.0 - 1e-12)
                    Expect.isTrue (r <= lr * (1.0 + 1e-12) && r >= 0.0 && r >= floor) (sprintf "%A: %g out of range at %d" s r i))
                for i in 1 .. rates.Length - 1 do
                    if i < warmup then Expect.isTrue (rates[i] >= rates[i - 1]) "warmup rises"
                    elif i > warmup then Expect.isTrue (rates[i] <= rates[i - 1] * (1.0 + 1e-12)) "after warmup, never rises"
                Expect.floatClose Accuracy.high (lrAt s total) (lr * (if decay = 0 && (match s with WarmupStableDecay _ -> true | _ -> false) then 1.0 else ratio)) "value at total"
                Expect.equal (Schedule.ofJson (Schedule.toJson s)) s "JSON round trip"
    ]

// ---------------------------------------------------------------- optimizer and clipping

let private withGrads (seed: int) (shapes: int64[] list) =
    torch.manual_seed (int64 seed) |> ignore
    let ps = shapes |> List.mapi (fun i s -> sprintf "p%d" i, new Parameter(torch.randn(s), true))
    use scope = torch.NewDisposeScope()
    let loss = ps |> List.map (fun (_, p) -> (p * torch.randn(p.shape) * 3.0).sum()) |> List.reduce (+)
    loss.backward ()
    ps

let private globalNormByHand (ps: (string * Parameter) list) =
    ps |> List.sumBy (fun (_, p) -> p.grad.to_type(torch.float64).square().sum().item<float>()) |> sqrt

let optimTests =
    testList "optimizer" [
        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 40 } "clipping bounds the global norm and reports the norm before"
        <| fun (seed: int) (maxNormSeed: PositiveInt) ->
            let rng = Random seed
            let shapes = List.init (rng.Next(1, 5)) (fun _ -> Array.init (rng.Next(1, 4)) (fun _ -> int64 (rng.Next(1, 6))))
            let ps = withGrads seed shapes
            let before = globalNormByHand ps
            let gradsBefore = ps |> List.map (fun (_, p) -> p.grad.clone())
            let maxNorm = float (maxNormSeed.Get % 50 + 1) / 10.0
            let reported = Optim.clipGradNorm (ps |> List.map snd) maxNorm
            Expect.isTrue (close 1e-5 before reported) (sprintf "pre-clip norm %g reported as %g" before reported)
            let after = globalNormByHand ps
            Expect.isTrue (after <= maxNorm * (1.0 + 1e-5)) (sprintf "norm after clipping %g > %g" after maxNorm)
            if before <= maxNorm then
                for (g0, (_, p)) in List.zip gradsBefore ps do Expect.isTrue (torch.allclose(g0, p.grad)) "below the bound: unchanged"
            else
                Expect.isTrue (close 1e-4 maxNorm after) "above the bound: scaled to it"
                let k = after / before
                for (g0, (_, p)) in List.zip gradsBefore ps do
                    Expect.isTrue (torch.allclose(g0 * k, p.grad, 1e-4, 1e-6)) "one common factor: the direction is kept"
            Expect.isTrue (close 1e-5 after (Optim.gradNorm (ps |> List.map snd))) "gradNorm agrees"
            for (_, p) in ps do p.Dispose()

        test "weight decay applies to matrices only (biases and norm gains keep their value)" {
            torch.manual_seed 3L |> ignore
            let w = new Parameter(torch.randn(4L, 3L), true)
            let emb = new Parameter(torch.randn(5L, 2L, 2L), true)
            let b = new Parameter(torch.randn(4L), true)
            let gain = new Parameter(torch.ones(3L), true)
            let named = [ "w", w; "emb", emb; "b", b; "ln.weight", gain ]
            use opt = new Optim.AdamW(named, { Optim.AdamWConfig.Default with WeightDecay = 0.5 })
            Expect.equal (set opt.Decayed) (set [ "w"; "emb" ]) "≥2-D decayed"
            Expect.equal (set opt.NotDecayed) (set [ "b"; "ln.weight" ]) "1-D not decayed"
            let before = named |> List.map (fun (n, p) -> n, p.detach().clone())
            // zero gradients: Adam's move is 0, only the decoupled decay changes the weights
            for (_, p) in named do p.grad <- torch.zeros_like(p)
            opt.SetLearningRate 0.1
            opt.Step()
            for (n, p) in named do
                let b0 = before |> List.find (fun (m, _) -> m = n) |> snd
                if p.dim () >= 2L then
                    Expect.isTrue (torch.allclose(p.detach(), b0 * 0.95, 1e-6, 1e-7)) (sprintf "%s multiplied by 1 - lr·λ" n)
                else Expect.isTrue (bitEqual (p.detach()) b0) (sprintf "%s unchanged" n)
            Expect.equal (opt.StepCount "b") 1L "one step counted"
        }

        test "AdamW matches the textbook update over several steps (float64)" {
            torch.manual_seed 11L |> ignore
            let cfg = { Optim.AdamWConfig.Default with Beta1 = 0.8; Beta2 = 0.95; Eps = 1e-6; WeightDecay = 0.2 }
            let p = new Parameter(torch.randn([| 3L; 2L |], dtype = torch.float64), true)
            let mutable theta = p.detach().clone()
            let mutable m = torch.zeros_like theta
            let mutable v = torch.zeros_like theta
            use opt = new Optim.AdamW([ "p", p ], cfg)
            for t in 1 .. 5 do
                let lr = 0.01 * float t
                let g = torch.randn([| 3L; 2L |], dtype = torch.float64)
                p.grad <- g.clone()
                opt.SetLearningRate lr
                opt.Step()
                theta <- theta * (1.0 - lr * cfg.WeightDecay)
                m <- m * cfg.Beta1 + g * (1.0 - cfg.Beta1)
                v <- v * cfg.Beta2 + g * g * (1.0 - cfg.Beta2)
                let mHat = m / (1.0 - Math.Pow(cfg.Beta1, float t))
                let vHat = v / (1.0 - Math.Pow(cfg.Beta2, float t))
                theta <- theta - lr * mHat / (vHat.sqrt() + cfg.Eps)
                Expect.isTrue (torch.allclose(p.detach(), theta, 1e-10, 1e-12)) (sprintf "step %d: AdamW = textbook" t)
        }

        test "state tensors round-trip into a fresh optimizer" {
            torch.manual_seed 5L |> ignore
            let mk () = [ "a", new Parameter(torch.randn(3L, 3L), true); "b", new Parameter(torch.randn(3L), true) ]
            let ps = mk ()
            use opt = new Optim.AdamW(ps, Optim.AdamWConfig.Default)
            for _ in 1 .. 3 do
                for (_, p) in ps do p.grad <- torch.randn(p.shape)
                opt.SetLearningRate 0.01
                opt.Step()
            let ps2 = mk ()
            use opt2 = new Optim.AdamW(ps2, Optim.AdamWConfig.Default)
            let st = opt.StateTensors() |> Map.ofList
            opt2.LoadState(fun n -> st.TryFind n)
            for (n, t) in opt2.StateTensors() do Expect.isTrue (bitEqual t st[n]) (sprintf "%s restored" n)
            Expect.equal (opt2.StepCount "a") 3L "step count restored"
            let wrong = st |> Map.add "a.exp_avg" (torch.zeros(2L, 2L))
            let e = throwsWith<InvalidDataException> (fun () -> opt2.LoadState(fun n -> wrong.TryFind n))
            Expect.stringContains e.Message "a.exp_avg" "names the tensor"
            Expect.stringContains e.Message "[2, 2]" "names the shape"
        }
    ]

// ---------------------------------------------------------------- the loop

let private readLines (path: string) = File.ReadAllLines path |> Array.filter (fun l -> l.Trim() <> "")

let loopTests =
    testList "trainer" [
        test "the loss falls on a tiny learnable problem" {
            use dir = new TempDir()
            use prob = new TinyProblem(1L, dropout = 0.0)
            let cfg = { config dir.Path 150 with Schedule = WarmupCosine(0.02, 10, 150, 0.1); CheckpointEvery = 0; LogEvery = 50 }
            let r = Trainer.run cfg prob.Objective
            Expect.equal r.Outcome Trainer.Completed "completed"
            Expect.equal r.Losses.Length 150 "one loss per update"
            let first = Array.average r.Losses[..9]
            let last = Array.average r.Losses[140..]
            Expect.isLessThan last (0.3 * first) (sprintf "loss fell from %g to %g" first last)
            Expect.equal r.Tokens (150L * 32L) "tokens counted"
        }

        test "resume is exact: 10 straight = 5, resume, 5 (losses and parameters bit for bit)" {
            use dirA = new TempDir()
            use dirB = new TempDir()
            use a = new TinyProblem(1L)
            let ra = Trainer.run (config dirA.Path 10) a.Objective
            use b1 = new TinyProblem(1L)
            let rb1 = Trainer.run { config dirB.Path 10 with Steps = 5 } b1.Objective
            Expect.equal rb1.FinalStep 5 "first half"
            // a fresh process would rebuild the model with any initialisation: the checkpoint must overwrite it
            use b2 = new TinyProblem(99L)
            let rb2 = Trainer.run (config dirB.Path 10) b2.Objective
            Expect.equal rb2.StartStep 5 "resumed at 5"
            Expect.equal rb2.FinalStep 10 "ran to 10"
            let joined = Array.append rb1.Losses rb2.Losses
            Expect.equal (joined |> Array.map BitConverter.DoubleToInt64Bits) (ra.Losses |> Array.map BitConverter.DoubleToInt64Bits)
                "identical loss sequence"
            for ((n, pa), (_, pb)) in List.zip a.Parameters b2.Parameters do
                Expect.isTrue (bitEqual (pa.detach()) (pb.detach())) (sprintf "%s identical" n)
            let logA = Metrics.read ra.MetricsLog |> List.map (fun r -> r.Step, (r.Loss, r.Lr, r.GradNorm, r.Tokens)) |> Map.ofList
            let logB = Metrics.read rb2.MetricsLog |> List.map (fun r -> r.Step, (r.Loss, r.Lr, r.GradNorm, r.Tokens))
            Expect.equal (List.map fst logB) [ 2; 4; 5; 6; 8; 10 ] "the resumed log keeps the first half's records (its end at 5) and continues"
            for (step, values) in logB do
                if step <> 5 && step <> 6 then Expect.equal values logA[step] (sprintf "record %d as in the straight run" step)
        }

        test "a run that crashes and resumes writes the metrics log an uninterrupted run writes (wall-clock fields aside)" {
            // records every 4 updates, checkpoints every 3: the checkpoints at 3, 6 and 9 fall inside a window, so the
            // resumed run's next record must average updates from before the crash too
            use dirA = new TempDir()
            use dirB = new TempDir()
            let cfg (d: string) = { config d 12 with LogEvery = 4; CheckpointEvery = 3; EvalEvery = 0 }
            use a = new TinyProblem(3L)
            let ra = Trainer.run (cfg dirA.Path) a.Objective
            use b = new TinyProblem(3L)
            let crashing = { b.Objective with Loss = fun i -> (if i = 7 then failwith "simulated crash"); b.Loss i }
            Expect.throws (fun () -> Trainer.run (cfg dirB.Path) crashing |> ignore) "the run crashes in update 8"
            Expect.equal (Metrics.read (Trainer.metricsPath dirB.Path) |> List.map (fun r -> r.Step)) [ 4 ] "logged up to the crash"
            use b2 = new TinyProblem(77L)
            let rb = Trainer.run (cfg dirB.Path) b2.Objective
            Expect.equal rb.StartStep 6 "resumed from the checkpoint at 6, inside the window 4..8"
            let strip (r: Metrics.Record) = { r with TokensPerSecond = 0.0; ElapsedSeconds = 0.0 }
            let la = Metrics.read ra.MetricsLog |> List.map strip
            let lb = Metrics.read rb.MetricsLog |> List.map strip
            Expect.equal (lb |> List.map (fun r -> r.Step)) [ 4; 8; 12 ] "the records of the uninterrupted run"
            for (x, y) in List.zip la lb do
                Expect.equal (BitConverter.DoubleToInt64Bits y.Loss) (BitConverter.DoubleToInt64Bits x.Loss)
                    (sprintf "record %d: the mean loss over the same 4 updates, bit for bit" x.Step)
                Expect.equal y x (sprintf "record %d: every field as in the uninterrupted run" x.Step)
            let withoutTime (l: string) =
                let o = Nodes.JsonNode.Parse(l).AsObject()
                o.Remove "tokens_per_s" |> ignore
                o.Remove "elapsed_s" |> ignore
                o.ToJsonString()
            Expect.sequenceEqual (readLines rb.MetricsLog |> Array.map withoutTime) (readLines ra.MetricsLog |> Array.map withoutTime)
                "the log's lines are byte for byte the same without throughput and elapsed time"
        }

        test "a NaN loss stops cleanly and keeps the last good checkpoint" {
            use dir = new TempDir()
            use prob = new TinyProblem(2L)
            let obj = { prob.Objective with Loss = fun i -> if i = 7 then prob.Loss i * nan else prob.Loss i }
            let before7 = ref []
            let cfg = { config dir.Path 10 with CheckpointEvery = 5 }
            let r = Trainer.run cfg { obj with Loss = fun i -> (if i = 7 then before7.Value <- prob.Snapshot()); obj.Loss i }
            match r.Outcome with
            | Trainer.Diverged (step, msg) ->
                Expect.equal step 7 "stopped at update 7"
                Expect.stringContains msg "not finite" "says why"
                Expect.stringContains msg "step_000005" "names the last good checkpoint"
            | o -> failtestf "expected Diverged, got %A" o
            Expect.equal r.FinalStep 7 "7 updates applied"
            Expect.equal r.Losses.Length 7 "7 finite losses"
            for ((n, p), (_, p0)) in List.zip prob.Parameters before7.Value do
                Expect.isTrue (bitEqual (p.detach()) p0) (sprintf "%s: the NaN update was not applied" n)
            let root = Trainer.checkpointsDir dir.Path
            Expect.equal (Checkpointing.list root |> List.map fst) [ 5 ] "only the good checkpoint"
            Expect.equal (Checkpointing.tryLatest root |> Option.map Path.GetFileName) (Some "step_000005") "latest is intact"
            // the kept checkpoint still works: resuming from it with a clean loss equals a clean straight run
            use again = new TinyProblem(50L)
            let resumed = Trainer.run cfg again.Objective
            Expect.equal resumed.StartStep 5 "resumed from the good checkpoint"
            use straight = new TinyProblem(2L)
            use dirS = new TempDir()
            let rs = Trainer.run (config dirS.Path 10) straight.Objective
            Expect.equal resumed.Losses rs.Losses[5..] "same losses as a run that never saw the NaN"
        }

        test "the JSONL log has one parsable object per logged step with every field" {
            use dir = new TempDir()
            use prob = new TinyProblem(4L)
            let evals = ref 0
            let obj =
                { prob.Objective with
                    Evaluate = Some(fun () ->
                        evals.Value <- evals.Value + 1
                        prob.Model.eval ()
                        use l = prob.Loss 1_000_000
                        prob.Model.train ()
                        Map.ofList [ "val_loss", l.item<float32>() |> float; "calls", float evals.Value ]) }
            let cfg = { config dir.Path 9 with LogEvery = 2; EvalEvery = 4; CheckpointEvery = 0 }
            let r = Trainer.run cfg obj
            let lines = readLines r.MetricsLog
            let docs = lines |> Array.map (fun l -> JsonDocument.Parse(l).RootElement)
            let steps = docs |> Array.map (fun d -> d.GetProperty("step").GetInt32())
            Expect.equal steps [| 2; 4; 6; 8; 9 |] "a record every 2 updates, at evaluations and at the end"
            Expect.equal evals.Value 3 "evaluated at 4, 8 and the end"
            let mutable lastElapsed = 0.0
            for (d, step) in Array.zip docs steps do
                for k in [ "loss"; "lr"; "grad_norm"; "tokens"; "tokens_per_s"; "elapsed_s" ] do
                    Expect.equal (d.GetProperty(k).ValueKind) JsonValueKind.Number (sprintf "step %d: '%s' is a number" step k)
                let prev = steps |> Array.filter (fun s -> s < step) |> Array.fold max 0
                let meanLoss = Array.average r.Losses[prev .. step - 1]
                Expect.floatClose Accuracy.veryHigh (d.GetProperty("loss").GetDouble()) meanLoss "loss: mean over the window"
                Expect.floatClose Accuracy.veryHigh (d.GetProperty("lr").GetDouble()) (lrAt cfg.Schedule (step - 1)) "lr of the last update"
                Expect.equal (d.GetProperty("tokens").GetInt64()) (int64 step * 32L) "tokens so far"
                Expect.isGreaterThan (d.GetProperty("tokens_per_s").GetDouble()) 0.0 "throughput"
                Expect.isGreaterThan (d.GetProperty("grad_norm").GetDouble()) 0.0 "gradient norm"
                let e = d.GetProperty("elapsed_s").GetDouble()
                Expect.isGreaterThanOrEqual e lastElapsed "elapsed grows"
                lastElapsed <- e
                match d.TryGetProperty "eval" with
                | true, ev ->
                    Expect.contains [ 4; 8; 9 ] step "eval only where it ran"
                    Expect.isTrue (ev.GetProperty("val_loss").GetDouble() > 0.0) "eval metric logged"
                | _ -> Expect.isFalse (List.contains step [ 4; 8; 9 ]) (sprintf "step %d should carry eval" step)
            let parsed = Metrics.read r.MetricsLog
            Expect.equal (parsed |> List.map (fun x -> x.Step)) (List.ofArray steps) "Metrics.read agrees"
        }

        testProperty "metrics records round-trip through a JSON line (non-finite numbers as null)" <| fun (step: NonNegativeInt) (loss: NormalFloat) (tokens: NonNegativeInt) (useNan: bool) ->
            let r: Metrics.Record =
                { Step = step.Get; Loss = (if useNan then nan else loss.Get); Lr = 1e-3; GradNorm = abs loss.Get
                  Tokens = int64 tokens.Get * 1000L; TokensPerSecond = 123.5; ElapsedSeconds = 2.25
                  Train = Map.ofList [ "l0", 12.5 ]
                  Eval = (if useNan then Map.empty else Map.ofList [ "kl", loss.Get ]) }
            let line = Metrics.toJsonLine r
            Expect.isFalse (line.Contains "\n") "one line"
            let back = Metrics.ofJsonLine "test" line
            Expect.equal back.Step r.Step "step"
            Expect.equal (Double.IsNaN back.Loss) useNan "NaN written as null and read back as NaN"
            if not useNan then Expect.equal back.Loss r.Loss "loss exact"
            Expect.equal back.Eval r.Eval "eval"
            Expect.equal back.Train r.Train "train"

        test "hooks: AfterBackward edits gradients, AfterStep edits weights, TrainMetrics reach the log" {
            use dir = new TempDir()
            use prob = new TinyProblem(12L)
            let ps = Map.ofList prob.Parameters
            let bias0 = ps["fc1.bias"].detach().clone()
            let seen = ResizeArray<int>()
            let obj =
                { prob.Objective with
                    AfterBackward = fun i -> seen.Add i; ps["fc1.bias"].grad.zero_() |> ignore
                    AfterStep = fun _ ->
                        let w = ps["fc2.weight"]
                        w.div_(w.norm(1, true)) |> ignore
                    TrainMetrics = Some(fun () -> Map.ofList [ "calls", float seen.Count ]) }
            let r = Trainer.run { config dir.Path 6 with CheckpointEvery = 0; LogEvery = 3 } obj
            Expect.equal (List.ofSeq seen) [ 0 .. 5 ] "AfterBackward once per update, in order"
            Expect.isTrue (bitEqual (ps["fc1.bias"].detach()) bias0) "a zero gradient and no decay: the bias never moved"
            use norms = ps["fc2.weight"].detach().norm(1, false)
            Expect.isTrue (torch.allclose(norms, torch.ones_like norms, 1e-5, 1e-6)) "rows renormalised after every update"
            Expect.equal (Metrics.read r.MetricsLog |> List.map (fun x -> x.Train["calls"])) [ 3.0; 6.0 ] "train metrics logged"
        }

        test "a cancelled run checkpoints where it stopped and resumes from there" {
            use dir = new TempDir()
            use prob = new TinyProblem(6L)
            use cts = new Threading.CancellationTokenSource()
            let obj = { prob.Objective with Loss = fun i -> (if i = 2 then cts.Cancel()); prob.Loss i }
            let r = Trainer.runCancellable cts.Token { config dir.Path 10 with CheckpointEvery = 0 } obj
            Expect.equal r.Outcome (Trainer.Cancelled 3) "stopped after the update in flight"
            Expect.equal (Checkpointing.tryLatest (Trainer.checkpointsDir dir.Path) |> Option.map Path.GetFileName) (Some "step_000003") "checkpointed"
        }
    ]

// ---------------------------------------------------------------- checkpoints

let checkpointTests =
    testList "checkpoints" [
        test "a checkpoint holds the model, optimizer state and trainer.json; old ones are pruned" {
            use dir = new TempDir()
            use prob = new TinyProblem(8L)
            let r = Trainer.run { config dir.Path 9 with CheckpointEvery = 2; KeepCheckpoints = 2 } { prob.Objective with Metadata = Map.ofList [ "model_config", "{\"d\":16}" ] }
            let root = Trainer.checkpointsDir dir.Path
            Expect.equal (Checkpointing.list root |> List.map fst) [ 8; 9 ] "newest two kept"
            let latest = (Checkpointing.tryLatest root).Value
            Expect.equal (Some latest) r.LastCheckpoint "latest = the end"
            for f in [ Checkpointing.ModelFile; Checkpointing.OptimizerFile; Checkpointing.TrainerFile ] do
                Expect.isTrue (File.Exists(Path.Combine(latest, f))) (sprintf "%s written" f)
            let info = Checkpointing.readInfo latest
            Expect.equal info.Step 9 "step"
            Expect.equal info.Tokens (9L * 32L) "tokens"
            Expect.equal info.Metadata["model_config"] "{\"d\":16}" "caller metadata kept"
            Expect.equal (Trainer.configOfJson info.Config).Schedule (config dir.Path 9).Schedule "the config can be read back"
            Expect.isEmpty (Directory.GetDirectories root |> Array.filter (fun d -> Path.GetFileName(d).StartsWith ".")) "no temporary folders left"
        }

        test "missing files, wrong shapes and bad pointers give errors naming the file and tensor" {
            use dir = new TempDir()
            use prob = new TinyProblem(9L)
            Trainer.run { config dir.Path 5 with CheckpointEvery = 0 } prob.Objective |> ignore
            let root = Trainer.checkpointsDir dir.Path
            let ck = (Checkpointing.tryLatest root).Value
            // wrong shapes: a model with another hidden size
            use other = new TinyProblem(9L, hidden = 12)
            use opt = new Optim.AdamW(other.Parameters, Optim.AdamWConfig.Default)
            let targets = other.Parameters |> List.map (fun (n, p) -> n, p :> Tensor)
            let e = throwsWith<Checkpointing.CheckpointError> (fun () -> Checkpointing.load ck targets [] opt |> ignore)
            Expect.stringContains e.Message "fc1.weight" "names the tensor"
            Expect.stringContains e.Message "[16, 8]" "the file's shape"
            Expect.stringContains e.Message "[12, 8]" "the model's shape"
            // a tensor the model does not have / lacks
            let e2 = throwsWith<Checkpointing.CheckpointError> (fun () -> Checkpointing.loadModel ck (List.tail (prob.Parameters |> List.map (fun (n, p) -> n, p :> Tensor))) [])
            Expect.stringContains e2.Message "unexpected tensors" "extra tensor reported"
            // a missing file
            File.Delete(Path.Combine(ck, Checkpointing.OptimizerFile))
            use prob2 = new TinyProblem(9L)
            let e3 = throwsWith<Checkpointing.CheckpointError> (fun () -> Trainer.run (config dir.Path 10) prob2.Objective |> ignore)
            Expect.stringContains e3.Message Checkpointing.OptimizerFile "names the missing file"
            // a truncated model file
            let model = Path.Combine(ck, Checkpointing.ModelFile)
            let bytes = File.ReadAllBytes model
            File.WriteAllBytes(model, bytes[.. bytes.Length / 2])
            let e4 = throwsWith<Checkpointing.CheckpointError> (fun () -> Checkpointing.loadModel ck (prob2.Parameters |> List.map (fun (n, p) -> n, p :> Tensor)) [])
            Expect.stringContains e4.Message Checkpointing.ModelFile "names the damaged file"
            // latest pointing nowhere
            File.WriteAllText(Path.Combine(root, Checkpointing.LatestFile), "step_000042")
            let e5 = throwsWith<Checkpointing.CheckpointError> (fun () -> Checkpointing.tryLatest root |> ignore)
            Expect.stringContains e5.Message "step_000042" "names the missing folder"
        }

        test "every checkpoint file's size and SHA-256 are in a manifest written last; damage is reported by file" {
            use dir = new TempDir()
            use prob = new TinyProblem(13L)
            Trainer.run { config dir.Path 5 with CheckpointEvery = 0 } prob.Objective |> ignore
            let ck = (Checkpointing.tryLatest (Trainer.checkpointsDir dir.Path)).Value
            let manifest = Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(ck, Checkpointing.ManifestFile)))
            Expect.equal (manifest["step"].GetValue<int>()) 5 "the manifest records the step"
            for f in [ Checkpointing.ModelFile; Checkpointing.OptimizerFile; Checkpointing.TrainerFile ] do
                let e = manifest["files"][f]
                Expect.equal (e["sha256"].GetValue<string>()) (Checkpointing.sha256 (Path.Combine(ck, f))) (sprintf "%s: its SHA-256" f)
                Expect.equal (e["bytes"].GetValue<int64>()) (FileInfo(Path.Combine(ck, f)).Length) (sprintf "%s: its size" f)
            Expect.isTrue (match Checkpointing.verify ck with Ok info -> info.Step = 5 | Error _ -> false) "intact"
            // one flipped bit in the optimizer state
            let opt = Path.Combine(ck, Checkpointing.OptimizerFile)
            let bytes = File.ReadAllBytes opt
            bytes[bytes.Length - 3] <- bytes[bytes.Length - 3] ^^^ 0x10uy
            File.WriteAllBytes(opt, bytes)
            match Checkpointing.verify ck with
            | Ok _ -> failtest "a flipped bit in the optimizer state went unnoticed"
            | Error (path, problem) ->
                Expect.equal (Path.GetFileName path) Checkpointing.OptimizerFile "names the damaged file"
                Expect.stringContains problem "SHA-256" "says what is wrong"
            let e = throwsWith<Checkpointing.CheckpointError> (fun () -> Checkpointing.load ck (prob.Parameters |> List.map (fun (n, p) -> n, p :> Tensor)) [] (new Optim.AdamW(prob.Parameters, Optim.AdamWConfig.Default)) |> ignore)
            Expect.stringContains e.Message Checkpointing.OptimizerFile "load refuses it, naming the file"
            bytes[bytes.Length - 3] <- bytes[bytes.Length - 3] ^^^ 0x10uy
            File.WriteAllBytes(opt, bytes)
            // trainer.json edited to another step, with its checksum in the manifest updated to match
            let trainer = Path.Combine(ck, Checkpointing.TrainerFile)
            let t = Nodes.JsonNode.Parse(File.ReadAllText trainer)
            t["step"] <- Nodes.JsonValue.Create 4
            File.WriteAllText(trainer, t.ToJsonString())
            match Checkpointing.verify ck with
            | Ok _ -> failtest "an edited trainer.json went unnoticed"
            | Error (path, problem) ->
                Expect.equal (Path.GetFileName path) Checkpointing.TrainerFile "names trainer.json"
                Expect.stringContains problem "damaged" "its size or checksum differs from the manifest's"
            let entry = manifest["files"][Checkpointing.TrainerFile]
            entry["sha256"] <- Nodes.JsonValue.Create(Checkpointing.sha256 trainer)
            entry["bytes"] <- Nodes.JsonValue.Create(FileInfo(trainer).Length)
            File.WriteAllText(Path.Combine(ck, Checkpointing.ManifestFile), manifest.ToJsonString())
            match Checkpointing.verify ck with
            | Ok _ -> failtest "trainer.json's step disagrees with the manifest, and was accepted"
            | Error (_, problem) -> Expect.stringContains problem "records step 4, but the manifest records step 5" "the steps are cross-checked"
        }

        test "resume skips damaged or incomplete newer checkpoints, says which and why, and continues exactly" {
            use dirA = new TempDir()
            use dirB = new TempDir()
            let cfg (d: string) = { config d 15 with CheckpointEvery = 5; KeepCheckpoints = 0 }
            use a = new TinyProblem(14L)
            let ra = Trainer.run (cfg dirA.Path) a.Objective
            use b = new TinyProblem(14L)
            let crashing = { b.Objective with Loss = fun i -> (if i = 12 then failwith "simulated crash"); b.Loss i }
            Expect.throws (fun () -> Trainer.run (cfg dirB.Path) crashing |> ignore) "the run crashes in update 13"
            let root = Trainer.checkpointsDir dirB.Path
            Expect.equal (Checkpointing.list root |> List.map fst) [ 5; 10 ] "checkpoints at 5 and 10"
            // the newest: a flipped byte in its optimizer state; a leftover folder without a manifest, newer still
            let opt = Path.Combine(root, "step_000010", Checkpointing.OptimizerFile)
            let bytes = File.ReadAllBytes opt
            bytes[bytes.Length / 2] <- bytes[bytes.Length / 2] ^^^ 0xFFuy
            File.WriteAllBytes(opt, bytes)
            let incomplete = Path.Combine(root, "step_000012")
            Directory.CreateDirectory incomplete |> ignore
            File.Copy(Path.Combine(root, "step_000005", Checkpointing.ModelFile), Path.Combine(incomplete, Checkpointing.ModelFile))
            use b2 = new TinyProblem(99L)
            let rb = Trainer.run (cfg dirB.Path) b2.Objective
            Expect.equal rb.StartStep 5 "resumed from the newest intact checkpoint"
            Expect.equal (rb.Skipped |> List.map (fst >> Path.GetFileName)) [ "step_000012"; "step_000010" ] "the skipped ones, newest first"
            let why = rb.Skipped |> List.map snd
            Expect.stringContains why[0] Checkpointing.ManifestFile "the incomplete one has no manifest"
            Expect.stringContains why[1] Checkpointing.OptimizerFile "the damaged one: which file"
            Expect.stringContains why[1] "SHA-256" "and what is wrong"
            for ((n, pa), (_, pb)) in List.zip a.Parameters b2.Parameters do
                Expect.isTrue (bitEqual (pa.detach()) (pb.detach())) (sprintf "%s as in the uninterrupted run" n)
            Expect.equal (rb.Losses |> Array.map BitConverter.DoubleToInt64Bits) (ra.Losses[5..] |> Array.map BitConverter.DoubleToInt64Bits) "same losses"
            // nothing intact at all: an error naming the folder and each problem
            for (_, d) in Checkpointing.list root do File.Delete(Path.Combine(d, Checkpointing.ManifestFile))
            use b3 = new TinyProblem(99L)
            let e = throwsWith<Checkpointing.CheckpointError> (fun () -> Trainer.run (cfg dirB.Path) b3.Objective |> ignore)
            Expect.equal e.path root "names the checkpoints folder"
            Expect.stringContains e.Message "no intact checkpoint" "says why it cannot resume"
            Expect.stringContains e.Message "step_000015" "lists the checkpoints it looked at"
        }

        test "pruning keeps the lowest-loss checkpoint once the loss has risen well above it" {
            use dir = new TempDir()
            use prob = new TinyProblem(15L, dropout = 0.0)
            // from update 6 on, the loss is 100 times larger: the checkpoints after it are not the ones to use
            let obj = { prob.Objective with Loss = fun i -> if i >= 6 then prob.Loss i * 100.0 else prob.Loss i }
            let r = Trainer.run { config dir.Path 12 with CheckpointEvery = 2; KeepCheckpoints = 2 } obj
            let root = Trainer.checkpointsDir dir.Path
            // a checkpoint's loss is the mean over the updates since the one before; when the loss rose (checkpoint 8)
            // the checkpoints kept were 4 and 6
            let lossAt (s: int) = (r.Losses[s - 2] + r.Losses[s - 1]) / 2.0
            let best = if lossAt 4 < lossAt 6 then 4 else 6
            Expect.equal (Checkpointing.list root |> List.map fst) [ best; 10; 12 ] "the newest two, and the best one before the rise"
            Expect.equal (r.BestCheckpoint |> Option.map Path.GetFileName) (Some(Checkpointing.dirName best)) "the one to use"
            let recorded = Trainer.checkpointLoss (Checkpointing.verified (Path.Combine(root, Checkpointing.dirName best)))
            Expect.floatClose Accuracy.veryHigh recorded (lossAt best) "the checkpoint records its loss"
        }

        test "non-finite numbers are written as null and read back as NaN (metrics, coder logs, trainer state)" {
            let line = Transcoders.Coders.CoderTraining.logLine
                           { Transcoders.Coders.StepLog.Step = 3; Tokens = 12L; Lr = 1e-3; SparsityCoefficient = nan; Loss = infinity; Reconstruction = 1.0
                             Sparsity = 0.0; PreAct = 0.0; Auxiliary = 0.0; L0 = 2.0; Fvu = nan; DeadFraction = 0.0; Resampled = 0 }
            Expect.stringContains line "\"fvu\":null" "NaN as null"
            let back = Transcoders.Coders.CoderTraining.parseLogLine "test" line
            Expect.isTrue (Double.IsNaN back.Fvu && Double.IsNaN back.Loss && back.Reconstruction = 1.0) "read back as NaN"
            Expect.isTrue (Double.IsNaN(JsonNumbers.ofElement (JsonDocument.Parse("\"NaN\"").RootElement))) "older logs' \"NaN\" strings too"
            use dir = new TempDir()
            let log = dir.File "log.jsonl"
            File.WriteAllText(log, line + "\n" + line.Replace("\"step\":3", "\"step\":5") + "\n{\"step\":6,\"loss\":1.")
            Metrics.truncate log (fun s -> s < 5)
            Expect.equal (File.ReadAllLines log) [| line |] "truncation keeps the earlier steps and drops a partial line"
        }

        test "resuming with a different trajectory config or starting Fresh over checkpoints is refused" {
            use dir = new TempDir()
            use prob = new TinyProblem(10L)
            Trainer.run { config dir.Path 4 with CheckpointEvery = 0 } prob.Objective |> ignore
            let e = throwsWith<InvalidOperationException> (fun () -> Trainer.run { config dir.Path 8 with Seed = 8L } prob.Objective |> ignore)
            Expect.stringContains e.Message "seed" "names the differing field"
            let e2 = throwsWith<InvalidOperationException> (fun () -> Trainer.run { config dir.Path 8 with Resume = Trainer.Fresh } prob.Objective |> ignore)
            Expect.stringContains e2.Message "already holds checkpoints" "refuses to overwrite"
        }
    ]

/// The trainer seeds torch's global generator before every update (dropout draws from it), so these
/// tests run one at a time and in the group of other tests that use the global generator.
let tests =
    // fully sequenced (run alone, after the parallel tests): exact resume replays torch's global generator
    testSequenced <| testList "Training" [ scheduleTests; optimTests; loopTests; checkpointTests ]
