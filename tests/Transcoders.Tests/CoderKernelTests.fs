/// Fast paths of the coder step against the plain ones: GroupMax against its definition, sparse decoding and the
/// sparse encoder backward against the dense products (values and gradients), reduced-precision products against
/// float32, and firing statistics from active features against the dense update.
module Transcoders.Tests.CoderKernelTests

open System
open Expecto
open TorchSharp
open Transcoders.Coders
open Transcoders.Tests.Fixtures

let private activeKinds = [| Sae; Transcoder; SkipTranscoder; CrossLayerTranscoder |]

/// Gradients of every parameter after forward + backward of the training loss of `cfg` on (x, y).
let private gradients (cfg: TrainConfig) (coder: Coder) (x: torch.Tensor) (y: torch.Tensor) =
    use scope = torch.NewDisposeScope()
    let state = CoderTraining.init cfg coder
    let f = CoderTraining.forwardLoss state x y
    state.Optimizer.ZeroGrad()
    f.Terms.Total.backward()
    let loss = f.Terms.Total.item<float32> () |> float
    let l0 = (match f.Pass.Active with Some a -> a.Values | None -> f.Pass.Acts).gt(sc 0.0).sum().item<int64> ()
    let grads = [ for n, p in coder.NamedParameters -> n, values p.grad ]
    let pred = values f.Pass.Prediction
    let acts = values f.Pass.Acts
    let preGrad = f.Pass.Pre.requires_grad
    (state :> IDisposable).Dispose()
    loss, l0, pred, acts, grads, preGrad

let private divisors (n: int) = [| for k in 1 .. n do if n % k = 0 then yield k |]

let tests =
    testList "Coder kernels" [
        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 25 } "GroupMax keeps the ReLU'd maximum of each of k groups and passes gradients only through it" <| fun (seed: int) ->
            let rng = Random seed
            let b = rng.Next(1, 6)
            let k = rng.Next(1, 5)
            let size = rng.Next(1, 5)
            let f = k * size
            torch.manual_seed (int64 seed) |> ignore
            use z = torch.randn([| int64 b; int64 f |], dtype = torch.float64).requires_grad_(true)
            use w = torch.randn([| int64 b; int64 f |], dtype = torch.float64)
            use a = SparseActivations.groupMax k z
            use loss = (a * w).sum()
            loss.backward()
            let zv, av, wv, gv = values z, values a, values w, values z.grad
            for r in 0 .. b - 1 do
                for g in 0 .. k - 1 do
                    let group = [| for j in g * size .. g * size + size - 1 -> r * f + j |]
                    let best = group |> Array.maxBy (fun i -> zv[i])
                    for i in group do
                        let kept = i = best && zv[i] > 0.0
                        Expect.equal av[i] (if kept then zv[i] else 0.0) "the group's positive maximum passes, the rest are 0"
                        Expect.equal gv[i] (if kept then wv[i] else 0.0) "gradient only through the kept maximum"

        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 25 } "sparse decode equals the dense product, with the same gradients" <| fun (seed: int) ->
            let rng = Random seed
            let b, f, d = rng.Next(1, 7), rng.Next(2, 20), rng.Next(1, 6)
            let k = rng.Next(1, f + 1)
            torch.manual_seed (int64 seed) |> ignore
            use w = torch.randn([| int64 f; int64 d |], dtype = torch.float64).requires_grad_(true)
            use scores = torch.rand([| int64 b; int64 f |])
            let struct (_, idx) = scores.topk(k, dim = -1)
            use idx = idx
            use v = torch.randn([| int64 b; int64 k |], dtype = torch.float64).requires_grad_(true)
            use g = torch.randn([| int64 b; int64 d |], dtype = torch.float64)
            use y = CoderKernels.decode v idx w
            (use l = (y * g).sum() in l.backward ())
            let gv, gw = values v.grad, values w.grad
            use w2 = w.detach().clone().requires_grad_(true)
            use v2 = v.detach().clone().requires_grad_(true)
            use z = torch.zeros([| int64 b; int64 f |], dtype = torch.float64)
            use dense = z.scatter(-1L, idx, v2)
            use y2 = dense.matmul w2
            (use l = (y2 * g).sum() in l.backward ())
            expectClose 1e-12 y y2 "decode"
            Expect.isLessThanOrEqual (maxAbsDiff gv (values v2.grad)) 1e-10 "∂values"
            Expect.isLessThanOrEqual (maxAbsDiff gw (values w2.grad)) 1e-10 "∂W (only active rows non-zero)"

        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 20 } "sparse decoding (and the sparse encoder backward) gives the dense step's loss, activations and gradients" <| fun (seed: int) ->
            let rng = Random seed
            let kind = activeKinds[rng.Next activeKinds.Length]
            let groupMax = rng.Next 2 = 0
            let act (dSae: int) = if groupMax then GroupMax((divisors dSae)[rng.Next (divisors dSae).Length]) else TopK(rng.Next(1, dSae + 1))
            let cfg = smallConfig rng kind act (rng.Next 2 = 0)
            torch.manual_seed (int64 seed) |> ignore
            use coder = Coder.create cfg torch.CPU
            randomise coder (int64 seed)
            let b = rng.Next(2, 9)
            use x = batchFor cfg b cfg.DIn
            use y = if cfg.Kind = Sae then x.alias() else batchFor cfg b cfg.DOut
            // the pre-activation loss differentiates Pre, so it keeps the dense encoder backward; without it the
            // encoder backward is sparse as well
            let preAct = rng.Next 2 = 0
            let loss =
                { LossConfig.TopK 2 with
                    Auxiliary = NoAuxiliary; Reconstruction = Mse; Sparsity = L1 false; SparsityCoefficient = 0.1
                    PreActCoefficient = (if preAct then 0.01 else 0.0) }
            let train = { TrainConfig.Paper with Loss = loss; Normalise = false; BiasInit = Normalisation.ZeroBias }
            let dense = gradients train coder x y
            let sparse = gradients { train with Compute = { ComputeOptions.Default with SparseDecode = true } } coder x y
            let (l1, n1, p1, a1, g1, _), (l2, n2, p2, a2, g2, sparsePreGrad) = dense, sparse
            Expect.equal sparsePreGrad preAct "the encoder backward is sparse exactly when no loss term differentiates Pre"
            Expect.floatClose { absolute = 1e-4; relative = 1e-4 } l2 l1 "loss"
            Expect.equal n2 n1 "active count"
            Expect.isLessThanOrEqual (maxAbsDiff p2 p1) 1e-4 "prediction"
            Expect.isLessThanOrEqual (maxAbsDiff a2 a1) 1e-5 "activations"
            for (n, gd), (_, gs) in List.zip g1 g2 do
                let scale = max 1.0 (gd |> Array.fold (fun m v -> max m (abs v)) 0.0)
                Expect.isLessThanOrEqual (maxAbsDiff gs gd) (1e-4 * scale) (sprintf "gradient of %s (%A, preAct %b)" n cfg.Activation preAct)

        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 8 } "bf16 products approximate the float32 pass; parameters and predictions stay float32" <| fun (seed: int) ->
            let rng = Random seed
            let kind = activeKinds[rng.Next activeKinds.Length]
            let cfg = smallConfig rng kind (fun _ -> ReLU) true
            torch.manual_seed (int64 seed) |> ignore
            use coder = Coder.create cfg torch.CPU
            randomise coder (int64 seed)
            use scope = torch.NewDisposeScope()
            let x = batchFor cfg 16 cfg.DIn
            let xn = coder.ToLayerMajor(x, cfg.DIn, "x")
            let p32 = coder.PassNormalised xn
            let p16 = coder.PassWith(xn, { ComputeOptions.Default with Dtype = torch.bfloat16 })
            Expect.equal p16.Pre.dtype torch.bfloat16 "pre-activations in the compute dtype"
            Expect.equal p16.Prediction.dtype torch.float32 "predictions in float32"
            Expect.isTrue (coder.Parameters |> List.forall (fun p -> p.dtype = torch.float32)) "master weights stay float32"
            let scale = max 1.0 (values p32.Prediction |> Array.fold (fun m v -> max m (abs v)) 0.0)
            Expect.isLessThanOrEqual (maxAbsDiff (values p16.Prediction) (values p32.Prediction)) (0.05 * scale) "bf16 prediction ≈ float32"

        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 20 } "firing statistics from active features equal the dense update" <| fun (seed: int) ->
            let rng = Random seed
            let nL, b, k, size = rng.Next(1, 4), rng.Next(1, 9), rng.Next(1, 5), rng.Next(1, 4)
            let f = k * size
            torch.manual_seed (int64 seed) |> ignore
            use pre = torch.randn([| int64 nL; int64 b; int64 f |])
            let v, i = SparseActivations.groupMaxSparse k pre
            use v = v
            use i = i
            use dense = SparseActivations.scatterActive pre (v, i)
            use s1 = new FiringStats(nL, f, torch.CPU)
            use s2 = new FiringStats(nL, f, torch.CPU)
            for _ in 1 .. 2 do
                s1.Update dense
                s2.UpdateActive(i, v)
            Expect.sequenceEqual (values s2.Counts) (values s1.Counts) "counts"
            Expect.sequenceEqual (values s2.TokensSinceFired) (values s1.TokensSinceFired) "tokens since fired"
            Expect.equal s2.TotalTokens s1.TotalTokens "tokens"

        test "sparse decoding of a ReLU coder is refused with the option named" {
            use coder = Coder.create (CoderConfig.transcoder "m" 0 8 16) torch.CPU
            let cfg = { TrainConfig.Paper with Compute = { ComputeOptions.Default with SparseDecode = true } }
            let msg = try (CoderTraining.init cfg coder :> IDisposable).Dispose(); "" with :? ArgumentException as e -> e.Message
            Expect.stringContains msg "SparseDecode" "option named"
        }
    ]
