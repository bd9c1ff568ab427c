/// The library called from several threads at once: custom autograd functions (sparse decode, the sparse encoder
/// backward, JumpReLU) give every thread its own gradients, and seeded flows of work draw their own random streams.
/// Both failed before: the backward tensors were released from one process-wide queue (another thread's forward
/// disposed gradients before the autograd engine had copied them: wrong gradients, or a segmentation fault), and
/// seeding used torch's one global generator.
module Transcoders.Tests.ConcurrencyTests

open System
open System.Threading.Tasks
open Expecto
open TorchSharp
open Transcoders.Coders
open Transcoders.Tensors
open Transcoders.Tests.Fixtures

/// One case: a coder, a batch and a training configuration, all from `seed` (built on the calling thread).
let private case (seed: int) =
    let rng = Random seed
    let kind = [| Transcoder; SkipTranscoder; CrossLayerTranscoder; Sae |][seed % 4]
    let sparse = seed % 3 <> 2
    let act (dSae: int) = if sparse then TopK(rng.Next(1, dSae + 1)) else JumpReLU { InitialThreshold = 0.3; Bandwidth = 0.5 }
    let cfg = smallConfig rng kind act true
    Device.seed (int64 seed)
    let coder = Coder.create cfg torch.CPU
    let b = rng.Next(4, 17)
    let shape (d: int) = if cfg.Kind = CrossLayerTranscoder then [| int64 b; int64 cfg.NLayers; int64 d |] else [| int64 b; int64 d |]
    let x = torch.randn(shape cfg.DIn, generator = Rng.generator torch.CPU)
    let y = if cfg.Kind = Sae then x.alias() else torch.randn(shape cfg.DOut, generator = Rng.generator torch.CPU)
    let loss = { LossConfig.TopK 2 with Auxiliary = NoAuxiliary; Reconstruction = Mse; Sparsity = L1 false; SparsityCoefficient = 0.1 }
    let train =
        { TrainConfig.Paper with
            Loss = loss; Normalise = false; BiasInit = Normalisation.ZeroBias
            Compute = { ComputeOptions.Default with SparseDecode = sparse } }
    coder, x, y, train

/// Every parameter's gradient after one forward + backward of the training loss, as float arrays.
let private gradients (train: TrainConfig) (coder: Coder) (x: torch.Tensor) (y: torch.Tensor) : (string * float[]) list =
    use scope = torch.NewDisposeScope()
    let state = CoderTraining.init train coder
    try
        let f = CoderTraining.forwardLoss state x y
        state.Optimizer.ZeroGrad()
        f.Terms.Total.backward()
        SparseActivations.BackwardTensors.release ()
        [ for n, p in coder.NamedParameters -> n, values p.grad ]
    finally (state :> IDisposable).Dispose()

let private runCase (seed: int) =
    let coder, x, y, train = case seed
    use coder = coder
    use x = x
    use y = y
    gradients train coder x y

let tests =
    testList "Concurrency" [
        test "custom autograd functions give each of four threads its own gradients" {
            let seeds = [| 0 .. 11 |]
            // references one at a time (this test's own threads only start after)
            let reference = seeds |> Array.map runCase
            let failures = Collections.Concurrent.ConcurrentBag<string>()
            let worker (t: int) =
                Task.Run(fun () ->
                    for round in 0 .. 9 do
                        for i in 0 .. seeds.Length - 1 do
                            let s = seeds[(i + 3 * t + round) % seeds.Length]
                            let got = runCase s
                            for (n, g), (_, r) in List.zip got reference[s] do
                                let scale = max 1.0 (r |> Array.fold (fun m v -> max m (abs v)) 0.0)
                                let d = maxAbsDiff g r
                                if d > 1e-4 * scale then failures.Add(sprintf "thread %d, case %d, ∂%s: |difference| %g" t s n d))
            Task.WaitAll [| for t in 0 .. 3 -> worker t |]
            Expect.isEmpty (List.ofSeq failures |> List.truncate 5) "gradients computed concurrently equal the one-at-a-time ones"
        }

        test "seeded flows on four threads draw the streams they draw alone" {
            let draw (seed: int64) =
                Device.seed seed
                let cfg = CoderConfig.transcoder "m" 0 8 32
                use c = Coder.create cfg torch.CPU
                use extra = torch.randn([| 64L |], generator = Rng.generator torch.CPU)
                [ for _, p in c.NamedParameters -> values p ] @ [ values extra ]
            let seeds = [| 1L .. 8L |]
            let alone = seeds |> Array.map draw
            let together =
                Task.WhenAll([| for s in seeds -> Task.Run(fun () -> [ for _ in 1 .. 5 -> draw s ]) |]).Result
            for i in 0 .. seeds.Length - 1 do
                for r in together[i] do
                    Expect.equal r alone[i] (sprintf "seed %d: parameters and draws equal the lone run's" seeds[i])
        }

        test "a flow that was not seeded draws from torch's global generator" {
            let run () =
                Task.Run(fun () ->
                    Rng.reset ()
                    Expect.isNull (Rng.generator torch.CPU) "no flow generator"
                    Expect.isNone (Rng.currentSeed ()) "no flow seed").Wait()
            run ()
        }
    ]
