/// Sparse coders: activation functions and their gradients against their definitions, the unit-norm decoder
/// constraint, cross-layer transcoders vs per-layer transcoders, dead-feature losses on the right residual,
/// folding, save/load, evaluation, and training that recovers a planted dictionary.
module Transcoders.Tests.CoderTests

open System
open System.IO
open Expecto
open TorchSharp
open Transcoders.Coders
open Transcoders.Tests.Fixtures

let private dev = torch.CPU
let private kinds = [| Sae; Transcoder; SkipTranscoder; CrossLayerTranscoder |]

let activationTests =
    testList "activations" [
        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 25 } "JumpReLU forward and gradients match the rectangle-kernel definition" <| fun (seed: int) ->
            let rng = Random seed
            let b, f = rng.Next(1, 7), rng.Next(1, 9)
            let eps = 0.05 + rng.NextDouble() * 0.4
            let theta = Array.init f (fun _ -> 0.05 + rng.NextDouble())
            // half of the entries near the threshold so that the kernel is exercised
            let z = Array.init (b * f) (fun i ->
                let th = theta[i % f]
                if rng.Next 2 = 0 then th + (rng.NextDouble() * 2.0 - 1.0) * eps else rng.NextDouble() * 3.0 - 1.0)
            let w = Array.init (b * f) (fun _ -> rng.NextDouble() * 2.0 - 1.0)
            use zt = torch.tensor(z, dtype = torch.float64).reshape(int64 b, int64 f).requires_grad_(true)
            use tt = torch.tensor(theta, dtype = torch.float64).requires_grad_(true)
            use wt = torch.tensor(w, dtype = torch.float64).reshape(int64 b, int64 f)
            use t1 = tt.unsqueeze 0
            use a = SparseActivations.jumpReLU zt t1 eps
            use loss = (a * wt).sum()
            loss.backward()
            let av, gz, gt = values a, values zt.grad, values tt.grad
            for i in 0 .. b * f - 1 do
                let th = theta[i % f]
                let on = z[i] > th
                Expect.equal av[i] (if on then z[i] else 0.0) "a = z·H(z − θ)"
                Expect.equal gz[i] (if on then w[i] else 0.0) "∂a/∂z = H(z − θ)"
            for j in 0 .. f - 1 do
                let expected =
                    seq { for r in 0 .. b - 1 do
                            let i = r * f + j
                            if abs (z[i] - theta[j]) < eps / 2.0 then yield -(theta[j] / eps) * w[i] } |> Seq.sum
                Expect.floatClose Accuracy.high gt[j] expected (sprintf "∂L/∂θ_%d = Σ −(θ/ε)·K((z−θ)/ε)·g" j)

        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 25 } "Step: H(z − θ) forward, no gradient to z, −(1/ε)·K gradient to θ" <| fun (seed: int) ->
            let rng = Random seed
            let b, f = rng.Next(1, 7), rng.Next(1, 9)
            let eps = 0.05 + rng.NextDouble() * 0.4
            let theta = Array.init f (fun _ -> 0.05 + rng.NextDouble())
            let z = Array.init (b * f) (fun i -> let th = theta[i % f] in th + (rng.NextDouble() * 2.0 - 1.0) * eps * 1.5)
            let w = Array.init (b * f) (fun _ -> rng.NextDouble() * 2.0 - 1.0)
            use zt = torch.tensor(z, dtype = torch.float64).reshape(int64 b, int64 f).requires_grad_(true)
            use tt = torch.tensor(theta, dtype = torch.float64).requires_grad_(true)
            use wt = torch.tensor(w, dtype = torch.float64).reshape(int64 b, int64 f)
            use t1 = tt.unsqueeze 0
            use h = SparseActivations.step zt t1 eps
            use loss = (h * wt).sum()
            loss.backward()
            let hv = values h
            for i in 0 .. b * f - 1 do Expect.equal hv[i] (if z[i] > theta[i % f] then 1.0 else 0.0) "H(z − θ)"
            let gz = zt.grad
            Expect.isTrue (isNull gz || (values gz |> Array.forall ((=) 0.0))) "no gradient reaches z through the step"
            let gt = values tt.grad
            for j in 0 .. f - 1 do
                let expected =
                    seq { for r in 0 .. b - 1 do
                            let i = r * f + j
                            if abs (z[i] - theta[j]) < eps / 2.0 then yield -(1.0 / eps) * w[i] } |> Seq.sum
                Expect.floatClose Accuracy.high gt[j] expected "∂L/∂θ = Σ −(1/ε)·K((z−θ)/ε)·g"

        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 25 } "TopK keeps the k largest ReLU values per row and passes gradients only through them" <| fun (seed: int) ->
            let rng = Random seed
            let b, f = rng.Next(1, 6), rng.Next(2, 12)
            let k = rng.Next(1, f + 1)
            torch.manual_seed (int64 seed) |> ignore
            use z = torch.randn([| int64 b; int64 f |], dtype = torch.float64).requires_grad_(true)
            use w = torch.randn([| int64 b; int64 f |], dtype = torch.float64)
            use a = SparseActivations.topK k z
            use loss = (a * w).sum()
            loss.backward()
            let zv, av, wv, gv = values z, values a, values w, values z.grad
            for r in 0 .. b - 1 do
                let row = zv[r * f .. r * f + f - 1] |> Array.map (max 0.0)
                let kth = (Array.sortDescending row)[k - 1]
                for j in 0 .. f - 1 do
                    let i = r * f + j
                    let kept = zv[i] > 0.0 && zv[i] >= kth
                    Expect.equal av[i] (if kept then zv[i] else 0.0) "kept values pass unchanged, the rest are 0"
                    Expect.equal gv[i] (if kept then wv[i] else 0.0) "gradient only through kept latents"
                Expect.isLessThanOrEqual (av[r * f .. r * f + f - 1] |> Array.filter (fun v -> v <> 0.0) |> Array.length) k "at most k active"

        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 25 } "BatchTopK keeps exactly round(k·B) activations per layer, the largest ones" <| fun (seed: int) ->
            let rng = Random seed
            let nL, b, f = rng.Next(1, 4), rng.Next(2, 9), rng.Next(3, 12)
            let k = 0.5 + rng.NextDouble() * float (f - 1)
            torch.manual_seed (int64 seed) |> ignore
            use zraw = torch.randn([| int64 nL; int64 b; int64 f |], dtype = torch.float64)
            use z0 = zraw.abs().add(sc 0.01) // all positive, so exactly round(k·B) are non-zero
            use z = z0.detach().requires_grad_(true)
            use w = torch.randn([| int64 nL; int64 b; int64 f |], dtype = torch.float64)
            let a, minKept = SparseActivations.batchTopK k z
            use a = a
            use minKept = minKept
            use loss = (a * w).sum()
            loss.backward()
            let keep = int (Math.Round(k * float b))
            let zv, av, gv, wv, mv = values z, values a, values z.grad, values w, values minKept
            for l in 0 .. nL - 1 do
                let n = b * f
                let zs = zv[l * n .. l * n + n - 1]
                let asl = av[l * n .. l * n + n - 1]
                let nonzero = asl |> Array.filter (fun v -> v <> 0.0)
                Expect.equal nonzero.Length keep "exactly round(k·B) activations kept"
                let kth = (Array.sortDescending zs)[keep - 1]
                for i in 0 .. n - 1 do
                    let kept = zs[i] >= kth
                    Expect.equal asl[i] (if kept then zs[i] else 0.0) "the kept ones are the largest"
                    Expect.equal gv[l * n + i] (if kept then wv[l * n + i] else 0.0) "gradient only through kept latents"
                Expect.equal mv[l] kth "smallest kept value reported for threshold calibration"
    ]

let configTests =
    testList "config" [
        test "invalid configurations are rejected with the field named" {
            let ok = CoderConfig.transcoder "m" 2 8 32
            let msg (c: CoderConfig) =
                try CoderConfig.validate c |> ignore; "" with CoderConfigError m -> m
            Expect.stringContains (msg { ok with DSae = 0 }) "DSae" "DSae named"
            Expect.stringContains (msg { ok with Activation = TopK 40 }) "TopK" "TopK k named"
            Expect.stringContains (msg { ok with Activation = GroupMax 5 }) "GroupMax" "GroupMax k must divide d_sae"
            Expect.stringContains (msg { ok with Activation = JumpReLU { InitialThreshold = -1.0; Bandwidth = 0.1 } }) "InitialThreshold" "threshold named"
            Expect.stringContains (msg { CoderConfig.sae "m" "blocks.0.hook_resid_pre" 0 8 16 with DOut = 9 }) "DOut" "SAE DOut = DIn"
            Expect.stringContains (msg { ok with Layers = [| 1; 2 |] }) "Layers" "one layer for a transcoder"
            Expect.stringContains (msg { CoderConfig.crossLayer "m" [| 0; 1; 2 |] 8 16 with Layers = [| 2; 1; 0 |] }) "ascending" "CLT layers ascending"
            Expect.stringContains (msg { ok with Scale = { In = [| 0.0 |]; Out = [| 1.0 |] } }) "Scale" "scale named"
            Expect.throwsT<CoderConfigError> (fun () -> CoderConfig.validate { ok with DIn = -1 } |> ignore) "a typed error"
            Expect.equal (CoderConfig.validate ok) ok "a valid config passes unchanged"
        }
        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 40 } "JSON round trip preserves every field" <| fun (seed: int) ->
            let rng = Random seed
            let kind = kinds[rng.Next kinds.Length]
            let act (dSae: int) =
                match rng.Next 5 with
                | 0 -> ReLU
                | 1 -> JumpReLU { InitialThreshold = rng.NextDouble() + 0.01; Bandwidth = rng.NextDouble() + 0.01 }
                | 2 -> TopK(rng.Next(1, dSae + 1))
                | 3 -> GroupMax(let ds = [| for k in 1 .. dSae do if dSae % k = 0 then yield k |] in ds[rng.Next ds.Length])
                | _ -> BatchTopK(rng.NextDouble() * float (dSae - 1) + 0.5)
            let c = smallConfig rng kind act (rng.Next 2 = 0)
            let nL = c.NLayers
            let s = Array.init nL (fun _ -> rng.NextDouble() + 0.1)
            let c = { c with Scale = { In = s; Out = (if kind = Sae then s else Array.init nL (fun _ -> rng.NextDouble() + 0.1)) }
                             FoldedScale = (if rng.Next 2 = 0 then None else Some(ActivationScale.Ones nL)); Model = sprintf "model-%d" seed }
            let back = CoderConfig.ofJson "roundtrip.json" (CoderConfig.toJson c)
            Expect.equal back c "config survives JSON"
        test "a JSON file of another format is rejected clearly" {
            let ex (json: string) = try CoderConfig.ofJson "x.json" json |> ignore; "" with CoderConfigError m -> m
            Expect.stringContains (ex "{\"d_in\": 3}") "format" "missing format field named"
            Expect.stringContains (ex "[1,2]") "object" "not an object"
            Expect.stringContains (ex "{not json") "not valid JSON" "bad JSON"
            let good = CoderConfig.toJson (CoderConfig.transcoder "m" 1 8 16)
            Expect.stringContains (ex (good.Replace("\"d_sae\": 16", "\"d_sae\": -16"))) "DSae" "invalid value named"
            Expect.stringContains (ex (good.Replace("\"relu\"", "\"gelu\""))) "gelu" "unknown activation named"
        }
    ]

/// Runs `f` with torch limited to `n` intra-op threads (restored afterwards). The planted-dictionary runs are
/// thousands of tiny kernels, where a second thread only adds synchronisation, and on a busy machine OpenMP's
/// spinning barriers make them several times slower; their tests run sequenced, so no other test sees the change.
let lossTests =
    testList "losses" [
        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 15 } "each loss term equals its formula computed element by element" <| fun (seed: int) ->
            let rng = Random seed
            let nL, b, d, f = rng.Next(1, 4), rng.Next(2, 6), rng.Next(2, 6), rng.Next(2, 8)
            torch.manual_seed (int64 seed) |> ignore
            use pred = torch.randn([| int64 nL; int64 b; int64 d |], dtype = torch.float64)
            use target = torch.randn([| int64 nL; int64 b; int64 d |], dtype = torch.float64)
            use acts = torch.rand([| int64 nL; int64 b; int64 f |], dtype = torch.float64)
            use pre = torch.randn([| int64 nL; int64 b; int64 f |], dtype = torch.float64)
            use norms = torch.rand([| int64 nL; int64 f |], dtype = torch.float64).add(sc 0.5)
            use theta = torch.rand([| int64 nL; int64 f |], dtype = torch.float64)
            use mask = torch.rand([| int64 nL; int64 f |]).gt(sc 0.5)
            let p, y, a, z, n, th, m = values pred, values target, values acts, values pre, values norms, values theta, values mask
            let at l t j = (l * b + t) * d + j
            let af l t i = (l * b + t) * f + i
            let fb = float b
            let mse = seq { for l in 0 .. nL - 1 do for t in 0 .. b - 1 do for j in 0 .. d - 1 -> (p[at l t j] - y[at l t j]) ** 2.0 } |> Seq.sum
            Expect.floatClose Accuracy.high (values (Losses.mse pred target)).[0] (mse / fb) "MSE = mean_t Σ (ŷ − y)²"
            let nmse =
                seq { for l in 0 .. nL - 1 do
                        for t in 0 .. b - 1 do
                            let ny = sqrt (Seq.sum (seq { for j in 0 .. d - 1 -> y[at l t j] ** 2.0 }))
                            for j in 0 .. d - 1 -> (p[at l t j] - y[at l t j]) ** 2.0 / ny } |> Seq.average
            Expect.floatClose Accuracy.high (values (Losses.normalizedMse pred target)).[0] nmse "paper: mean (ŷ − y)²/‖y‖"
            let var =
                seq { for l in 0 .. nL - 1 do
                        for j in 0 .. d - 1 do
                            let mean = Seq.average (seq { for t in 0 .. b - 1 -> y[at l t j] })
                            for t in 0 .. b - 1 -> (y[at l t j] - mean) ** 2.0 } |> Seq.sum
            Expect.floatClose Accuracy.high (values (Losses.fvu pred target)).[0] (mse / var) "FVU"
            let sumF g = seq { for l in 0 .. nL - 1 do for t in 0 .. b - 1 do for i in 0 .. f - 1 -> g l t i } |> Seq.sum
            Expect.floatClose Accuracy.high (values (Losses.l1 acts None)).[0] (sumF (fun l t i -> abs a[af l t i]) / fb) "L1"
            Expect.floatClose Accuracy.high (values (Losses.l1 acts (Some norms))).[0] (sumF (fun l t i -> abs a[af l t i] * n[l * f + i]) / fb) "decoder-norm weighted L1"
            Expect.floatClose Accuracy.high (values (Losses.tanhPenalty 4.0 acts norms)).[0] (sumF (fun l t i -> tanh (4.0 * n[l * f + i] * a[af l t i])) / fb) "tanh(c·‖W_dec‖·a)"
            Expect.floatClose Accuracy.high (values (Losses.l0 pre theta 0.1)).[0] (sumF (fun l t i -> if z[af l t i] > th[l * f + i] then 1.0 else 0.0) / fb) "L0 counts z > θ"
            Expect.floatClose Accuracy.high (values (Losses.preAct pre theta norms (Some mask))).[0]
                (sumF (fun l t i -> m[l * f + i] * max 0.0 (th[l * f + i] - z[af l t i]) * n[l * f + i]) / fb) "pre-activation loss on masked features"

        test "training a JumpReLU coder with the L0 penalty raises thresholds and lowers L0" {
            torch.manual_seed 8L |> ignore
            let cfg = { CoderConfig.sae "m" "blocks.0.hook_resid_pre" 0 8 32 with Activation = JumpReLU { InitialThreshold = 0.1; Bandwidth = 0.5 } }
            let tc = { TrainConfig.Paper with
                         Steps = 60; Lr = 0.05; Schedule = { WarmupSteps = 0; DecayFraction = 0.0; FinalFraction = 0.0 }
                         Loss = { LossConfig.Anthropic 1.0 with Sparsity = L0; PreActCoefficient = 0.0 }; BiasInit = Normalisation.ZeroBias }
            let state, logs = CoderTraining.run { tc with LogEvery = 1 } cfg dev (fun _ -> let x = torch.randn(64L, 8L) in x, x)
            use state = state
            let first, last = List.head logs, List.last logs
            Expect.isLessThan last.L0 (0.5 * first.L0) (sprintf "L0 %.2f → %.2f" first.L0 last.L0)
            let th = values state.Coder.Threshold.Value
            Expect.isGreaterThan (Array.average th) 0.2 "thresholds moved up from 0.1 through the straight-through estimator"
        }
    ]

let decoderTests =
    testList "decoder constraint" [
        test "the gradient component parallel to each decoder row is removed" {
            let rng = Random 7
            for kind in kinds do
                let cfg = smallConfig rng kind (fun _ -> ReLU) false
                use c = Coder.create cfg dev
                randomise c 11L
                let rs = c.WDec |> Array.map (fun w -> torch.randn(w.shape))
                use loss = Array.fold2 (fun (acc: torch.Tensor) (w: Modules.Parameter) (r: torch.Tensor) -> acc + (w * r).sum()) (torch.zeros([||])) c.WDec rs
                loss.backward()
                DecoderConstraint.removeParallelGradient c
                for l in 0 .. c.WDec.Length - 1 do
                    let w = c.WDec[l]
                    let rowLen = int (w.shape[1] * w.shape[2])
                    let wv, rv, gv = values w, values rs[l], values w.grad
                    for i in 0 .. int w.shape[0] - 1 do
                        let row (a: float[]) = a[i * rowLen .. i * rowLen + rowLen - 1]
                        let wi, ri, gi = row wv, row rv, row gv
                        let dot a b = Array.fold2 (fun s x y -> s + x * y) 0.0 a b
                        let coef = dot ri wi / dot wi wi
                        let expected = Array.map2 (fun r w -> r - coef * w) ri wi
                        Expect.isLessThan (maxAbsDiff gi expected) 1e-5 "g' = g − (g·w/‖w‖²)·w"
                        Expect.isLessThan (abs (dot gi wi)) 1e-4 "g'·w = 0"
        }
        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 12 } "unit decoder norms hold after every training step (random configs)" <| fun (seed: int) ->
            let rng = Random seed
            let kind = kinds[rng.Next kinds.Length]
            let choice = rng.Next 4
            let act (dSae: int) =
                match choice with
                | 0 -> ReLU
                | 1 -> JumpReLU { InitialThreshold = 0.05; Bandwidth = 0.1 }
                | 2 -> TopK(rng.Next(1, min 4 dSae + 1))
                | _ -> BatchTopK(float (rng.Next(1, 4)))
            let cfg = smallConfig rng kind act (rng.Next 2 = 0)
            let loss =
                match cfg.Activation with
                | ReLU -> { LossConfig.Paper with SparsityCoefficient = 1e-2 }
                | JumpReLU _ -> { LossConfig.Anthropic 1e-2 with Sparsity = (if rng.Next 2 = 0 then L0 else Tanh 4.0); PreActCoefficient = 1e-3 }
                | _ -> LossConfig.TopK 2
            let tc = { TrainConfig.Paper with Steps = 4; Lr = 1e-2; Schedule = { WarmupSteps = 0; DecayFraction = 0.0; FinalFraction = 0.0 }
                                              Loss = loss; DeadAfterTokens = 8L; BatchSize = 16 }
            torch.manual_seed (int64 seed) |> ignore
            use c = Coder.create cfg dev
            use before = (c.WDec[0]).detach().clone()
            use state = CoderTraining.init tc c
            for s in 0 .. 3 do
                use x = batchFor cfg 16 cfg.DIn
                use y = if kind = Sae then x.alias() else batchFor cfg 16 cfg.DOut
                CoderTraining.step state x y |> ignore
                let norms = values (c.DecoderNorms())
                Expect.isLessThan (norms |> Array.map (fun n -> abs (n - 1.0)) |> Array.max) 1e-5 (sprintf "all decoder norms are 1 after step %d" s)
            Expect.isGreaterThan (maxAbsDiff (values before) (values c.WDec[0])) 1e-6 "the steps moved the decoder"
    ]

let cltTests =
    testList "cross-layer transcoder" [
        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 10 } "with only same-layer decoders it computes what per-layer transcoders compute" <| fun (seed: int) ->
            let rng = Random seed
            let nL, d, dSae = rng.Next(2, 5), rng.Next(3, 8), rng.Next(4, 12)
            let act = if rng.Next 2 = 0 then ReLU else JumpReLU { InitialThreshold = 0.1; Bandwidth = 0.1 }
            let inputBias = rng.Next 2 = 0
            let cfg = { CoderConfig.crossLayer "m" (Array.init nL id) d dSae with Activation = act; InputBias = inputBias; Decoder = UnitNorm }
            use clt = Coder.create cfg dev
            randomise clt (int64 seed)
            use _ = torch.no_grad ()
            for l in 0 .. nL - 1 do
                if nL - l > 1 then clt.WDec[l].narrow(1, 1L, int64 (nL - l - 1)).zero_() |> ignore
            use x = torch.randn([| 5L; int64 nL; int64 d |])
            use y = clt.Forward x
            for l in 0 .. nL - 1 do
                let sl (name: string) = clt[name].narrow(0, int64 l, 1L)
                let tensors =
                    [ yield "W_enc", sl "W_enc"
                      yield "b_enc", sl "b_enc"
                      match act with JumpReLU _ -> yield "log_threshold", sl "log_threshold" | _ -> ()
                      yield "W_dec_0", clt.WDec[l].narrow(1, 0L, 1L)
                      yield "b_dec", sl "b_dec"
                      if inputBias then yield "b_in", sl "b_in" ]
                let tcfg = { CoderConfig.transcoder "m" l d dSae with Activation = act; InputBias = inputBias }
                use tc = Coder.ofTensors tcfg dev tensors
                use xl = x.select(1, int64 l)
                use expected = tc.Forward xl
                use actual = y.select(1, int64 l)
                expectClose 1e-6 actual expected (sprintf "layer %d output" l)
                use ea = tc.Encode xl
                use aa = (clt.Encode x).select(1, int64 l)
                expectClose 1e-6 aa ea (sprintf "layer %d activations" l)

        test "decoding is the explicit double sum ŷ_ℓ' = Σ_{ℓ≤ℓ'} a_ℓ·W_dec^{ℓ→ℓ'} + b_dec_ℓ'" {
            let nL, d, dSae = 4, 5, 7
            use clt = Coder.create (CoderConfig.crossLayer "m" [| 0; 1; 2; 3 |] d dSae) dev
            randomise clt 3L
            use _ = torch.no_grad ()
            use acts = torch.rand([| 6L; int64 nL; int64 dSae |])
            use y = clt.Decode acts
            for lp in 0 .. nL - 1 do
                let mutable expected = clt.BDec[lp].unsqueeze(0).expand(6L, int64 d)
                for l in 0 .. lp do
                    let w = clt.WDec[l].select(1, int64 (lp - l)) // [d_sae, d]
                    expected <- expected + acts.select(1, int64 l).matmul w
                expectClose 1e-6 (y.select(1, int64 lp)) expected (sprintf "target layer %d" lp)
        }
    ]

let deadFeatureTests =
    testList "dead features" [
        test "AuxK and ghost grads fit the residual target − prediction (not input − prediction)" {
            torch.manual_seed 5L |> ignore
            let d, dSae, b = 6, 12, 32
            use c = Coder.create { CoderConfig.transcoder "m" 0 d dSae with InputBias = false } dev
            randomise c 5L
            use x = torch.randn([| int64 b; int64 d |])
            use y = torch.randn([| int64 b; int64 d |]).mul(sc 3.0).add(sc 1.0)
            use xl = c.ToLayerMajor(x, d, "x")
            use yl = c.ToLayerMajor(y, d, "y")
            let pass = c.PassNormalised xl
            use dead = torch.ones([| 1L; int64 dSae |], dtype = torch.ScalarType.Bool)
            let kAux = 4
            use aux = Losses.auxK c pass yl dead kAux 0.5
            // by hand: top-kAux ReLU'd pre-activations of the dead latents (all of them), decoded without bias
            let w = c.WDec[0].reshape(int64 dSae, int64 d)
            let r = pass.Pre[0].relu()
            let struct (v, i) = r.topk(kAux, dim = -1)
            let auxActs = torch.zeros_like(r).scatter(-1L, i, v)
            let eHat = auxActs.matmul w
            let pred = pass.Prediction[0]
            let handLoss (residual: torch.Tensor) =
                let var = (y - y.mean([| 0L |], keepdim = true)).square().sum()
                ((eHat - residual).square().sum() / var * sc 0.5).item<float32> () |> float
            let right = handLoss (y - pred)
            let wrong = handLoss (x - pred)
            Expect.floatClose Accuracy.medium (float (aux.item<float32> ())) right "AuxK = ½·‖ê − (y − ŷ)‖² / Σ‖y − ȳ‖²"
            Expect.isGreaterThan (abs (right - wrong)) (0.1 * right) "the input-based residual would give another loss"
            // ghost grads, by the paper's formula with the residual y − ŷ
            use recon = Losses.normalizedMse pass.Prediction yl
            use ghost = Losses.ghostGrads c pass yl dead recon
            let ghostHand (residual: torch.Tensor) =
                let g = pass.Pre[0].exp().matmul w
                let rn = residual.square().sum([| 1L |], keepdim = true).sqrt()
                let gn = g.square().sum([| 1L |], keepdim = true).sqrt()
                let gs = g * (rn / (gn * sc 2.0 + sc 1e-6))
                let ghostEl = (gs - residual).square() / rn
                let mainEl = (pred - y).square() / y.square().sum([| 1L |], keepdim = true).sqrt()
                (mainEl / (ghostEl + sc 1e-6) * ghostEl).mean().item<float32> () |> float
            Expect.floatClose Accuracy.medium (float (ghost.item<float32> ())) (ghostHand (y - pred)) "ghost loss uses y − ŷ"
            // the ghost gradient pulls the dead decoders towards the right residual: one small step lowers ‖g − (y − ŷ)‖
            ghost.backward()
            let fitBefore =
                use _ = torch.no_grad ()
                let g = pass.Pre[0].exp().matmul w
                let cosine = (g * (y - pred)).sum() / (g.norm() * (y - pred).norm())
                cosine.item<float32> ()
            use _ = torch.no_grad ()
            for p in c.WDec do p.sub_(p.grad.mul(sc 0.5)) |> ignore
            let wAfter = c.WDec[0].reshape(int64 dSae, int64 d)
            let g = pass.Pre[0].exp().matmul wAfter
            let fitAfter = ((g * (y - pred)).sum() / (g.norm() * (y - pred).norm())).item<float32> ()
            Expect.isGreaterThan fitAfter fitBefore "a gradient step aligns the ghost output with target − prediction"
        }
        test "no dead feature, no auxiliary loss" {
            use c = Coder.create (CoderConfig.transcoder "m" 0 5 8) dev
            use x = torch.randn([| 1L; 10L; 5L |])
            let p = c.PassNormalised x
            use alive = torch.zeros([| 1L; 8L |], dtype = torch.ScalarType.Bool)
            Expect.equal ((Losses.auxK c p x alive 4 1.0).item<float32> ()) 0.0f "AuxK is 0"
            Expect.equal ((Losses.ghostGrads c p x alive (torch.ones([||]))).item<float32> ()) 0.0f "ghost is 0"
        }
        test "firing statistics track tokens since last fire and frequencies" {
            use s = new FiringStats(1, 3, dev)
            use a1 = torch.tensor([| 1.0f; 0.0f; 0.0f; 0.0f; 0.0f; 0.0f |]).reshape(1L, 2L, 3L)
            s.Update a1
            use a2 = torch.tensor([| 0.0f; 2.0f; 0.0f; 0.0f; 0.0f; 0.0f; 0.0f; 0.0f; 0.0f |]).reshape(1L, 3L, 3L)
            s.Update a2
            Expect.sequenceEqual (values s.TokensSinceFired) [| 3.0; 0.0; 5.0 |] "tokens since last fire"
            Expect.sequenceEqual (values (s.Dead 4L)) [| 0.0; 0.0; 1.0 |] "dead after 4 silent tokens"
            Expect.sequenceEqual (values (s.Frequencies())) [| 0.2; 0.2; 0.0 |] "firing frequencies"
        }
        test "resampling rewrites dead features (unit decoder, scaled encoder, zero bias, fresh Adam moments)" {
            torch.manual_seed 9L |> ignore
            let d, dSae = 6, 10
            use c = Coder.create (CoderConfig.transcoder "m" 0 d dSae) dev
            randomise c 9L
            DecoderConstraint.renormalise c
            use opt = CoderOptimizer.create c.NamedParameters 0.9 0.999 1e-8
            use stats = new FiringStats(1, dSae, dev)
            // fill the moments
            let x = torch.randn([| 1L; 64L; int64 d |])
            let y = torch.randn([| 1L; 64L; int64 d |])
            let p = c.PassNormalised x
            (Losses.mse p.Prediction y).backward()
            opt.SetLearningRate 1e-3
            opt.Step()
            use dead = torch.zeros([| 1L; int64 dSae |], dtype = torch.ScalarType.Bool)
            dead[0, 2] <- torch.tensor(true)
            dead[0, 7] <- torch.tensor(true)
            let before = values c.WEnc
            let n = DeadFeatures.resample c (fun name mask -> opt.ResetMasked(name, mask)) stats dead x y 0.2
            Expect.equal n 2 "two features resampled"
            let norms = values (c.DecoderNorms())
            for i in [ 2; 7 ] do
                Expect.floatClose Accuracy.medium norms[i] 1.0 "unit decoder"
                Expect.equal (values c.BEnc).[i] 0.0 "b_enc zero"
                let m, v = opt.Moments "W_dec_0"
                Expect.isTrue (values (m[i]) |> Array.forall ((=) 0.0)) "first moment reset"
                Expect.isTrue (values (v[i]) |> Array.forall ((=) 0.0)) "second moment reset"
            let after = values c.WEnc
            for j in 0 .. d - 1 do
                for i in 0 .. dSae - 1 do
                    if i <> 2 && i <> 7 then Expect.equal after[j * dSae + i] before[j * dSae + i] "alive encoders untouched"
            // the new decoder direction is the residual of some token
            let res = values ((y - p.Prediction.detach())[0])
            let dec = values (c.WDec[0].reshape(int64 dSae, int64 d))
            let best =
                [ for t in 0 .. 63 ->
                    let r = res[t * d .. t * d + d - 1]
                    let nr = sqrt (Array.sumBy (fun v -> v * v) r)
                    Array.fold2 (fun s a b -> s + a * b) 0.0 r dec[2 * d .. 2 * d + d - 1] / nr ] |> List.max
            Expect.isGreaterThan best 0.9999 "decoder = normalised residual of a sampled token"
        }
    ]

let foldingTests =
    testList "folding" [
        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 16 } "folding scales and input bias preserves outputs in the model's units" <| fun (seed: int) ->
            let rng = Random seed
            let kind = kinds[rng.Next kinds.Length]
            let act (dSae: int) = match rng.Next 3 with 0 -> ReLU | 1 -> JumpReLU { InitialThreshold = 0.1; Bandwidth = 0.1 } | _ -> TopK(rng.Next(1, dSae + 1))
            let cfg = smallConfig rng kind act true
            let nL = cfg.NLayers
            let sIn = Array.init nL (fun _ -> 0.2 + 3.0 * rng.NextDouble())
            let sOut = if kind = Sae then sIn else Array.init nL (fun _ -> 0.2 + 3.0 * rng.NextDouble())
            use c = Coder.create cfg dev
            randomise c (int64 seed)
            c.SetScale { In = sIn; Out = sOut }
            use x = batchFor cfg 9 cfg.DIn
            let y0, a0 = c.ForwardWithActivations x
            use f = CoderFile.folded c
            Expect.isTrue f.Config.Scale.IsOne "folded coder runs at scale 1"
            Expect.equal f.Config.FoldedScale (Some { In = sIn; Out = sOut }) "folded scale recorded"
            Expect.isTrue (f.BIn.IsNone) "input bias folded"
            let y1, a1 = f.ForwardWithActivations x
            expectClose 1e-5 y1 y0 "same predictions"
            expectClose 1e-5 a1 a0 "same feature activations"
    ]

let fileTests =
    testList "save and load" [
        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 16 } "save → load gives identical outputs" <| fun (seed: int) ->
            let rng = Random seed
            let kind = kinds[rng.Next kinds.Length]
            let act (dSae: int) =
                match rng.Next 4 with
                | 0 -> ReLU
                | 1 -> JumpReLU { InitialThreshold = 0.1; Bandwidth = 0.1 }
                | 2 -> TopK(rng.Next(1, dSae + 1))
                | _ -> BatchTopK 2.0
            let cfg = smallConfig rng kind act (rng.Next 2 = 0)
            use c = Coder.create cfg dev
            randomise c (int64 seed)
            let nL = cfg.NLayers
            let s = Array.init nL (fun _ -> 0.5 + rng.NextDouble())
            c.SetScale { In = s; Out = (if kind = Sae then s else Array.init nL (fun _ -> 0.5 + rng.NextDouble())) }
            use dir = new TempDir()
            let path = if rng.Next 2 = 0 then dir.File "coder-folder" else dir.File "named.safetensors"
            CoderFile.save path c
            use back = CoderFile.load path dev
            use x = batchFor cfg 7 cfg.DIn
            let y0, a0 = c.ForwardWithActivations x
            let y1, a1 = back.ForwardWithActivations x
            expectClose 1e-5 y1 y0 "same predictions after reload"
            expectClose 1e-5 a1 a0 "same activations after reload"
            Expect.equal back.Config.Model "test-model" "model recorded"
            Expect.equal back.Config.HookIn cfg.HookIn "hooks recorded"

        test "SAELens keys and shapes for a transcoder; W_dec_ℓ blocks for a cross-layer transcoder" {
            use dir = new TempDir()
            use tc = Coder.create { CoderConfig.skipTranscoder "gpt2" 3 8 20 with Activation = JumpReLU JumpReLUSpec.Default } dev
            CoderFile.save (dir.File "tc") tc
            let entries = Transcoders.Files.Safetensors.load (dir.File "tc/coder.safetensors") dev
            let shapes = entries |> List.map (fun (n, t) -> n, List.ofArray t.shape) |> Map.ofList
            Expect.equal shapes (Map [ "W_enc", [ 8L; 20L ]; "b_enc", [ 20L ]; "threshold", [ 20L ]; "W_dec", [ 20L; 8L ]; "b_dec", [ 8L ]; "W_skip", [ 8L; 8L ] ]) "transcoder keys"
            use clt = Coder.create (CoderConfig.crossLayer "m" [| 0; 1; 2 |] 4 6) dev
            CoderFile.save (dir.File "clt.safetensors") clt
            let shapes = Transcoders.Files.Safetensors.load (dir.File "clt.safetensors") dev |> List.map (fun (n, t) -> n, List.ofArray t.shape) |> Map.ofList
            Expect.equal shapes (Map [ "W_enc", [ 3L; 4L; 6L ]; "b_enc", [ 3L; 6L ]; "threshold", [ 3L; 6L ]; "b_dec", [ 3L; 4L ]
                                       "W_dec_0", [ 6L; 3L; 4L ]; "W_dec_1", [ 6L; 2L; 4L ]; "W_dec_2", [ 6L; 1L; 4L ] ]) "CLT keys"
            Expect.isTrue (File.Exists(dir.File "clt.json")) "config beside the weights"
        }

        test "the transcoder paper's checkpoints convert exactly (input bias folded, b_dec_out as b_dec)" {
            torch.manual_seed 13L |> ignore
            use dir = new TempDir()
            let dIn, dSae, dOut = 6, 10, 5
            let wEnc, bEnc, wDec = torch.randn(int64 dIn, int64 dSae), torch.randn(int64 dSae), torch.randn(int64 dSae, int64 dOut)
            let bDec, bDecOut = torch.randn(int64 dIn), torch.randn(int64 dOut)
            let path = dir.File "paper.safetensors"
            Transcoders.Files.Safetensors.save path Map.empty [ "W_enc", wEnc; "b_enc", bEnc; "W_dec", wDec; "b_dec", bDec; "b_dec_out", bDecOut ]
            use c = CoderFile.importPaper path "gpt2" 8 dev
            use x = torch.randn(7L, int64 dIn)
            // the paper's forward pass, sae_training/sparse_autoencoder.py
            let f = ((x - bDec).matmul(wEnc) + bEnc).relu()
            let expected = f.matmul(wDec) + bDecOut
            let y, a = c.ForwardWithActivations x
            expectClose 1e-5 y expected "same predictions"
            expectClose 1e-5 a f "same features"
            Expect.equal c.Config.HookIn [| "blocks.8.ln2.hook_normalized" |] "reads the MLP input"
            Expect.equal c.Config.HookOut [| "blocks.8.hook_mlp_out" |] "predicts the MLP output"
            CoderFile.save (dir.File "ours") c
            use back = CoderFile.load (dir.File "ours") dev
            expectClose 1e-5 (back.Forward x) expected "and through our format"
        }
        test "a paper checkpoint records whether its decoder rows have unit norm, and keeps that through our format" {
            torch.manual_seed 14L |> ignore
            use dir = new TempDir()
            let dIn, dSae, dOut = 6, 10, 5
            let wEnc, bEnc, bDec, bDecOut = torch.randn(int64 dIn, int64 dSae), torch.randn(int64 dSae), torch.randn(int64 dIn), torch.randn(int64 dOut)
            let free = torch.randn(int64 dSae, int64 dOut) * 3.0
            let unit = free / free.square().sum(1L, true).sqrt()
            for wDec, expected in [ free, Free; unit, UnitNorm ] do
                let path = dir.File "paper.safetensors"
                Transcoders.Files.Safetensors.save path Map.empty [ "W_enc", wEnc; "b_enc", bEnc; "W_dec", wDec; "b_dec", bDec; "b_dec_out", bDecOut ]
                use c = CoderFile.importPaper path "gpt2" 8 dev
                Expect.equal c.Config.Decoder expected (sprintf "decoder norms recorded as %A" expected)
                CoderFile.save (dir.File "ours") c
                use back = CoderFile.load (dir.File "ours") dev
                Expect.equal back.Config.Decoder expected "and saved as such"
                use x = torch.randn(4L, int64 dIn)
                expectClose 1e-5 (back.Forward x) (c.Forward x) "same predictions"
        }
        test "non-finite coder weights are refused with the file and key named, unless allowed" {
            use dir = new TempDir()
            use c = Coder.create (CoderConfig.transcoder "m" 0 4 6) dev
            CoderFile.save (dir.File "tc") c
            let st = dir.File "tc/coder.safetensors"
            let all = Transcoders.Files.Safetensors.load st dev
            let meta = (use r = Transcoders.Files.Safetensors.Reader.Open st in r.Metadata)
            Transcoders.Files.Safetensors.save st meta (all |> List.map (fun (n, t) -> if n = "W_dec" then (let u = t.clone() in u.[2L, 1L] <- torch.tensor(infinity, dtype = torch.float32); n, u) else n, t))
            let e = Expect.throwsC (fun () -> CoderFile.load (dir.File "tc") dev |> ignore) id
            Expect.isTrue (e :? CoderFile.CoderFileError) (sprintf "a CoderFileError, got %s" (e.GetType().Name))
            for fragment in [ st; "'W_dec'"; "non-finite" ] do Expect.stringContains e.Message fragment fragment
            use allowed = CoderFile.loadWith { Transcoders.Models.LoadOptions.Default with AllowNonFinite = true } (dir.File "tc") dev
            Expect.isTrue (allowed.StateDict() |> List.exists (fun (_, t) -> not (t.isfinite().all().item<bool> ()))) "allowed: loaded as stored"
            for _, t in all do t.Dispose()
        }
        test "files of another format are rejected with the file and key named" {
            use dir = new TempDir()
            let cfg = CoderConfig.transcoder "m" 0 4 6
            use c = Coder.create cfg dev
            let err (f: unit -> unit) = try f (); "" with CoderFile.CoderFileError m -> m
            Expect.stringContains (err (fun () -> CoderFile.load (dir.File "nothing") dev |> ignore)) "coder config not found" "no config"
            let write (name: string) (tensors: (string * torch.Tensor) list) =
                Transcoders.Files.Safetensors.save (dir.File (name + ".safetensors")) Map.empty tensors
                File.WriteAllText(dir.File (name + ".json"), CoderConfig.toJson { cfg with InputBias = false })
            let good = [ "W_enc", torch.zeros(4L, 6L); "b_enc", torch.zeros(6L); "W_dec", torch.zeros(6L, 4L); "b_dec", torch.zeros(4L) ]
            write "ok" good
            use loaded = CoderFile.load (dir.File "ok.json") dev
            Expect.equal loaded.Config.DSae 6 "a well-formed file loads"
            write "missing" (good |> List.filter (fun (n, _) -> n <> "b_enc"))
            let m = err (fun () -> CoderFile.load (dir.File "missing.safetensors") dev |> ignore)
            Expect.stringContains m "'b_enc'" "missing key named"
            Expect.stringContains m "missing.safetensors" "file named"
            write "shape" (("W_enc", torch.zeros(6L, 4L)) :: (good |> List.filter (fun (n, _) -> n <> "W_enc")))
            let m = err (fun () -> CoderFile.load (dir.File "shape.safetensors") dev |> ignore)
            Expect.stringContains m "'W_enc'" "mis-shaped key named"
            Expect.stringContains m "[|6L; 4L|]" "its shape shown"
            write "extra" (("W_dec_out", torch.zeros(4L)) :: good)
            Expect.stringContains (err (fun () -> CoderFile.load (dir.File "extra.safetensors") dev |> ignore)) "unexpected tensor 'W_dec_out'" "extra key named"
            write "ints" (("b_enc", torch.zeros(6L, dtype = torch.int32)) :: (good |> List.filter (fun (n, _) -> n <> "b_enc")))
            Expect.stringContains (err (fun () -> CoderFile.load (dir.File "ints.safetensors") dev |> ignore)) "dtype" "integer dtype refused"
            File.WriteAllText(dir.File "bad.json", "{\"architecture\": \"standard\", \"d_in\": 4}")
            Expect.stringContains (err (fun () -> CoderFile.load (dir.File "bad.json") dev |> ignore)) "format" "SAELens-only config refused"
        }
    ]

let evalTests =
    testList "evaluation" [
        test "metrics over several batches equal the same metrics over their concatenation" {
            torch.manual_seed 21L |> ignore
            use c = Coder.create { CoderConfig.transcoder "m" 0 5 12 with Activation = TopK 3 } dev
            randomise c 21L
            use _ = torch.no_grad ()
            // make features 0 and 1 dead (never in the top 3)
            c.BEnc.narrow(1, 0L, 2L).fill_(sc -100.0) |> ignore
            let xs = [ for _ in 1 .. 3 -> torch.randn(17L, 5L) ]
            let ys = [ for _ in 1 .. 3 -> torch.randn(17L, 5L).mul(sc 2.0).add(sc 0.5) ]
            let r = CoderEval.evaluate c (List.zip xs ys)
            let x, y = torch.cat(Array.ofList xs, 0L), torch.cat(Array.ofList ys, 0L)
            let yh, a = c.ForwardWithActivations x
            let n = 51.0
            let sse = (yh - y).square().sum().item<float32> () |> float
            let sst = (y - y.mean([| 0L |], keepdim = true)).square().sum().item<float32> () |> float
            Expect.equal r.Tokens 51L "tokens"
            Expect.floatClose Accuracy.medium r.Fvu (sse / sst) "FVU"
            Expect.floatClose Accuracy.medium r.VarianceExplained (1.0 - sse / sst) "variance explained"
            Expect.floatClose Accuracy.medium r.Mse (sse / n) "MSE"
            Expect.floatClose Accuracy.medium r.NormalizedMse (sse / (y.square().sum().item<float32> () |> float)) "NMSE"
            Expect.floatClose Accuracy.medium r.L0 3.0 "TopK 3 gives L0 3 (all pre-activations positive enough)"
            let cos = (torch.nn.functional.cosine_similarity(yh, y, 1L)).mean().item<float32> () |> float
            Expect.floatClose Accuracy.medium r.CosineSimilarity cos "cosine similarity"
            let freq = values ((a.gt(sc 0.0)).to_type(torch.float64).mean([| 0L |]))
            Expect.isLessThan (maxAbsDiff r.Frequencies[0] freq) 1e-12 "frequencies"
            Expect.floatClose Accuracy.high r.DeadFraction (float (freq |> Array.filter ((=) 0.0) |> Array.length) / 12.0) "dead fraction"
            Expect.isGreaterThanOrEqual r.DeadFraction (2.0 / 12.0) "the two silenced features are dead"
            Expect.equal (r.Histogram.Counts |> Array.sum) (12 - r.Histogram.Dead) "every live feature in one bin"
        }
        test "density histogram bins log10 frequencies" {
            let h = CoderEval.densityHistogram [ 0.0; 1e-3; 0.5; 1.0; 1e-9 ] 4 -8.0
            Expect.sequenceEqual h.Edges [| -8.0; -6.0; -4.0; -2.0; 0.0 |] "edges"
            Expect.sequenceEqual h.Counts [| 1; 0; 1; 2 |] "counts (below the range goes to the first bin, 1.0 to the last)"
            Expect.equal h.Dead 1 "never fired"
        }
    ]

let plantedTests =
    testSequenced <| testList "training runs" [
        test "an SAE recovers a planted dictionary" {
            let gen = new torch.Generator(1234UL)
            let d, nTrue = 32, 128
            let dict = unitRows gen nTrue d
            let source (_: int) =
                let s = sparseCodes gen 512 nTrue 3.0
                let x = s.matmul dict
                x, x
            let cfg = { CoderConfig.sae "planted" "blocks.0.hook_resid_pre" 0 d 256 with Activation = TopK 4 }
            let tc = { TrainConfig.Paper with
                         Steps = 400; Lr = 3e-3; BatchSize = 512
                         Schedule = { WarmupSteps = 50; DecayFraction = 0.2; FinalFraction = 0.0 }
                         Loss = LossConfig.TopK 16; DeadAfterTokens = 50_000L; Normalise = true; NormalisationBatches = 4 }
            let state, logs = withThreads 1 (fun () -> CoderTraining.run tc cfg dev source)
            use state = state
            let c = state.Coder
            let r = recovery dict (c.WDec[0].reshape(256L, int64 d))
            let last = List.last logs
            Expect.isGreaterThanOrEqual r 0.9 (sprintf "mean best cosine %.3f (final FVU %.4f, L0 %.2f)" r last.Fvu last.L0)
            Expect.isLessThan last.Fvu (List.head logs).Fvu "FVU went down"
        }
        test "a transcoder recovers the planted output dictionary (target = another linear map of the code)" {
            let gen = new torch.Generator(99UL)
            let dIn, dOut, nTrue = 32, 24, 128
            let dIn' = unitRows gen nTrue dIn
            let dOut' = unitRows gen nTrue dOut
            let source (_: int) =
                let s = sparseCodes gen 512 nTrue 3.0
                s.matmul dIn', s.matmul dOut'
            let cfg = { CoderConfig.transcoder "planted" 0 dIn 256 with DOut = dOut; Activation = TopK 4 }
            let tc = { TrainConfig.Paper with
                         Steps = 600; Lr = 3e-3; BatchSize = 512
                         Schedule = { WarmupSteps = 50; DecayFraction = 0.2; FinalFraction = 0.0 }
                         Loss = LossConfig.TopK 16; DeadAfterTokens = 50_000L; Normalise = true; NormalisationBatches = 4 }
            let state, logs = withThreads 1 (fun () -> CoderTraining.run tc cfg dev source)
            use state = state
            let c = state.Coder
            let r = recovery dOut' (c.WDec[0].reshape(256L, int64 dOut))
            let last = List.last logs
            Expect.isGreaterThanOrEqual r 0.9 (sprintf "decoder vs true output directions: mean best cosine %.3f (final FVU %.4f)" r last.Fvu)
        }
        test "a cross-layer transcoder trains with Anthropic's recipe (free decoders, tanh penalty, pre-act loss, LR decay)" {
            torch.manual_seed 17L |> ignore
            let nL, d = 3, 8
            let gen = new torch.Generator(17UL)
            let maps = Array.init nL (fun _ -> Array.init nL (fun _ -> torch.randn([| int64 d; int64 d |], generator = gen).div(sc (sqrt (float d)))))
            let source (_: int) =
                let x = torch.randn([| 256L; int64 nL; int64 d |], generator = gen)
                // y_ℓ' = Σ_{ℓ≤ℓ'} ReLU(x_ℓ)·M_ℓℓ': every layer's output depends on its own and earlier inputs
                let ys = [| for lp in 0 .. nL - 1 -> Array.init (lp + 1) (fun l -> x.select(1, int64 l).relu().matmul(maps[l][lp])) |> Array.reduce (+) |]
                x, torch.stack(ys, 1L)
            let cfg = CoderConfig.crossLayer "m" [| 0; 1; 2 |] d 48
            let tc = { TrainConfig.Paper with
                         Steps = 150; Lr = 1e-2; LogEvery = 10; Schedule = { WarmupSteps = 10; DecayFraction = 0.2; FinalFraction = 0.0 }
                         Loss = LossConfig.Anthropic 1e-3; SparsityWarmupSteps = 150; Normalise = true; NormalisationBatches = 2
                         BiasInit = Normalisation.MeanBias; DeadAfterTokens = 5000L }
            let state, logs = withThreads 1 (fun () -> CoderTraining.run tc cfg dev source)
            use state = state
            let first, last = List.head logs, List.last logs
            Expect.isLessThan last.Fvu (0.5 * first.Fvu) (sprintf "FVU %.3f → %.3f" first.Fvu last.Fvu)
            Expect.isGreaterThan last.PreAct 0.0 "the pre-activation term is computed"
            Expect.isLessThan last.Lr (0.05 * tc.Lr) "the learning rate has decayed by the last step"
            let r = CoderEval.evaluate state.Coder [ for i in 0 .. 3 -> source i ]
            Expect.isLessThan r.Fvu 0.5 (sprintf "held-out FVU %.3f" r.Fvu)
            Expect.equal r.L0PerLayer.Length 3 "per-layer L0"
        }
    ]

let trainingTests =
    testList "training" [
        test "resampling during training revives dead features and keeps decoders at unit norm" {
            let cfg = { CoderConfig.transcoder "m" 0 6 32 with Activation = TopK 1 }
            let tc = { TrainConfig.Paper with
                         Steps = 10; LogEvery = 1; Loss = LossConfig.TopK 2; DeadAfterTokens = 24L
                         Resampling = Some { ResampleConfig.Default with EverySteps = 5; Batches = 2 } }
            let state, logs = CoderTraining.run tc cfg dev (fun _ -> torch.randn(8L, 6L), torch.randn(8L, 6L))
            use state = state
            let resampled = logs |> List.sumBy (fun l -> l.Resampled)
            Expect.isGreaterThan resampled 0 "features were resampled at steps 4 and 9"
            Expect.equal (logs |> List.filter (fun l -> l.Resampled > 0) |> List.map (fun l -> l.Step)) [ 4; 9 ] "on schedule"
            let norms = values (state.Coder.DecoderNorms())
            Expect.isLessThan (norms |> Array.map (fun n -> abs (n - 1.0)) |> Array.max) 1e-5 "unit decoder norms"
            Expect.equal (values (state.Stats.Dead 24L) |> Array.sum) 0.0 "resampled features count as just fired"
        }
        test "state dicts of coder, optimiser and firing statistics resume training exactly" {
            let cfg = { CoderConfig.transcoder "m" 0 6 16 with Activation = JumpReLU { InitialThreshold = 0.05; Bandwidth = 0.1 } }
            let tc = { TrainConfig.Paper with Steps = 6; Loss = { LossConfig.Anthropic 1e-2 with PreActCoefficient = 1e-3 }; DeadAfterTokens = 16L }
            let batch (i: int) =
                use g = new torch.Generator(uint64 (1000 + i))
                torch.randn([| 8L; 6L |], generator = g), torch.randn([| 8L; 6L |], generator = g)
            torch.manual_seed 3L |> ignore
            use c = Coder.create cfg dev
            use state = CoderTraining.init tc c
            for i in 0 .. 2 do let x, y = batch i in CoderTraining.step state x y |> ignore
            let coderState = c.StateDict()
            let optState = state.Optimizer.StateTensors() |> List.map (fun (n, t) -> n, t.clone()) |> Map.ofList
            let since, counts, window, total = state.Stats.StateDict()
            for i in 3 .. 5 do let x, y = batch i in CoderTraining.step state x y |> ignore
            use c2 = Coder.create cfg dev
            c2.LoadStateDict coderState
            use state2 = CoderTraining.init tc c2
            state2.Optimizer.LoadState optState.TryFind
            state2.Stats.LoadStateDict(since, counts, window, total)
            state2.Step <- 3
            for i in 3 .. 5 do let x, y = batch i in CoderTraining.step state2 x y |> ignore
            for (n, p), (_, p2) in List.zip c.NamedParameters c2.NamedParameters do
                Expect.equal (values p2) (values p) (sprintf "parameter %s identical after resuming" n)
            Expect.equal (values state2.Stats.TokensSinceFired) (values state.Stats.TokensSinceFired) "firing statistics identical"
        }
        test "a run with resampling resumes exactly: the resampling draws depend on (seed, step), not on the generator's history" {
            let cfg = { CoderConfig.transcoder "m" 0 6 32 with Activation = TopK 1 }
            let tc = { TrainConfig.Paper with
                         Steps = 10; Loss = LossConfig.TopK 2; DeadAfterTokens = 24L; Seed = 5L
                         Resampling = Some { ResampleConfig.Default with EverySteps = 5; Batches = 2 } }
            let batch (i: int) =
                use g = new torch.Generator(uint64 (2000 + i))
                torch.randn([| 8L; 6L |], generator = g), torch.randn([| 8L; 6L |], generator = g)
            let train (state: TrainState) (steps: int seq) =
                [ for i in steps do let x, y = batch i in yield (CoderTraining.stepWith state batch x y).Resampled ]
            Transcoders.Tensors.Device.seed 3L
            use c = Coder.create cfg dev
            let initial = c.StateDict()
            use state = CoderTraining.init tc c
            let resampledStraight = train state [ 0 .. 9 ]
            Expect.isGreaterThan resampledStraight[9] 0 "features were resampled at step 9, after the interruption"
            // the same run, interrupted after step 6 (after one resampling, before the next) and continued in a fresh
            // state from copies of the state dicts, with the random generators disturbed in between
            Transcoders.Tensors.Device.seed 3L
            use c1 = Coder.create cfg dev
            c1.LoadStateDict initial
            use first = CoderTraining.init tc c1
            train first [ 0 .. 6 ] |> ignore
            let coderState = c1.StateDict()
            let optState = first.Optimizer.StateTensors() |> List.map (fun (n, t) -> n, t.clone()) |> Map.ofList
            let since, counts, window, total = first.Stats.StateDict()
            Transcoders.Tensors.Device.seed 12345L
            torch.randn(100L) |> ignore
            use c2 = Coder.create cfg dev
            c2.LoadStateDict coderState
            use second = CoderTraining.init tc c2
            second.Optimizer.LoadState optState.TryFind
            second.Stats.LoadStateDict(since, counts, window, total)
            second.Step <- 7
            train second [ 7 .. 9 ] |> ignore
            for (n, p), (_, p2) in List.zip c.NamedParameters c2.NamedParameters do
                Expect.equal (values p2) (values p) (sprintf "parameter %s identical after resuming" n)
        }
        test "a NaN loss stops training with a clear error" {
            let cfg = CoderConfig.transcoder "m" 0 4 8
            let tc = { TrainConfig.Paper with Steps = 3; BiasInit = Normalisation.ZeroBias }
            let source (_: int) = torch.full([| 8L; 4L |], sc Double.NaN), torch.randn(8L, 4L)
            let msg = try CoderTraining.run tc cfg dev source |> ignore; "" with CoderTrainingError m -> m
            Expect.stringContains msg "step 0" "the step is named"
            Expect.stringContains msg "NaN/Inf" "the bad batch is diagnosed"
        }
        test "JSONL log has one object per logged step" {
            use dir = new TempDir()
            let cfg = CoderConfig.transcoder "m" 0 4 8
            let tc = { TrainConfig.Paper with Steps = 5; LogEvery = 2; LogPath = Some(dir.File "log/metrics.jsonl"); BiasInit = Normalisation.MeanBias }
            let state, logs = CoderTraining.run tc cfg dev (fun _ -> torch.randn(8L, 4L), torch.randn(8L, 4L))
            (state :> IDisposable).Dispose()
            let lines = File.ReadAllLines(dir.File "log/metrics.jsonl")
            Expect.equal lines.Length 3 "steps 0, 2 and 4"
            Expect.equal (logs |> List.map (fun l -> l.Step)) [ 0; 2; 4 ] "logged steps"
            use doc = Text.Json.JsonDocument.Parse lines[2]
            Expect.equal (doc.RootElement.GetProperty("step").GetInt32()) 4 "step field"
            Expect.equal (doc.RootElement.GetProperty("tokens").GetInt64()) 40L "tokens field"
            Expect.isTrue (doc.RootElement.TryGetProperty("reconstruction") |> fst) "loss terms logged"
        }
        test "learning-rate schedule: warm-up, constant, linear decay" {
            let s = { WarmupSteps = 10; DecayFraction = 0.2; FinalFraction = 0.0 }
            Expect.floatClose Accuracy.high (s.Factor(0, 100)) 0.1 "first step"
            Expect.floatClose Accuracy.high (s.Factor(9, 100)) 1.0 "end of warm-up"
            Expect.floatClose Accuracy.high (s.Factor(50, 100)) 1.0 "constant"
            Expect.floatClose Accuracy.high (s.Factor(90, 100)) 0.5 "half-way through the decay"
            Expect.floatClose Accuracy.high (s.Factor(100, 100)) 0.0 "end"
            Expect.floatClose Accuracy.high (CoderTraining.sparsityCoefficient { TrainConfig.Paper with SparsityWarmupSteps = 4 } 1) (1.4e-4 * 0.5) "λ warm-up"
        }
        test "BatchTopK converts to JumpReLU with the calibrated threshold" {
            torch.manual_seed 4L |> ignore
            use c = Coder.create { CoderConfig.transcoder "m" 0 6 16 with Activation = BatchTopK 3.0 } dev
            randomise c 4L
            use x = torch.randn(20L, 6L)
            let th = CoderTraining.calibrateBatchTopKThreshold c [ x, x ]
            use j = Coder.toJumpReLU c th 0.01
            use aB = c.Encode x
            use aJ = j.Encode x
            let vb, vj = values aB, values aJ
            let differ = Array.fold2 (fun n a b -> if a <> b then n + 1 else n) 0 vb vj
            Expect.equal (vb |> Array.filter (fun v -> v > 0.0) |> Array.length) 60 "BatchTopK keeps 3 × 20"
            Expect.equal differ 1 "JumpReLU at the smallest kept value keeps all but that one entry"
            Expect.floatClose Accuracy.high th[0] (vb |> Array.filter (fun v -> v > 0.0) |> Array.min) "threshold = smallest kept value"
        }
        test "training updates the running BatchTopK threshold" {
            let cfg = { CoderConfig.transcoder "m" 0 6 16 with Activation = BatchTopK 2.0 }
            let tc = { TrainConfig.Paper with Steps = 3; Loss = LossConfig.TopK 4; BatchTopKMomentum = 0.5 }
            let state, _ = CoderTraining.run tc cfg dev (fun _ -> torch.randn(16L, 6L), torch.randn(16L, 6L))
            use state = state
            let th = values state.Coder.BatchTopKThreshold.Value
            Expect.isTrue (th[0] > 0.0 && Double.IsFinite th[0]) "a positive finite threshold estimate"
        }
    ]

let tests =
    testList "Coders" [ activationTests; lossTests; configTests; decoderTests; cltTests; deadFeatureTests; foldingTests; fileTests; evalTests; trainingTests; plantedTests ]
