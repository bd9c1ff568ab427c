/// Coder quality: the statistics behind dead features (‖mean‖/‖std‖), streamed evaluation over long token streams,
/// SAELens' metrics.json, and the recipes researchers expect — Matryoshka BatchTopK, BatchTopK exported as JumpReLU
/// with a calibrated threshold, JumpReLU pulled to a target L0, and a KL + MSE fine-tune of spliced coders — each
/// trained here with the invariant it promises checked.
module Transcoders.Tests.CoderQualityTests

open System
open System.IO
open Expecto
open TorchSharp
open Transcoders.Activations
open Transcoders.Coders
open Transcoders.Files
open Transcoders.Models
open Transcoders.Text
open Transcoders.Tests.Fixtures

let private dev = torch.CPU
let private statisticsTests =
    testList "activation statistics" [
        test "‖mean‖/‖std‖ is the mean's norm over the RMS norm of the centred rows, per layer, scale-free" {
            torch.manual_seed 5L |> ignore
            use x = torch.randn(2L, 500L, 8L, dtype = torch.float64)
            use mu = torch.tensor([| 3.0; 0.0; 4.0; 0.0; 0.0; 0.0; 0.0; 0.0 |], dtype = torch.float64)
            use shifted = x.clone()
            shifted[0].add_(mu) |> ignore
            let r = Normalisation.meanStdRatio shifted
            let expected (l: int) =
                let xl = shifted[l]
                let m = xl.mean([| 0L |])
                let num = m.norm().item<float> ()
                let den = sqrt ((xl - m).square().sum([| 1L |]).mean().item<float> ())
                num / den
            Expect.floatClose Accuracy.high r[0] (expected 0) "layer 0 (shifted by a mean of norm 5)"
            Expect.floatClose Accuracy.high r[1] (expected 1) "layer 1 (centred noise)"
            Expect.isGreaterThan r[0] 1.5 "‖μ‖ = 5 over a spread of √8: about 1.77"
            Expect.isLessThan r[1] 0.2 "centred noise has a small ratio"
            use scaled = shifted.mul(sc 37.0)
            let r2 = Normalisation.meanStdRatio scaled
            Expect.floatClose Accuracy.high r2[0] r[0] "scale-free"
        }
        test "the report warns about a high ratio only when the coder does not centre its inputs" {
            use c = Coder.create (CoderConfig.transcoder "m" 0 4 8) dev
            use x = torch.randn(64L, 4L).add(sc 10.0)
            use y = torch.randn(64L, 4L)
            let centred = Normalisation.meanStdReport c true x y
            let bare = Normalisation.meanStdReport c false x y
            Expect.stringContains bare "WARNING" "uncentred high-ratio inputs are flagged"
            Expect.isFalse (centred.Contains "WARNING") "centred inputs are not"
            Expect.stringContains centred "‖mean‖/‖std‖" "the ratio is named"
            use x0 = torch.randn(64L, 4L)
            Expect.isFalse ((Normalisation.meanStdReport c false x0 y).Contains "WARNING") "a low ratio is not flagged"
        }
        test "the accumulator's L1, ‖ŷ‖/‖y‖ and per-layer dead fractions match their definitions" {
            torch.manual_seed 8L |> ignore
            use c = Coder.create { CoderConfig.crossLayer "m" [| 0; 1 |] 5 10 with Activation = TopK 2 } dev
            randomise c 8L
            use _ = torch.no_grad ()
            c.BEnc[1].narrow(0, 0L, 3L).fill_(sc -100.0) |> ignore
            let xs = [ for _ in 1 .. 3 -> torch.randn(9L, 2L, 5L) ]
            let ys = [ for _ in 1 .. 3 -> torch.randn(9L, 2L, 5L) ]
            let acc = EvalAccumulator(c)
            for x, y in List.zip xs ys do acc.Add(x, y)
            let r = acc.Result EvalOptions.Default
            let x, y = torch.cat(Array.ofList xs, 0L), torch.cat(Array.ofList ys, 0L)
            let yh, a = c.ForwardWithActivations x
            let l1 = a.abs().sum([| 2L |]).mean().item<float32> () |> float
            let ratio = (yh.norm(2, true) / y.norm(2, true)).mean().item<float32> () |> float
            Expect.floatClose Accuracy.medium r.L1 l1 "L1: mean over tokens and layers of Σ|a|"
            Expect.floatClose Accuracy.medium r.L2Ratio ratio "l2 ratio: mean ‖ŷ‖/‖y‖"
            let dead l = float (values (a.select(1, int64 l).gt(sc 0.0).any(0L)) |> Array.filter ((=) 0.0) |> Array.length) / 10.0
            Expect.floatClose Accuracy.high r.DeadFractionPerLayer[0] (dead 0) "layer 0 dead fraction"
            Expect.floatClose Accuracy.high r.DeadFractionPerLayer[1] (dead 1) "layer 1 dead fraction"
            Expect.isGreaterThanOrEqual r.DeadFractionPerLayer[1] 0.3 "the three silenced features of layer 1 are dead"
        }
    ]

let private metricsFileTests =
    testList "SAELens metrics.json" [
        test "written with SAELens' keys, read back exactly; SAELens' nested layout reads too; NaN as null" {
            use dir = new TempDir()
            let m : SaeLensMetrics.SaeLensMetrics =
                { L0 = 16.0; L1 = 21.5; ExplainedVariance = 0.81; Mse = 0.125; Cossim = 0.9; L2Ratio = 0.97
                  CeLossScore = 0.93; KlDivScore = 0.91; CeLossWithSae = 2.1; CeLossWithoutSae = 2.0; CeLossWithAblation = 3.4
                  KlDivWithSae = 0.08; KlDivWithAblation = nan; DeadFraction = 0.02; Tokens = 1_048_576L }
            SaeLensMetrics.write dir.Path m
            let text = File.ReadAllText(Path.Combine(dir.Path, "metrics.json"))
            for k in [ "l0"; "l1"; "explained_variance"; "mse"; "l2_ratio"; "ce_loss_score"; "kl_div_score"; "dead_fraction" ] do
                Expect.stringContains text (sprintf "\"%s\":" k) (sprintf "key %s" k)
            Expect.stringContains text "\"kl_div_with_ablation\": null" "NaN written as null"
            let back = SaeLensMetrics.read dir.Path
            Expect.equal { back with KlDivWithAblation = 0.0 } { m with KlDivWithAblation = 0.0 } "round trip"
            Expect.isTrue (Double.IsNaN back.KlDivWithAblation) "null read as NaN"
            let nested =
                """{"sparsity": {"l0": 12.5, "l1": 3.0}, "reconstruction_quality": {"explained_variance": 0.7, "mse": 1.5, "cossim": 0.8},
                    "shrinkage": {"l2_ratio": 0.9}, "model_performance_preservation": {"ce_loss_score": 0.95},
                    "model_behavior_preservation": {"kl_div_score": 0.94}}"""
            let n = SaeLensMetrics.ofJson "nested" nested
            Expect.equal (n.L0, n.ExplainedVariance, n.L2Ratio, n.CeLossScore, n.KlDivScore) (12.5, 0.7, 0.9, 0.95, 0.94) "nested keys"
            Expect.isTrue (Double.IsNaN n.DeadFraction) "absent key is NaN"
            Expect.throws (fun () -> SaeLensMetrics.ofJson "bad" """{"l0": "many"}""" |> ignore) "a non-number is refused"
        }
        test "our evaluation maps onto SAELens' names" {
            use c = Coder.create { CoderConfig.transcoder "m" 0 4 8 with Activation = TopK 2 } dev
            let e = CoderEval.evaluate c [ torch.randn(32L, 4L), torch.randn(32L, 4L) ]
            let m = SaeLensMetrics.ofResults (Some e) None
            Expect.equal (m.L0, m.ExplainedVariance, m.Mse, m.DeadFraction, m.Tokens) (e.L0, e.VarianceExplained, e.Mse, e.DeadFraction, 32L) "activation metrics"
            Expect.isTrue (Double.IsNaN m.CeLossScore && Double.IsNaN m.KlDivScore) "no spliced evaluation: NaN scores"
        }
    ]

// ---------------------------------------------------------------------------------------------- recipes

/// Sparse codes over `nTrue` features with Zipf-like frequencies (feature i fires with probability ∝ (i+1)^−0.8,
/// `active` per sample on average), magnitudes in [0.5, 1.5].
let private zipfCodes (gen: torch.Generator) (b: int) (nTrue: int) (active: float) =
    let w = Array.init nTrue (fun i -> Math.Pow(float (i + 1), -0.8))
    let scale = active / Array.sum w
    use p = torch.tensor(w |> Array.map (fun v -> float32 (min 1.0 (v * scale))))
    let mask = torch.rand([| int64 b; int64 nTrue |], generator = gen).lt(p.unsqueeze 0)
    let mags = torch.rand([| int64 b; int64 nTrue |], generator = gen).add(sc 0.5)
    mags * mask

/// FVU of the first `m` features alone on normalised layer-major batches.
let private prefixFvu (c: Coder) (batches: (torch.Tensor * torch.Tensor) list) (m: int) =
    use _ = torch.no_grad ()
    use scope = torch.NewDisposeScope()
    let mutable num = 0.0
    let mutable den = 0.0
    for x, y in batches do
        let xn, yn = CoderTraining.normaliseBatch c x y
        let p = c.PassNormalised xn
        let pm = Losses.prefixPrediction c p m
        num <- num + ((pm - yn).square().sum().item<float32> () |> float)
        den <- den + ((yn - yn.mean([| 1L |], keepdim = true)).square().sum().item<float32> () |> float)
    num / den

let private recipeTrain steps lr loss =
    { TrainConfig.Paper with
        Steps = steps; Lr = lr; BatchSize = 512; LogEvery = 10
        Schedule = { WarmupSteps = 20; DecayFraction = 0.2; FinalFraction = 0.0 }
        Loss = loss; DeadAfterTokens = 20_000L; Normalise = true; NormalisationBatches = 4 }

let private recipeTests =
    testSequenced <| testList "recipes" [
        test "Matryoshka BatchTopK: every nested prefix reconstructs, far better than the same prefix of plain BatchTopK" {
            let d, nTrue, dSae = 32, 96, 128
            let gen = new torch.Generator(404UL)
            let dict = unitRows gen nTrue d
            let source (_: int) = (let x = (zipfCodes gen 512 nTrue 4.0).matmul dict in x, x)
            let heldOut = [ for i in 0 .. 3 -> source (1000 + i) ]
            let cfg = { CoderConfig.sae "planted" "blocks.0.hook_resid_pre" 0 d dSae with Activation = BatchTopK 4.0 }
            let prefixes = [ 8; 32 ]
            let train loss = withThreads 1 (fun () -> CoderTraining.run (recipeTrain 300 3e-3 loss) cfg dev source)
            let mState, mLogs = train (LossConfig.MatryoshkaBatchTopK(prefixes, 16))
            use mState = mState
            let pState, _ = train (LossConfig.TopK 16)
            use pState = pState
            let fvus (c: Coder) = [ for m in prefixes @ [ dSae ] -> prefixFvu c heldOut m ]
            let mf, pf = fvus mState.Coder, fvus pState.Coder
            let msg = sprintf "Matryoshka prefix FVUs %A, plain %A" mf pf
            Expect.isLessThan (List.last mLogs).Loss (List.head mLogs).Loss ("the loss fell; " + msg)
            Expect.isLessThan mf[0] 0.85 ("the first 8 features alone reconstruct; " + msg)
            Expect.isLessThan mf[1] 0.5 ("the first 32 features alone reconstruct; " + msg)
            Expect.isLessThan mf[2] (pf[2] + 0.05) ("the whole dictionary reconstructs about as well as plain BatchTopK; " + msg)
            Expect.isTrue (mf[0] >= mf[1] && mf[1] >= mf[2]) ("nested prefixes: FVU falls with the prefix; " + msg)
            Expect.isLessThan mf[0] (pf[0] - 0.05) ("8 features: Matryoshka beats plain BatchTopK's first 8; " + msg)
            Expect.isLessThan mf[1] (pf[1] - 0.1) ("32 features: Matryoshka beats plain BatchTopK's first 32; " + msg)
        }
        test "Matryoshka prefixes out of order or range are refused, naming them" {
            Expect.throws (fun () -> Losses.matryoshkaPrefixes [ 8; 4 ] 16 |> ignore) "descending"
            Expect.throws (fun () -> Losses.matryoshkaPrefixes [ 0; 4 ] 16 |> ignore) "zero"
            Expect.throws (fun () -> Losses.matryoshkaPrefixes [ 32 ] 16 |> ignore) "beyond d_sae"
            Expect.equal (Losses.matryoshkaPrefixes [ 4; 8 ] 16) [ 4; 8; 16 ] "d_sae appended"
            Expect.equal (Losses.matryoshkaPrefixes [ 4; 16 ] 16) [ 4; 16 ] "d_sae not repeated"
        }
        test "a trained BatchTopK coder exported as JumpReLU with its calibrated threshold keeps its L0 and FVU on held-out data" {
            let d, nTrue, dSae, k = 32, 96, 128, 4.0
            let gen = new torch.Generator(505UL)
            let dict = unitRows gen nTrue d
            let source (_: int) = (let x = (zipfCodes gen 512 nTrue 4.0).matmul dict in x, x)
            let cfg = { CoderConfig.sae "planted" "blocks.0.hook_resid_pre" 0 d dSae with Activation = BatchTopK k }
            let state, logs = withThreads 1 (fun () -> CoderTraining.run (recipeTrain 300 3e-3 (LossConfig.TopK 16)) cfg dev source)
            use state = state
            Expect.isLessThan (List.last logs).Fvu (List.head logs).Fvu "BatchTopK trained"
            let calibration = [ for i in 0 .. 3 -> source (2000 + i) ]
            let heldOut = [ for i in 0 .. 3 -> source (3000 + i) ]
            let th = CoderTraining.calibrateBatchTopKThreshold state.Coder calibration
            use j = Coder.toJumpReLU state.Coder th 0.001
            let eb = CoderEval.evaluate state.Coder heldOut
            let ej = CoderEval.evaluate j heldOut
            let msg = sprintf "BatchTopK L0 %.2f FVU %.4f; JumpReLU θ %.4f L0 %.2f FVU %.4f" eb.L0 eb.Fvu th[0] ej.L0 ej.Fvu
            Expect.floatClose Accuracy.high eb.L0 k ("BatchTopK keeps k per token on average; " + msg)
            Expect.isTrue (ej.L0 >= 0.75 * k && ej.L0 <= 1.3 * k) ("the calibrated JumpReLU keeps about k per token; " + msg)
            Expect.isLessThan ej.Fvu (eb.Fvu * 1.25 + 0.01) ("and reconstructs about as well; " + msg)
            let running = values state.Coder.BatchTopKThreshold.Value
            Expect.isLessThan (abs (running[0] - th[0]) / th[0]) 0.5 (sprintf "the running estimate %.4f is near the calibrated %.4f" running[0] th[0])
        }
        test "JumpReLU with the target-L0 penalty settles near its target L0 and reconstructs" {
            let d, nTrue, dSae, target = 32, 96, 128, 6.0
            let gen = new torch.Generator(606UL)
            let dict = unitRows gen nTrue d
            let source (_: int) = (let x = (zipfCodes gen 512 nTrue 4.0).matmul dict in x, x)
            let cfg = { CoderConfig.sae "planted" "blocks.0.hook_resid_pre" 0 d dSae with Activation = JumpReLU { InitialThreshold = 0.3; Bandwidth = 0.1 } }
            // log θ moves at most about lr per Adam step: a high rate lets the thresholds travel far in 400 steps
            let tc = recipeTrain 400 1e-2 (LossConfig.JumpReLUTargetL0(target, 10.0))
            let state, logs = withThreads 1 (fun () -> CoderTraining.run tc cfg dev source)
            use state = state
            let first, last = List.head logs, List.last logs
            let e = CoderEval.evaluate state.Coder [ for i in 0 .. 3 -> source (4000 + i) ]
            let msg = sprintf "L0 %.1f → %.1f (held out %.2f), FVU %.3f → %.3f (held out %.3f)" first.L0 last.L0 e.L0 first.Fvu last.Fvu e.Fvu
            Expect.isGreaterThan first.L0 (3.0 * target) ("it starts far above the target; " + msg)
            Expect.isTrue (e.L0 >= 0.7 * target && e.L0 <= 1.4 * target) ("held-out L0 near the target; " + msg)
            Expect.isLessThan last.Loss first.Loss ("the loss fell; " + msg)
            Expect.isLessThan e.Fvu 0.3 ("it reconstructs; " + msg)
        }
    ]

// ---------------------------------------------------------------------------------------------- on a model

let private modelPath = Paths.data "models/stories260K/stories260K.bin"
let private model = lazy (let m, _ = ModelFiles.load modelPath torch.CPU in m.eval (); m)

let private text =
    lazy
        (let tokenizer = ModelTokenizer.find modelPath
         let stories =
             Corpus.readStories (Path.Combine(Paths.data "tinystories", "ts_v2_valid_head_part1.txt.gz"))
             |> Seq.truncate 300 |> Array.ofSeq
             |> Array.map (fun s -> Tokenizer.encodeDocument tokenizer true false s.Text)
         { Name = "quality test stories"; Train = Array.concat stories[.. 239]; Validation = Array.concat stories[240 ..]
           Bos = Tokenizer.bos tokenizer; VocabSize = Tokenizer.vocabSize tokenizer })

let private store (batch: int) =
    { StoreConfig.Default with
        Ctx = 64; PassRows = 8; TextSeed = 3L
        Buffer = { ShuffleBufferConfig.Default with Rows = int64 (4 * batch); BatchSize = int64 batch; Seed = 3L } }

/// A TopK transcoder of stories260K's layer `layer`, trained briefly on its activations.
let private trainedTranscoder (layer: int) (steps: int) =
    let m, t = model.Force(), text.Force()
    let cfg = { CoderConfig.transcoder "stories260K" layer m.Config.DModel 128 with Activation = TopK 8 }
    let spec = { Coders = [ CoderJob.hooksOf "tc" cfg ] }
    let s = ActivationStore(m, t.Train, t.Bos, spec, store 256, "train")
    use buffer = s.OpenBuffer()
    let batches =
        [| for _ in 1 .. steps ->
             match buffer.Next() with
             | Some b -> b |> Map.map (fun _ t -> t.DetachFromDisposeScope())
             | None -> failwith "the store ran out" |]
    try
        let tc = { recipeTrain steps 3e-3 (LossConfig.TopK 32) with BatchSize = 256; DeadAfterTokens = 10_000L }
        let state, _ = CoderTraining.run tc cfg dev (fun i -> CoderJob.pair cfg batches[i % batches.Length])
        let folded = Coder.foldScale state.Coder
        let saved = Coder.foldInputBias folded
        (folded :> IDisposable).Dispose()
        (state.Coder :> IDisposable).Dispose()
        (state :> IDisposable).Dispose()
        saved
    finally
        for b in batches do Batch.dispose b

let private modelTests =
    testSequenced <| testList "on stories260K" [
        test "a streamed evaluation over the validation text equals the evaluation of the collected rows" {
            let m, t = model.Force(), text.Force()
            use c = Coder.create { CoderConfig.transcoder "stories260K" 1 m.Config.DModel 32 with Activation = TopK 3 } dev
            randomise c 12L
            let st = store 512
            let evaluated, _ =
                JobEvaluation.evaluate m t st { JobEval.Default with ActivationRows = 3000L; SplicedRows = 0 } ignore [ "c", c ]
            let reference = match evaluated with [ _, Some e, _ ] -> e | _ -> failwith "no activation metrics"
            let mutable chunks = 0
            let streamed =
                StreamedEval.evaluate m t st { StreamedEval.StreamedEvalConfig.Default with Tokens = 3000L; ChunkRows = 700L } (fun _ -> chunks <- chunks + 1) [ "c", c ]
                |> List.exactlyOne |> snd
            Expect.equal streamed.Tokens reference.Tokens "same tokens"
            Expect.isGreaterThanOrEqual chunks 5 "read in chunks"
            Expect.floatClose Accuracy.high streamed.L0 reference.L0 "L0"
            Expect.floatClose Accuracy.high streamed.Fvu reference.Fvu "FVU"
            Expect.isLessThan (maxAbsDiff streamed.Frequencies[0] reference.Frequencies[0]) 1e-12 "frequencies"
            Expect.equal streamed.DeadFraction reference.DeadFraction "dead fraction"
        }
        test "a KL + MSE fine-tune of a spliced transcoder shrinks its CE gap and leaves the model alone" {
            let m, t = model.Force(), text.Force()
            use tc = trainedTranscoder 2 150
            let validation () = ModelText.tokenBatches m.Device 8 (ModelText.validationRows t 64 32)
            let before = SplicedEval.evaluate m [ tc ] (validation ())
            let rows = Batches.PackedRows(Batches.splitDocuments t.Bos.Value t.Train, 64, 7L)
            let snapshot = Transformer.parameters m |> List.map (fun (n, p) -> n, values p)
            let norms0 = values (tc.DecoderNorms())
            let logs =
                withThreads 1 (fun () ->
                    KlFinetune.run m [ tc ] { KlFinetune.KlFinetuneConfig.Default with Steps = 60; Lr = 1e-3 }
                        (fun step ->
                            let b = rows.Batch(int64 step, 8, m.Device)
                            b.Targets.Dispose()
                            b.Inputs) ignore)
            let after = SplicedEval.evaluate m [ tc ] (validation ())
            let msg = sprintf "CE gap %.4f → %.4f, KL %.4f → %.4f (fine-tune KL %.4f → %.4f, FVU %.3f → %.3f)"
                          before.CeDelta after.CeDelta before.KlToClean after.KlToClean (List.head logs).Kl (List.last logs).Kl (List.head logs).Fvu (List.last logs).Fvu
            Expect.isGreaterThan before.CeDelta 0.0 ("the spliced model starts worse than the clean one; " + msg)
            Expect.isLessThan after.CeDelta (0.9 * before.CeDelta) ("the CE gap shrank by at least 10%; " + msg)
            Expect.isLessThan after.KlToClean before.KlToClean ("so did the KL to the clean model; " + msg)
            for (n, v), (_, p) in List.zip snapshot (Transformer.parameters m) do
                Expect.equal (values p) v (sprintf "model parameter %s unchanged" n)
                Expect.isTrue p.requires_grad (sprintf "%s trainable again" n)
            Expect.isLessThan (maxAbsDiff (values (tc.DecoderNorms())) norms0) 1e-5 "each decoder vector keeps its norm (the folded output scale)"
        }
    ]

let tests = testList "Coder quality" [ statisticsTests; metricsFileTests; recipeTests; modelTests ]
