/// Activation metrics of several coders over a long token stream in constant memory: one model pass per chunk of
/// rows feeds every coder's `EvalAccumulator`, so dead features can be counted over millions of tokens (a feature
/// that fires once in 100k tokens looks dead over the 8k–32k tokens of the default held-out evaluation).
module Transcoders.Coders.StreamedEval

open System
open TorchSharp
open Transcoders.Activations

/// Which tokens a streamed evaluation reads.
type StreamSource =
    /// The validation stream from its start (packed rows; it wraps around, repeating tokens, when it is shorter).
    | ValidationText
    /// The training stream, packed in the training run's text order (`StoreConfig.TextSeed`), starting at model pass
    /// `FromPass`: passes before it are the ones training read, so a start beyond the passes a run consumed gives
    /// held-out tokens of the training distribution.
    | TrainTextFrom of FromPass: int64

/// Settings of `StreamedEval.evaluate`.
type StreamedEvalConfig =
    { Source: StreamSource
      /// Token positions to evaluate on (BOS positions are dropped as in training).
      Tokens: int64
      /// Rows read per model pass chunk.
      ChunkRows: int64
      Options: EvalOptions }

    static member Default = { Source = ValidationText; Tokens = 1_000_000L; ChunkRows = 4096L; Options = EvalOptions.Default }

/// Evaluates named coders over `config.Tokens` token positions of `text` (see `StreamSource`); the store's context,
/// rows per pass, text seed and BOS handling are `store`'s. `onChunk` receives the tokens evaluated so far.
let evaluate (model: Transcoders.Models.Transformer) (text: ModelText) (store: StoreConfig) (config: StreamedEvalConfig)
             (onChunk: int64 -> unit) (coders: (string * Coder) list) : (string * EvalResult) list =
    if config.Tokens < 1L then invalidArg "Tokens" (sprintf "evaluate at least one token, not %d" config.Tokens)
    if config.ChunkRows < 1L then invalidArg "ChunkRows" "ChunkRows must be at least 1"
    if coders.IsEmpty then []
    else
        let spec = { Coders = [ for n, c in coders -> CoderJob.hooksOf n c.Config ] }
        let tokens, start, seed, name =
            match config.Source with
            | ValidationText -> text.Validation, 0L, 0L, text.Name + " (validation)"
            | TrainTextFrom p ->
                if p < 0L then invalidArg "Source" "FromPass must be ≥ 0"
                text.Train, p, store.TextSeed, text.Name + " (train)"
        let s = ActivationStore(model, tokens, text.Bos, spec, { store with Rows = Packed; TextSeed = seed }, name)
        let accs = [ for n, c in coders -> n, EvalAccumulator(c) ]
        use source = s.Source { Position.Start with Chunk = start }
        let mutable left = config.Tokens
        let mutable fin = false
        while left > 0L && not fin do
            use scope = torch.NewDisposeScope()
            match source.Read(min left config.ChunkRows) with
            | Some rows ->
                try
                    let n = Rows.count rows
                    for (_, acc), (_, c) in List.zip accs coders do
                        let x, y = CoderJob.pair c.Config rows
                        acc.Add(x, y)
                    left <- left - n
                    onChunk (config.Tokens - left)
                finally Rows.dispose rows
            | None -> fin <- true
        [ for n, acc in accs -> n, acc.Result config.Options ]
