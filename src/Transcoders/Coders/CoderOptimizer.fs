namespace Transcoders.Coders

open TorchSharp.Modules
open Transcoders.Training

/// Learning-rate schedule: linear warm-up, then constant, then an optional linear decay over the last fraction of
/// the run (Anthropic decays over the last ~20%; the transcoder paper uses warm-up only). The coder's vocabulary for
/// `Schedule.WarmupFractionDecay`, which computes it (see `ToSchedule`).
type LrSchedule =
    { WarmupSteps: int
      /// Fraction of the run, at its end, over which the rate decays linearly (0 = no decay).
      DecayFraction: float
      /// Final rate as a fraction of the base rate.
      FinalFraction: float }

    /// The schedule of a run of `totalSteps` steps at base rate `lr`.
    member s.ToSchedule(lr: float, totalSteps: int) : Schedule.Schedule =
        Schedule.WarmupFractionDecay(lr, s.WarmupSteps, totalSteps, s.DecayFraction, s.FinalFraction)

    /// lr(step) / lr_base for a run of `totalSteps` steps (step counted from 0).
    member s.Factor(step: int, totalSteps: int) = Schedule.lrAt (s.ToSchedule(1.0, totalSteps)) step

/// The coders' optimiser: Training's AdamW (one implementation for language models and coders) with no weight
/// decay (coders are not weight-decayed). Its `ResetMasked` gives resampled features fresh moments.
module CoderOptimizer =
    /// AdamW's settings for a coder: β1, β2, ε and no weight decay.
    let config (beta1: float) (beta2: float) (eps: float) : Optim.AdamWConfig =
        { Beta1 = beta1; Beta2 = beta2; Eps = eps; WeightDecay = 0.0 }

    /// Adam over a coder's named parameters (none decayed).
    let create (parameters: (string * Parameter) list) (beta1: float) (beta2: float) (eps: float) : Optim.AdamW =
        new Optim.AdamW(parameters, config beta1 beta2 eps, (fun _ _ -> false))
