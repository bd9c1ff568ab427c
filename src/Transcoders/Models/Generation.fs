/// Autoregressive generation: greedy decoding or sampling with temperature and top-k, with a KV cache,
/// stop tokens and hooks (for steering and ablation while generating).
module Transcoders.Models.Generation

open TorchSharp

/// What to do when the sequence would outgrow the context length n_ctx.
type ContextOverflow =
    /// Refuse up front when prompt + MaxNewTokens exceeds n_ctx (a clear error).
    | Fail
    /// Keep going on the last n_ctx tokens (nanoGPT's crop): once the sequence fills the context, each
    /// step re-runs the model on the window without the KV cache, so positions restart at 0 in each window.
    | SlidingWindow

/// How to generate.
type GenerateOptions =
    { /// Tokens to add at most.
      MaxNewTokens: int
      /// 0 picks the most likely token (greedy); otherwise logits are divided by it before sampling.
      Temperature: float
      /// Sample only among the k most likely tokens.
      TopK: int option
      /// Seed of a private generator (reproducible on the CPU); None draws from torch's global generator.
      Seed: int64 option
      /// Generation stops after emitting one of these (it is included in the output).
      StopTokens: Set<int>
      /// Reuse earlier positions' keys and values (one position of work per step) instead of re-running
      /// the whole sequence; both give the same logits.
      UseKvCache: bool
      Overflow: ContextOverflow
      /// Hooks run at every step (exact names or globs, see `HookNames`). With the KV cache, a hook sees
      /// only the step's new positions (the whole prompt at the first step, then one position).
      Hooks: (string * HookFn) list }

    /// Greedy decoding of up to 32 tokens with the KV cache, no stop tokens.
    static member Greedy =
        { MaxNewTokens = 32; Temperature = 0.0; TopK = None; Seed = None; StopTokens = Set.empty
          UseKvCache = true; Overflow = Fail; Hooks = [] }

/// Why generation ended.
type StopReason =
    /// One of the stop tokens was emitted (it ends the sequence).
    | StopToken of int
    /// MaxNewTokens tokens were added.
    | ReachedMaxNewTokens

/// A generated sequence.
type Generated =
    { /// The prompt followed by the new tokens.
      Tokens: int[]
      PromptLength: int
      Stop: StopReason }

    member g.NewTokens = g.Tokens.[g.PromptLength ..]

let private check (c: TransformerConfig) (o: GenerateOptions) (prompt: int[]) =
    if prompt.Length = 0 then invalidArg "prompt" "the prompt is empty: give at least one token (e.g. BOS)"
    if o.MaxNewTokens < 0 then invalidArg "MaxNewTokens" (sprintf "MaxNewTokens must be >= 0, got %d" o.MaxNewTokens)
    if not (o.Temperature >= 0.0) || System.Double.IsInfinity o.Temperature then
        invalidArg "Temperature" (sprintf "Temperature must be a finite number >= 0 (0 = greedy), got %g" o.Temperature)
    match o.TopK with
    | Some k when k <= 0 -> invalidArg "TopK" (sprintf "TopK must be positive, got %d" k)
    | _ -> ()
    match prompt |> Array.tryFind (fun t -> t < 0 || t >= c.VocabSize) with
    | Some t -> invalidArg "prompt" (sprintf "prompt token %d is out of range: the vocabulary has %d ids" t c.VocabSize)
    | None -> ()
    if o.Overflow = Fail && prompt.Length + o.MaxNewTokens > c.NCtx then
        invalidArg "MaxNewTokens"
            (sprintf "prompt (%d tokens) + MaxNewTokens (%d) = %d exceeds the context length n_ctx = %d (use Overflow = SlidingWindow to crop)"
                prompt.Length o.MaxNewTokens (prompt.Length + o.MaxNewTokens) c.NCtx)

/// The next token from one position's logits [vocab]: argmax when Temperature = 0, else a draw from
/// softmax(logits / T) restricted to the TopK largest logits.
let pick (o: GenerateOptions) (generator: torch.Generator) (logits: torch.Tensor) : int =
    use scope = torch.NewDisposeScope()
    let logits = logits.to_type(torch.float32).reshape(-1L)
    if o.Temperature = 0.0 then int (logits.argmax().item<int64> ())
    else
        let scaled = logits / o.Temperature
        let scaled =
            match o.TopK with
            | Some k when int64 k < scaled.shape.[0] ->
                let struct (top, _) = scaled.topk(k)
                scaled.masked_fill(scaled.lt(top.narrow(0, int64 k - 1L, 1L)), System.Double.NegativeInfinity)
            | _ -> scaled
        let probs = torch.nn.functional.softmax(scaled, 0L)
        int (torch.multinomial(probs, 1L, false, generator).item<int64> ())

/// Continues `prompt` (token ids) with `model`. Runs under no_grad, one dispose scope per step.
let generate (model: Transformer) (o: GenerateOptions) (prompt: int[]) : Generated =
    let c = model.Config
    check c o prompt
    use _ = torch.no_grad ()
    let device = model.Device
    use generator = match o.Seed with Some s -> new torch.Generator(uint64 s, device) | None -> null
    let hooks = HookPoints.Create(c, [], o.Hooks, true)
    let tokens = ResizeArray<int>(prompt)
    let capacity = min c.NCtx (prompt.Length + o.MaxNewTokens)
    let cache = if o.UseKvCache && prompt.Length <= c.NCtx then Some (Transformer.kvCache model 1 capacity) else None
    use _ = { new System.IDisposable with member _.Dispose() = cache |> Option.iter (fun k -> (k :> System.IDisposable).Dispose()) }
    let ids (xs: int seq) = torch.tensor(xs |> Seq.map int64 |> Array.ofSeq, device = device).unsqueeze(0)
    let nextLogits () =
        // the last position's logits [vocab]
        match cache with
        | Some cache when tokens.Count <= cache.Capacity ->
            let fresh = tokens.GetRange(cache.Length, tokens.Count - cache.Length)
            model.Run(ids fresh, hooks, Some cache, None).[0L, -1L]
        | _ ->
            let window = tokens.GetRange(max 0 (tokens.Count - c.NCtx), min tokens.Count c.NCtx)
            model.Run(ids window, hooks, None, None).[0L, -1L]
    let rec loop produced =
        if produced = o.MaxNewTokens then ReachedMaxNewTokens
        else
            let next =
                use scope = torch.NewDisposeScope()
                let logits = nextLogits ()
                // what hooks moved out of their scope goes where it would had the hooks run in this scope
                for t in hooks.TakeEscaped() do if scope.Contains t then scope.MoveToOuter t |> ignore
                pick o generator logits
            tokens.Add next
            if o.StopTokens.Contains next then StopToken next else loop (produced + 1)
    let stop = loop 0
    { Tokens = tokens.ToArray(); PromptLength = prompt.Length; Stop = stop }

/// Greedy continuation of `prompt` by up to `maxNewTokens` tokens (KV cache, no stop tokens).
let greedy (model: Transformer) (maxNewTokens: int) (prompt: int[]) : int[] =
    (generate model { GenerateOptions.Greedy with MaxNewTokens = maxNewTokens } prompt).Tokens
