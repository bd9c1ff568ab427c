namespace Transcoders.Coders

/// Recommended training settings for coders on small models (validated on stories260K, see the sweep in the
/// project's notes): activations normalised to E‖x‖ = √d, biases from the data mean, Adam with a short warm-up and a
/// linear decay over the last 20% (Anthropic).
module CoderDefaults =
    /// The learning rate for `dSae` features: 8e-4·√(16384/d_sae), capped at 4e-3 (sparsify's 1/√d_sae scaling; the
    /// constant measured on stories260K, where 4e-3 beat 2e-3 and 8e-4 for d_sae 1,024 in runs of 600k tokens; for
    /// GPT-2 small's 24,576 features it gives 6.5e-4, near the transcoder paper's 4e-4).
    let lr (dSae: int) = min 4e-3 (8e-4 * sqrt (16384.0 / float dSae))

    /// The AuxK latents of `auxK`: 4·d_in, at most half the dictionary.
    let auxKLatents (dIn: int) (dSae: int) = max 1 (min (4 * dIn) (dSae / 2))

    /// AuxK's coefficient in `topK`: 1/4, eight times sparsify's 1/32.
    [<Literal>]
    let AuxKCoefficient = 0.25

    /// The TopK recipe: sparsify's (FVU + AuxK, learning rate `lr`), changed where it left dead features on short runs
    /// (bench/README.md, "Dead features"): the encoder starts as the decoder's transpose, a feature counts as dead after
    /// 1/50 of the run's tokens (at most 10M) rather than 1/4, and AuxK revives them with `auxKLatents` latents and
    /// coefficient `AuxKCoefficient`. On the default model's layer 0 (2,048 features, k 32, 1M training tokens) this
    /// took the features silent over 1M held-out tokens from 27% to 4.4% at equal FVU.
    let topK (dIn: int) (dSae: int) (steps: int) (batch: int) : TrainConfig =
        let kAux = auxKLatents dIn dSae
        { TrainConfig.Paper with
            Steps = steps; BatchSize = batch
            Lr = lr dSae
            Schedule = { WarmupSteps = max 1 (min 1000 (steps / 20)); DecayFraction = 0.2; FinalFraction = 0.0 }
            Loss = { LossConfig.TopK kAux with Auxiliary = AuxK(kAux, AuxKCoefficient) }
            EncoderInit = DecoderTranspose
            DeadAfterTokens = max (int64 batch) (min 10_000_000L (int64 steps * int64 batch / 50L))
            Normalise = true; NormalisationBatches = 1; BiasInit = Normalisation.MeanBias; BiasInitBatches = 1
            LogEvery = max 1 (steps / 100); DensityWindowSteps = 0
            Compute = ComputeOptions.Default }

    /// The transcoder paper's ReLU recipe on normalised activations: MSE (summed over dimensions) + λ·L1 with
    /// unit-norm decoders, ghost grads for dead features, the same optimiser settings as `topK`.
    let relu (lambda: float) (dIn: int) (dSae: int) (steps: int) (batch: int) : TrainConfig =
        { topK dIn dSae steps batch with
            Loss = { Reconstruction = Mse; Sparsity = L1 false; SparsityCoefficient = lambda
                     PreActCoefficient = 0.0; PreActDeadOnly = true; Auxiliary = GhostGrads }
            // the ReLU recipe as validated on stories260K: independent encoder, ghost grads after 1/4 of the run
            EncoderInit = RandomEncoder
            DeadAfterTokens = max 1L (min 10_000_000L (int64 steps * int64 batch / 4L)) }

    /// The recommended training settings for a coder configuration: `topK` for TopK/BatchTopK coders, `relu` with
    /// λ = `lambda` for ReLU coders, and for JumpReLU coders `relu`'s optimiser with Anthropic's loss (MSE +
    /// λ·tanh(4·‖W_dec‖·a) + 3e-6 pre-activation loss).
    let forCoder (c: CoderConfig) (lambda: float) (steps: int) (batch: int) : TrainConfig =
        match c.Activation with
        | TopK _ | BatchTopK _ | GroupMax _ -> topK c.DIn c.DSae steps batch
        | ReLU -> relu lambda c.DIn c.DSae steps batch
        | JumpReLU _ -> { relu lambda c.DIn c.DSae steps batch with Loss = LossConfig.Anthropic lambda }
