/// Downstream evaluation of coders spliced into their model: next-token cross-entropy of the clean, spliced and
/// zero-ablated models, the fraction of CE recovered, KL to the clean model and top-1 agreement (the transcoder
/// paper's spliced CE and its zero-ablation baseline; SAELens' CE-loss score and KL score).
module Transcoders.Coders.SplicedEval

open TorchSharp
open Transcoders.Models

type Tensor = torch.Tensor

/// Metrics of one set of coders spliced in together (without error terms), over all batches.
type SplicedMetrics =
    { /// Token positions run (batch × positions, summed over batches).
      Tokens: int64
      /// Positions with a next token to predict (batch × (positions − 1)): the CE averages over these.
      Predictions: int64
      /// Mean next-token cross-entropy of the original model, nats.
      CeClean: float
      /// ... with every coder's output hooks replaced by the coder's prediction.
      CeSpliced: float
      /// ... with those output hooks set to zero.
      CeAblated: float
      /// (CE_ablated − CE_spliced) / (CE_ablated − CE_clean): 1 when the coders are exact, 0 when they are no
      /// better than zero (NaN when ablating changes nothing).
      CeRecovered: float
      /// CE_spliced − CE_clean.
      CeDelta: float
      /// Mean over all positions of KL(clean ‖ spliced) of the next-token distributions, nats.
      KlToClean: float
      /// Mean over all positions of KL(clean ‖ ablated).
      KlAblated: float
      /// 1 − KlToClean / KlAblated (SAELens' KL score).
      KlRecovered: float
      /// Fraction of all positions where the spliced model's most likely next token is the clean model's.
      Top1Agreement: float
      /// The same for the ablated model.
      Top1AgreementAblated: float
      /// Mean over positions of cos(clean logits, spliced logits).
      LogitCosine: float }

/// Σ over predicted positions of −log p(next token) (float64), from logits [B, P, V] and tokens [B, P].
let private ceSum (logits: Tensor) (tokens: Tensor) : float =
    let p = logits.shape[1]
    if p < 2L then 0.0
    else
        let lp = logits.narrow(1, 0L, p - 1L).to_type(torch.float32).log_softmax(-1L)
        let next = tokens.narrow(1, 1L, p - 1L).unsqueeze(-1L)
        lp.gather(-1L, next).to_type(torch.float64).sum().item<float> () * -1.0

type private Sums =
    { mutable Spliced: float
      mutable Ablated: float
      mutable SplicedCmp: LogitComparison
      mutable AblatedCmp: LogitComparison }

/// Evaluates several sets of coders over the same batches, running the clean model once per batch: each set is
/// spliced in alone (its coders together) and, as the baseline, its output hooks are zero-ablated. `tokens`:
/// batches of token ids [B, P] (int64, on the model's device); the sequence is read once, one dispose scope
/// per batch, under no_grad. Results in the order of `coderSets`.
let evaluateMany (model: Transformer) (coderSets: Coder list list) (tokens: seq<Tensor>) : SplicedMetrics list =
    if coderSets.IsEmpty then invalidArg "coderSets" "no coder sets to evaluate"
    for coders in coderSets do
        if coders.IsEmpty then invalidArg "coderSets" "a coder set is empty: nothing would be spliced"
        Splicing.validate model.Config coders
    let sums = coderSets |> List.map (fun _ -> { Spliced = 0.0; Ablated = 0.0; SplicedCmp = LogitComparison.Zero; AblatedCmp = LogitComparison.Zero })
    let mutable clean = 0.0
    let mutable positions = 0L
    let mutable predictions = 0L
    for batch in tokens do
        use scope = torch.NewDisposeScope()
        use _ = torch.no_grad ()
        let t = model.CheckTokens(batch, 0)
        let t = if t.device_type = model.Device.``type`` then t else t.``to``(model.Device)
        let logits = Transformer.forward model t
        clean <- clean + ceSum logits t
        positions <- positions + t.numel ()
        predictions <- predictions + t.shape[0] * (t.shape[1] - 1L)
        for coders, s in List.zip coderSets sums do
            let spliced = Transformer.runWithHooks model (Splicing.hooks coders Splicing.WithoutErrorTerms) t
            let ablated = Transformer.runWithHooks model (Splicing.zeroAblationHooks (Splicing.outputHooks coders)) t
            s.Spliced <- s.Spliced + ceSum spliced t
            s.Ablated <- s.Ablated + ceSum ablated t
            s.SplicedCmp <- s.SplicedCmp + LogitComparison.ofLogits logits spliced
            s.AblatedCmp <- s.AblatedCmp + LogitComparison.ofLogits logits ablated
    if predictions = 0L then
        invalidArg "tokens" (sprintf "no next-token predictions to evaluate (%d positions in all; each sequence needs at least 2 tokens)" positions)
    let n = float predictions
    [ for s in sums ->
        let ceClean, ceSpliced, ceAblated = clean / n, s.Spliced / n, s.Ablated / n
        let f = LogitComparison.fidelity s.SplicedCmp
        let fa = LogitComparison.fidelity s.AblatedCmp
        { Tokens = positions
          Predictions = predictions
          CeClean = ceClean
          CeSpliced = ceSpliced
          CeAblated = ceAblated
          CeRecovered = (ceAblated - ceSpliced) / (ceAblated - ceClean)
          CeDelta = ceSpliced - ceClean
          KlToClean = f.KlToOriginal
          KlAblated = fa.KlToOriginal
          KlRecovered = 1.0 - f.KlToOriginal / fa.KlToOriginal
          Top1Agreement = f.Top1Agreement
          Top1AgreementAblated = fa.Top1Agreement
          LogitCosine = f.LogitCosine } ]

/// Splices `coders` together (without error terms) and measures them against the clean model and the zero-ablation
/// of their output hooks (see `evaluateMany`). For "all layers replaced", pass every layer's coder.
let evaluate (model: Transformer) (coders: Coder list) (tokens: seq<Tensor>) : SplicedMetrics =
    evaluateMany model [ coders ] tokens |> List.head
