/// A short end-to-end fine-tune of trained coders spliced into their model (arXiv 2503.17272: a few percent of the
/// training tokens on KL + MSE cuts the CE gap by 20–50%): the coders replace their output hooks (no error terms),
/// and their parameters follow the gradient of KL(clean ‖ spliced) of the next-token distributions plus the FVU of
/// each coder on the clean activations, which keeps the features faithful to the layer they replace. The model's
/// own parameters do not change.
module Transcoders.Coders.KlFinetune

open System
open TorchSharp
open Transcoders.Models
open Transcoders.Coders.Scalars

/// Settings of a KL + MSE fine-tune.
type KlFinetuneConfig =
    { Steps: int
      /// Adam's learning rate (constant after a linear warm-up over the first tenth of the steps).
      Lr: float
      /// Weight of KL(clean ‖ spliced), nats per predicted token.
      KlWeight: float
      /// Weight of each coder's FVU on the clean model's activations (the "MSE" term, scale-free).
      FvuWeight: float }

    /// 100 steps, Adam 1e-4, KL + FVU with equal weights.
    static member Default = { Steps = 100; Lr = 1e-4; KlWeight = 1.0; FvuWeight = 1.0 }

    member c.Problems =
        [ if c.Steps < 0 then yield sprintf "Steps must be ≥ 0 (got %d)" c.Steps
          if not (c.Lr > 0.0 && Double.IsFinite c.Lr) then yield sprintf "Lr must be positive and finite (got %g)" c.Lr
          if c.KlWeight < 0.0 || c.FvuWeight < 0.0 || c.KlWeight + c.FvuWeight = 0.0 then
              yield sprintf "KlWeight and FvuWeight must be ≥ 0, not both 0 (got %g, %g)" c.KlWeight c.FvuWeight ]

/// One fine-tune step: the loss and its terms (host values).
type KlFinetuneLog =
    { Step: int
      Loss: float
      /// Mean KL(clean ‖ spliced) per predicted token, nats.
      Kl: float
      /// Mean over coders of the FVU on the clean activations (normalised units).
      Fvu: float }

/// Mean over positions of KL(p ‖ q) from logits [B, P, V] (p the clean model's, constant).
let klDivergence (clean: torch.Tensor) (spliced: torch.Tensor) : torch.Tensor =
    use scope = torch.NewDisposeScope()
    let lp = clean.to_type(torch.float32).log_softmax(-1L)
    let lq = spliced.to_type(torch.float32).log_softmax(-1L)
    (lp.exp() * (lp - lq)).sum([| -1L |]).mean().MoveToOuterDisposeScope()

/// Rescales each feature's decoder vector (over all its decoders) to `norms` [L, d_sae].
let private restoreNorms (c: Coder) (norms: torch.Tensor) =
    use _ = torch.no_grad ()
    for l in 0 .. c.NLayers - 1 do
        let w = c.WDec[l]
        // not linalg.vector_norm: see Optim.gradNorm (a temporary Scalar TorchSharp does not keep alive)
        use sq = w.square()
        use s = sq.sum([| 1L; 2L |], keepdim = true)
        use n = s.sqrt()
        n.clamp_min_(1e-12) |> ignore
        use nl = norms[l]
        use target = nl.reshape(-1L, 1L, 1L)
        use f = target.div n
        w.mul_ f |> ignore

/// Fine-tunes `coders` (trained, spliced together) in place for `config.Steps` steps; `tokens step` gives each step's
/// token rows [B, P] (int64). Returns one log per step. A unit-norm coder keeps each decoder vector's norm (1, or
/// 1/s_out once the activation scale is folded into a saved coder): the gradient's parallel component is removed and
/// the norm restored after each step.
let run (model: Transformer) (coders: Coder list) (config: KlFinetuneConfig) (tokens: int -> torch.Tensor) (onLog: KlFinetuneLog -> unit) : KlFinetuneLog list =
    match config.Problems with
    | [] -> ()
    | ps -> invalidArg "config" ("invalid KlFinetuneConfig: " + String.Join("; ", ps))
    if coders.IsEmpty then invalidArg "coders" "no coders to fine-tune"
    Splicing.validate model.Config coders
    let hooks = Splicing.hooks coders Splicing.WithoutErrorTerms
    let cached = coders |> List.collect (fun c -> List.ofArray (Array.append c.Config.HookIn c.Config.HookOut)) |> List.distinct
    let modelParams = model.parameters () |> Seq.toList
    let wasTrainable = modelParams |> List.map (fun p -> p.requires_grad)
    for p in modelParams do p.requires_grad <- false
    let optimisers = coders |> List.map (fun c -> CoderOptimizer.create c.NamedParameters 0.9 0.999 1e-8)
    let norms = coders |> List.map (fun c -> (use _ = torch.no_grad () in c.DecoderNorms().DetachFromDisposeScope()))
    let warmup = max 1 (config.Steps / 10)
    try
        [ for step in 0 .. config.Steps - 1 ->
            use scope = torch.NewDisposeScope()
            let t = tokens step
            let clean =
                use _ = torch.no_grad ()
                Transformer.run model { RunOptions.Default with Cache = set cached } t
            let spliced = Transformer.runWithHooks model hooks t
            let kl = klDivergence clean.Logits.Value spliced
            let fvus =
                [ for c in coders ->
                    let pick (names: string[]) =
                        if names.Length = 1 then clean.Cache[names[0]] else torch.stack([| for h in names -> clean.Cache[h] |], -2L)
                    let xn, yn = CoderTraining.normaliseBatch c (pick c.Config.HookIn) (pick c.Config.HookOut)
                    let p = c.PassNormalised xn
                    Losses.fvu p.Prediction yn ]
            let fvu = torch.stack(Array.ofList fvus).mean()
            let loss = kl.mul(sc config.KlWeight).add(fvu.mul(sc config.FvuWeight))
            for o in optimisers do o.ZeroGrad()
            loss.backward ()
            SparseActivations.BackwardTensors.release ()
            let lr = config.Lr * min 1.0 (float (step + 1) / float warmup)
            for (c, o), n in List.zip (List.zip coders optimisers) norms do
                if c.Config.Decoder = UnitNorm then DecoderConstraint.removeParallelGradient c
                o.SetLearningRate lr
                o.Step()
                if c.Config.Decoder = UnitNorm then restoreNorms c n
            let values = torch.stack([| loss.detach (); kl.detach (); fvu.detach () |]).to_type(torch.float64).cpu().data<float>().ToArray()
            if not (Double.IsFinite values[0]) then
                failwithf "the KL fine-tune diverged at step %d (loss %g): lower its learning rate" step values[0]
            let log = { Step = step; Loss = values[0]; Kl = values[1]; Fvu = values[2] }
            onLog log
            log ]
    finally
        for o in optimisers do (o :> IDisposable).Dispose()
        for n in norms do n.Dispose()
        for p, was in List.zip modelParams wasTrainable do p.requires_grad <- was
