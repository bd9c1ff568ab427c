namespace Transcoders.Models

open System
open TorchSharp

/// The unembedding W_U (its own matrix, or the token embedding's when tied) and an optional bias.
type Unembed(c: TransformerConfig) as this =
    inherit torch.nn.Module("Unembed")
    do
        if not c.TiedUnembed then
            let w = torch.empty(int64 c.VocabSize, int64 c.DModel)
            (use _ = torch.no_grad () in torch.nn.init.normal_(w, 0.0, c.InitRange, Transcoders.Tensors.Rng.generator w.device) |> ignore)
            this.register_parameter("weight", torch.nn.Parameter(w, true))
        if c.Biases.Unembed then this.register_parameter("bias", torch.nn.Parameter(torch.zeros(int64 c.VocabSize), true))

    /// x [b,p,d] → logits [b,p,vocab]; `embedding` is W_E [vocab, d], used when tied.
    member this.Run(x: torch.Tensor, embedding: torch.Tensor) =
        let w = if c.TiedUnembed then embedding else this.get_parameter "weight"
        let b = if c.Biases.Unembed then this.get_parameter "bias" :> torch.Tensor else null
        F.linear(x, w, b)

/// A decoder-only transformer (GPT-2, Llama, tinymodel and their mixtures, any size), as in nanoGPT:
/// embed → blocks of x + attn(ln1 x), x + mlp(ln2 x) (or x + attn(ln1 x) + mlp(ln2 x) with a parallel residual)
/// → ln_final → unembed. `forward tokens` gives logits
/// [batch, pos, vocab]; `Transformer.run` adds hook points (TransformerLens names, see `HookNames`).
/// Make one with `Transformer.create` or a loader (`Checkpoint`, `HuggingFace`, `Llama2c`).
type Transformer private (config: TransformerConfig) as this =
    inherit torch.nn.Module<torch.Tensor, torch.Tensor>("Transformer")
    let c = config
    let embed = torch.nn.Embedding(int64 c.VocabSize, int64 c.DModel)
    let posEmbed =
        match c.Positions with
        | Learned -> torch.nn.Embedding(int64 c.NCtx, int64 c.DModel)
        | Rotary _ -> null
    let blocks = torch.nn.ModuleList<Block>([| for l in 0 .. c.NLayers - 1 -> new Block(c, l) |])
    let lnFinal = new Norm((if c.FinalNorm then c.Norm else NoNorm), c.DModel, c.NormEps, "ln_final")
    let unembed = new Unembed(c)
    do
        (use _ = torch.no_grad ()
         torch.nn.init.normal_(embed.weight, 0.0, c.InitRange, Transcoders.Tensors.Rng.generator embed.weight.device) |> ignore
         if not (isNull posEmbed) then torch.nn.init.normal_(posEmbed.weight, 0.0, c.InitRange, Transcoders.Tensors.Rng.generator posEmbed.weight.device) |> ignore)
        this.register_module("embed", embed)
        if not (isNull posEmbed) then this.register_module("pos_embed", posEmbed)
        this.register_module("blocks", blocks)
        this.register_module("ln_final", lnFinal)
        this.register_module("unembed", unembed)
        match c.Positions with
        | Rotary (_, theta) ->
            let cos, sin = Rotary.tables c.NCtx (TransformerConfig.rotaryDim c) theta torch.CPU
            this.register_buffer("rotary_cos", cos.DetachFromDisposeScope(), false)
            this.register_buffer("rotary_sin", sin.DetachFromDisposeScope(), false)
        | Learned -> ()

    /// Builds a model with freshly initialised weights (GPT-2's scheme: N(0, InitRange), output
    /// projections N(0, InitRange/√(2L)), zero biases, unit norm weights) on `device`. `Device.seed` makes it
    /// reproducible (draws come from the seeded flow's generator, `Rng`). The model owns its parameters (outside any dispose scope).
    /// It starts in training mode, as PyTorch modules do (only dropout cares); loaders return eval mode.
    static member Create(config: TransformerConfig, device: torch.Device) : Transformer =
        let config = TransformerConfig.validate config
        use scope = torch.NewDisposeScope()
        let m = new Transformer(config)
        m.``to``(device) |> ignore
        for p in m.parameters () do p.DetachFromDisposeScope() |> ignore
        for struct (_, b) in m.named_buffers () do b.DetachFromDisposeScope() |> ignore
        m

    member _.Config = c
    /// The device of the parameters. (`embed.weight` makes a new wrapper on every read: disposed here, or each read
    /// would leave a tensor to the finaliser.)
    member _.Device =
        use w = embed.weight
        w.device
    member _.Blocks : Block list = List.ofSeq blocks

    /// The forward pass with hook points. `cache` supplies earlier positions' keys and values and
    /// receives this call's (it advances only when the whole model ran). With `stopAtLayer = Some l`
    /// it returns the residual stream entering block l (after hook_resid_pre; l = n_layers gives the
    /// stream after the last block) instead of logits.
    ///
    /// Memory: the embedding, every block and the unembedding run in dispose scopes of their own (`HookPoints.InScope`),
    /// so a block's temporaries (its attention scores, MLP hidden units, normalisation steps) and the residual stream
    /// it consumed are freed when the block ends; the pass holds one block's temporaries at a time. What the caller
    /// gets back — the output, the cached values, what hooks saw and made — lands in the caller's dispose scope, as
    /// every tensor of the pass did before.
    member this.Run(tokens: torch.Tensor, hp: HookPoints, cache: KvCache option, stopAtLayer: int option) : torch.Tensor =
        let run = torch.NewDisposeScope()
        let outer = hp.RunScope
        hp.RunScope <- run
        try
            this.RunIn(run, tokens, hp, cache, stopAtLayer)
        finally
            hp.RunScope <- outer
            run.MoveToOuter run.DisposablesView
            run.Dispose()

    member private this.RunIn(run: DisposeScope, tokens: torch.Tensor, hp: HookPoints, cache: KvCache option, stopAtLayer: int option) : torch.Tensor =
        let tokens = this.CheckTokens(tokens, (match cache with Some k -> k.Length | None -> 0))
        let b, p = tokens.shape.[0], tokens.shape.[1]
        let start = match cache with Some k -> k.Length | None -> 0
        if cache.IsSome && stopAtLayer.IsSome then invalidArg "stopAtLayer" "stopAtLayer cannot be combined with a KV cache"
        // the residual stream the previous piece made in its own scope (null when a hook made it: hooks may keep theirs)
        let mutable stream : torch.Tensor = null
        // a piece of the pass reading `input`; when the model made that stream, it is freed with the piece's temporaries
        let piece (input: torch.Tensor) (f: unit -> torch.Tensor) =
            let mutable owned = false
            let y =
                hp.InScope(fun s ->
                    if not (isNull input) && obj.ReferenceEquals(input, stream) && run.Contains input then
                        run.MoveToOther(s, input) |> ignore
                    let y = f ()
                    owned <- s.Contains y
                    y)
            stream <- (if owned then y else null)
            y
        let x =
            piece null (fun () ->
                let x = hp.Point(HookNames.embed, embed.forward tokens)
                let x =
                    if isNull posEmbed then x
                    else
                        let positions = torch.arange(int64 start, int64 start + p, dtype = torch.int64, device = tokens.device)
                        x + hp.Point(HookNames.posEmbed, posEmbed.forward(positions).unsqueeze(0).expand(b, p, int64 c.DModel))
                Init.dropout this.training c.Dropout x)
        let pos =
            { Start = start
              Rotate =
                match c.Positions with
                | Rotary (layout, _) -> Some (Rotary.apply layout (this.get_buffer "rotary_cos") (this.get_buffer "rotary_sin") start)
                | Learned -> None }
        let last = defaultArg stopAtLayer c.NLayers
        let mutable x = x
        for l in 0 .. last - 1 do
            x <- piece x (fun () -> blocks.[l].Run(hp.Point(HookNames.residPre l, x), hp, pos, cache))
        match stopAtLayer with
        | Some l when l < c.NLayers -> hp.Point(HookNames.residPre l, x)
        | Some _ -> x
        | None ->
            cache |> Option.iter (fun k -> k.Advance(int p))
            piece x (fun () -> unembed.Run(lnFinal.Run(x, hp), embed.weight))

    /// Token ids as int64 [batch, pos] (a 1-D input becomes a batch of one), checked against the
    /// vocabulary and the context length.
    member _.CheckTokens(tokens: torch.Tensor, start: int) : torch.Tensor =
        if isNull tokens then nullArg "tokens"
        let tokens =
            match tokens.dim () with
            | 1L -> tokens.unsqueeze 0
            | 2L -> tokens
            | n -> invalidArg "tokens" (sprintf "token ids must be [batch, pos] (or [pos]), got %d dimensions %s" n (Shape.show tokens.shape))
        let tokens =
            match tokens.dtype with
            | torch.ScalarType.Int64 -> tokens
            | torch.ScalarType.Int32 | torch.ScalarType.Int16 | torch.ScalarType.Int8 | torch.ScalarType.Byte -> tokens.to_type torch.int64
            | t -> invalidArg "tokens" (sprintf "token ids must be integers, got %A" t)
        let p = int tokens.shape.[1]
        if p = 0 then invalidArg "tokens" "the sequence is empty (0 positions)"
        if start + p > c.NCtx then
            invalidArg "tokens" (sprintf "a sequence of %d positions%s exceeds the context length n_ctx = %d" p (if start > 0 then sprintf " after %d cached ones" start else "") c.NCtx)
        if tokens.numel () > 0L then
            let lo, hi = tokens.min().item<int64> (), tokens.max().item<int64> ()
            if lo < 0L || hi >= int64 c.VocabSize then
                let bad = if lo < 0L then lo else hi
                use hits = tokens.eq(torch.tensor((bad: int64), device = tokens.device)).nonzero().cpu()
                let where = hits.select(0, 0L).data<int64>().ToArray() : int64[]
                invalidArg "tokens" (sprintf "token id %d at [%d, %d] is out of range: the vocabulary has %d ids (0..%d)" bad where.[0] where.[1] c.VocabSize (c.VocabSize - 1))
        tokens

    /// tokens [batch, pos] → logits [batch, pos, vocab].
    override this.forward(tokens: torch.Tensor) = this.Run(tokens, HookPoints.None, None, None)

/// What a hooked run caches, which hooks it runs, and where it stops.
type RunOptions =
    { /// Hook points to save: exact names or globs with `*` (e.g. "blocks.*.hook_resid_pre").
      Cache: Set<string>
      /// Functions run at hook points (exact names or globs), in list order; each returns the activation
      /// or a same-shaped replacement.
      Hooks: (string * HookFn) list
      /// Return the residual stream entering this layer (after its hook_resid_pre) and compute no logits;
      /// n_layers gives the stream after the last block.
      StopAtLayer: int option
      /// Cache values detached from autograd (true, as TransformerLens) or still in the graph (false).
      DetachCache: bool }

    static member Default = { Cache = Set.empty; Hooks = []; StopAtLayer = None; DetachCache = true }

/// What a run returns. The caller owns every tensor: dispose the result (`use r = Transformer.run ...`)
/// to free them all, or take tensors out and dispose those.
type RunResult =
    { /// [batch, pos, vocab]; None when the run stopped early.
      Logits: torch.Tensor option
      /// [batch, pos, d_model], the residual stream where the run stopped (StopAtLayer only).
      Residual: torch.Tensor option
      /// Cached activations by hook name (shapes in `HookNames`).
      Cache: Map<string, torch.Tensor> }

    /// A cached activation, with a clear error when it was not cached.
    member r.Item
        with get (name: string) =
            match r.Cache.TryFind name with
            | Some t -> t
            | None ->
                invalidArg "name" (sprintf "'%s' is not in the cache; cached: %s" name (r.Cache |> Map.keys |> String.concat ", "))

    interface IDisposable with
        member r.Dispose() =
            r.Logits |> Option.iter (fun t -> t.Dispose())
            r.Residual |> Option.iter (fun t -> t.Dispose())
            for t in r.Cache.Values do t.Dispose()

/// Functions over a `Transformer` value (composable with |>).
[<RequireQualifiedAccess>]
module Transformer =

    /// A model with freshly initialised weights on `device` (see `Transformer.Create`).
    let create (config: TransformerConfig) (device: torch.Device) = Transformer.Create(config, device)

    let config (m: Transformer) = m.Config

    /// tokens [batch, pos] int64 → logits [batch, pos, vocab] (the caller owns them).
    let forward (m: Transformer) (tokens: torch.Tensor) = m.forward tokens

    let private runWith (m: Transformer) (kv: KvCache option) (opts: RunOptions) (tokens: torch.Tensor) : RunResult =
        opts.StopAtLayer |> Option.iter (fun l ->
            if kv.IsSome then invalidArg "StopAtLayer" "StopAtLayer cannot be combined with a KV cache"
            if l < 0 || l > m.Config.NLayers then
                invalidArg "StopAtLayer" (sprintf "StopAtLayer %d is outside 0..%d (n_layers)" l m.Config.NLayers))
        let hp = HookPoints.Create(m.Config, opts.Cache, opts.Hooks, opts.DetachCache)
        use scope = torch.NewDisposeScope()
        // alias: the output may be a tensor the caller passed to a hook, which must not leave its own scope
        let out = m.Run(tokens, hp, kv, opts.StopAtLayer).alias().MoveToOuterDisposeScope()
        // what hooks moved out of their scope goes where it would had the hooks run in this scope
        for t in hp.TakeEscaped() do if scope.Contains t then scope.MoveToOuter t |> ignore
        let cache = hp.Cached |> Seq.map (fun kv -> kv.Key, kv.Value.MoveToOuterDisposeScope()) |> Map.ofSeq
        match opts.StopAtLayer with
        | Some _ -> { Logits = None; Residual = Some out; Cache = cache }
        | None -> { Logits = Some out; Residual = None; Cache = cache }

    /// A forward pass with caching, hooks and early stopping (see RunOptions). Every intermediate tensor
    /// is disposed at the end; the result's tensors belong to the caller.
    let run (m: Transformer) (opts: RunOptions) (tokens: torch.Tensor) : RunResult = runWith m None opts tokens

    /// Logits and the activations at `names` (exact or globs), as TransformerLens' run_with_cache.
    let runWithCache (m: Transformer) (names: string seq) (tokens: torch.Tensor) : RunResult =
        run m { RunOptions.Default with Cache = Set.ofSeq names } tokens

    /// Logits of a run with these hooks, as TransformerLens' run_with_hooks.
    let runWithHooks (m: Transformer) (hooks: (string * HookFn) list) (tokens: torch.Tensor) : torch.Tensor =
        let r = run m { RunOptions.Default with Hooks = hooks } tokens
        r.Logits.Value

    /// An empty KV cache for `batch` sequences of up to `capacity` positions (at most n_ctx).
    let kvCache (m: Transformer) (batch: int) (capacity: int) : KvCache =
        let c = m.Config
        if capacity > c.NCtx then
            invalidArg "capacity" (sprintf "KV cache capacity %d exceeds the context length n_ctx = %d" capacity c.NCtx)
        new KvCache(c.NLayers, batch, c.NKvHeads, TransformerConfig.dHead c, capacity, m.Device)

    /// Logits [batch, new, vocab] of the new tokens [batch, new] continuing the cached positions; the
    /// cache then holds them too. Same logits as a full forward over the whole sequence.
    let forwardCached (m: Transformer) (cache: KvCache) (tokens: torch.Tensor) : torch.Tensor =
        m.Run(tokens, HookPoints.None, Some cache, None)

    /// As forwardCached, with hooks and caching (hooks see only the new positions; attention patterns
    /// are [b, h, new, cached+new]).
    let runCached (m: Transformer) (cache: KvCache) (opts: RunOptions) (tokens: torch.Tensor) : RunResult =
        runWith m (Some cache) opts tokens

    /// Named parameters in registration order (the names our checkpoints use).
    let parameters (m: Transformer) : (string * TorchSharp.Modules.Parameter) list =
        [ for struct (name, p) in m.named_parameters () -> name, p ]

    /// Number of parameters (tied matrices counted once).
    let parameterCount (m: Transformer) = m.parameters () |> Seq.sumBy (fun p -> p.numel ())

    /// Mean cross-entropy of predicting tokens[:, 1:] from logits[:, :-1] (next-token loss, nats).
    let nextTokenLoss (logits: torch.Tensor) (tokens: torch.Tensor) : torch.Tensor =
        let tokens = if tokens.dim () = 1L then tokens.unsqueeze 0 else tokens
        let v = logits.shape.[2]
        let p = logits.shape.[1]
        F.cross_entropy(logits.narrow(1, 0L, p - 1L).reshape(-1L, v), tokens.narrow(1, 1L, p - 1L).reshape(-1L))
