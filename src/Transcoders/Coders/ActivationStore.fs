namespace Transcoders.Coders

open System
open System.IO
open TorchSharp
open Transcoders.Activations
open Transcoders.Files
open Transcoders.Models
open Transcoders.Text

/// The text a model is run on to train and evaluate coders: a training token stream, a held-out validation
/// stream, and the tokenizer's BOS id (documents start with it in both streams).
type ModelText =
    { /// Where the tokens come from (recorded in activation caches and run descriptions).
      Name: string
      Train: int[]
      Validation: int[]
      Bos: int option
      VocabSize: int }

/// Building `ModelText` from token shards or from the shipped TinyStories.
module ModelText =
    /// The `train` and `validation` token shard folders under `folder` (as `TokenShards.prepare` writes them).
    let ofShards (folder: string) : ModelText =
        let trainMeta, train = TokenShards.read (Path.Combine(folder, "train"))
        let validMeta, valid = TokenShards.read (Path.Combine(folder, "validation"))
        if trainMeta.TokenizerJson <> validMeta.TokenizerJson then
            raise (TokenShards.ShardError(folder, "the train and validation shards were made with different tokenizers"))
        let tokenizer = TokenShards.tokenizerOf trainMeta
        { Name = sprintf "%s (%s)" (Path.GetFullPath folder) trainMeta.TokenizerName
          Train = train
          Validation = valid
          Bos = (if trainMeta.Bos then Tokenizer.bos tokenizer else None)
          VocabSize = trainMeta.VocabSize }

    /// Tokenizes corpus `files` (TinyStories format) with `tokenizer` into `folder/train` and `folder/validation`
    /// (the shipped validation file, when among `files`, is the validation split; otherwise a seeded 5% of the
    /// stories), BOS before every story; shards already in `folder` are reused when they were made from the same
    /// files with the same tokenizer.
    let prepare (tokenizer: Tokenizer) (files: string list) (folder: string) : ModelText =
        let reusable =
            try
                let t = TokenShards.readMeta (Path.Combine(folder, "train"))
                TokenShards.readMeta (Path.Combine(folder, "validation")) |> ignore
                let relaxed = Text.Json.JsonSerializerOptions(Encoder = Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping)
                t.TokenizerJson = (Tokenizer.toJson tokenizer).ToJsonString relaxed && t.Sources = TokenShards.sourcesOf files
            with _ -> false
        if not reusable then
            let hasValidation = files |> List.exists (fun f -> Path.GetFileName f = Corpus.shippedValidationFile)
            let options =
                { TokenShards.PrepareOptions.Default with
                    Split = if hasValidation then Corpus.ByFile [ Corpus.shippedValidationFile ] else Corpus.HeldOut(0.05, 42L) }
            TokenShards.prepare tokenizer files options folder |> ignore
        ofShards folder

    /// The shipped TinyStories tokenized with the tokenizer of the checkpoint at `modelPath` (`ModelTokenizer.find`),
    /// cached under `<cache>/corpus/tinystories-<tokenizer>`.
    let forModel (modelPath: string) : ModelText =
        let tokenizer = ModelTokenizer.find modelPath
        let tag = (Tokenizer.describe tokenizer).Replace("(", "-").Replace(")", "").Replace(", ", "-").Replace(" ", "")
        prepare tokenizer (Corpus.shippedFiles ()) (Path.Combine(Paths.cacheDir (), "corpus", "tinystories-" + tag))

    /// Fails clearly when the text's ids do not fit the model's vocabulary.
    let checkFits (config: TransformerConfig) (text: ModelText) =
        if text.VocabSize > config.VocabSize then
            invalidArg "text"
                (sprintf "the text '%s' was tokenized with a vocabulary of %d ids, but the model has %d: tokenize it with the model's tokenizer"
                    text.Name text.VocabSize config.VocabSize)

    /// Up to `maxRows` consecutive, non-overlapping rows of `ctx` tokens of the validation stream, in order.
    let validationRows (text: ModelText) (ctx: int) (maxRows: int) : int[][] =
        if ctx < 2 then invalidArg "ctx" (sprintf "rows need at least 2 tokens, got ctx %d" ctx)
        let n = min maxRows (text.Validation.Length / ctx)
        if n < 1 then
            invalidArg "text" (sprintf "the validation stream of '%s' holds %d tokens, fewer than one row of %d" text.Name text.Validation.Length ctx)
        Array.init n (fun i -> Array.sub text.Validation (i * ctx) ctx)

    /// Rows as int64 tensors [≤ batch, ctx] on `device`, `batch` rows at a time, lazily; each tensor is disposed
    /// when the enumeration moves past it.
    let tokenBatches (device: torch.Device) (batch: int) (rows: int[][]) : seq<torch.Tensor> =
        if batch < 1 then invalidArg "batch" (sprintf "batch must be at least 1, got %d" batch)
        seq {
            for chunk in Array.chunkBySize batch rows do
                let ctx = chunk[0].Length
                let flat = chunk |> Array.collect (Array.map int64)
                use t = torch.tensor(flat, ReadOnlySpan [| int64 chunk.Length; int64 ctx |], device = device)
                yield t
        }

/// How model passes take their token rows from a stream.
type TextRows =
    /// Documents (split at BOS) concatenated in a seeded order per epoch and cut into consecutive rows
    /// (`Batches.PackedRows`): every token is seen once per epoch; rows start mid-document.
    | Packed
    /// Rows at seeded random offsets of the stream (`Batches.randomWindows`).
    | RandomWindows

/// Settings of an `ActivationStore`.
type StoreConfig =
    { /// Token positions per row (at most the model's n_ctx; the transcoder paper: 128).
      Ctx: int
      /// Rows per model pass (the paper's store_batch_size: 32).
      PassRows: int
      Rows: TextRows
      /// Seed of the text order (packing order, window offsets).
      TextSeed: int64
      /// Leave BOS positions out of the rows (their activations are outliers that carry no text).
      DropBos: bool
      /// The shuffle buffer between the model and training; its `BatchSize` is the training batch size.
      Buffer: ShuffleBufferConfig }

    /// 32 rows of 128 tokens per pass, packed, BOS dropped, the paper's buffer (262,144 rows, half mixed).
    static member Default =
        { Ctx = 128; PassRows = 32; Rows = Packed; TextSeed = 0L; DropBos = true; Buffer = ShuffleBufferConfig.Default }

    /// Fails with a message naming the field at fault.
    member c.Validate() =
        if c.Ctx < 1 then invalidArg "Ctx" (sprintf "Ctx must be at least 1, got %d" c.Ctx)
        if c.PassRows < 1 then invalidArg "PassRows" (sprintf "PassRows must be at least 1, got %d" c.PassRows)
        c.Buffer.Validate()

/// An activation cache on disk for a store (see `ActivationCache`): written once by running the model, then read
/// by every later run with the same model, text, settings and hooks.
type DiskCache =
    { Dir: string
      /// Shard size, dtype, compression; `MaxRows` None caches as many rows as the run needs, and `Source`
      /// is filled in by the store (model fingerprint, text, settings).
      Settings: CacheConfig }

/// Runs a model over text once per batch of rows and serves the activations of every hook an `ActivationSpec`'s
/// coders need, from that one pass, as aligned rows through a seeded `ShuffleBuffer` (optionally through a disk
/// cache). The model stops after the last layer any hook needs; passes run under no_grad, each in its own
/// dispose scope. Pass k reads text rows k·PassRows .. (k+1)·PassRows − 1 (packed) or the windows of seed
/// (TextSeed, k), so the rows, the buffer and a resumed buffer are functions of the seeds.
[<Sealed>]
type ActivationStore(model: Transformer, tokens: int[], bos: int option, spec: ActivationSpec, config: StoreConfig, ?textName: string) =
    do config.Validate()
    do spec.Validate()
    let mc = model.Config
    let hooks = spec.Hooks
    let textName = defaultArg textName "tokens"
    do
        let known = HookNames.all mc
        for h in hooks do
            if not (List.contains h known) then
                let suggestion = try HookNames.resolveAmong known h |> ignore; "" with e -> e.Message
                let users = spec.Coders |> List.filter (fun c -> List.contains h (c.Inputs @ c.Targets)) |> List.map (fun c -> c.Coder)
                invalidArg "spec"
                    (sprintf "coder %s: hook '%s' is not a hook point of this model (%s)" (String.Join(", ", users)) h
                        (if suggestion = "" then "globs are not allowed here" else suggestion))
        if config.Ctx > mc.NCtx then
            invalidArg "Ctx" (sprintf "Ctx %d exceeds the model's context length n_ctx = %d" config.Ctx mc.NCtx)
        if tokens.Length < config.Ctx + 1 then
            invalidArg "tokens" (sprintf "the token stream holds %d tokens, fewer than one row of Ctx+1 = %d" tokens.Length (config.Ctx + 1))
    /// The layer to stop at: after the last block any hook lives in (n_layers for ln_final hooks).
    let stopAtLayer =
        hooks
        |> List.map (fun h ->
            if h.StartsWith "blocks." then int (h.Split('.')[1]) + 1
            elif h.StartsWith "ln_final." then mc.NLayers + 1
            else 0)
        |> List.max
    let runOptions =
        { RunOptions.Default with
            Cache = set hooks
            StopAtLayer = (if stopAtLayer > mc.NLayers then None else Some stopAtLayer) }
    let bosFilter = if config.DropBos && bos.IsSome then DropMarked else KeepBos
    let packed =
        lazy
            (let documents = match bos with Some b -> Batches.splitDocuments b tokens | None -> [| tokens |]
             Batches.PackedRows(documents, config.Ctx, config.TextSeed))
    let device = model.Device
    let mutable passesRun = 0L

    /// The hook -> row width of a model's activations (one tiny pass): [b, p, ...] gives the product of the trailing dims.
    static member Widths(model: Transformer, hooks: string list) : Map<string, int64> =
        use _ = torch.no_grad ()
        use scope = torch.NewDisposeScope()
        let tokens = torch.zeros([| 1L; 2L |], dtype = torch.int64, device = model.Device)
        use r = Transformer.run model { RunOptions.Default with Cache = set hooks } tokens
        hooks |> List.map (fun h -> h, (r[h]).shape[2..] |> Array.fold (*) 1L) |> Map.ofList

    member _.Spec = spec
    member _.Config = config
    /// Every hook the store serves, each once.
    member _.Hooks = hooks
    /// Where each pass stops (None: the whole model runs).
    member _.StopAtLayer = runOptions.StopAtLayer
    member _.BosFilter = bosFilter
    /// Model passes this store has run so far.
    member _.PassesRun = passesRun

    /// Token ids [PassRows, Ctx] (int64, on the model's device) of pass `pass`.
    member _.TokenRows(pass: int64) : torch.Tensor =
        if pass < 0L then invalidArg "pass" "the pass index must be non-negative"
        match config.Rows with
        | Packed ->
            let b = packed.Force().Batch(pass, config.PassRows, device)
            b.Targets.Dispose()
            b.Inputs
        | RandomWindows ->
            let b = Batches.randomWindows tokens config.PassRows config.Ctx config.TextSeed pass device
            b.Targets.Dispose()
            b.Inputs

    /// The activations of pass `pass` (the caller owns them; `Pass.dispose`).
    member s.Pass(pass: int64) : Pass =
        use _ = torch.no_grad ()
        use scope = torch.NewDisposeScope()
        let rows = s.TokenRows pass
        let r = Transformer.run model runOptions rows
        passesRun <- passesRun + 1L
        r.Residual |> Option.iter (fun t -> t.Dispose())
        r.Logits |> Option.iter (fun t -> t.Dispose())
        let acts = r.Cache |> Map.map (fun _ t -> t.MoveToOuterDisposeScope())
        let marks =
            match bosFilter, bos with
            | DropMarked, Some b -> Some(rows.eq(torch.tensor(int64 b, device = device)).MoveToOuterDisposeScope())
            | _ -> None
        { Activations = acts; Valid = None; Bos = marks }

    /// An endless row source of model passes, starting at `start` (pass `start.Chunk`, skipping `start.Row` rows).
    member s.Source(?start: Position) : IRowSource =
        let start = defaultArg start Position.Start
        let mutable next = start.Chunk
        let produce () =
            let p = s.Pass next
            next <- next + 1L
            Some p
        PassSource.ForSpec(spec, bosFilter, produce, start) :> IRowSource

    /// What a cache of this store's rows depends on (recorded in the cache manifest and checked on reuse): the
    /// model's configuration and a fingerprint of its weights, the text and every store setting that changes rows.
    member _.Provenance : Map<string, string> =
        let weights =
            use _ = torch.no_grad ()
            use scope = torch.NewDisposeScope()
            let mutable acc = 0.0
            let mutable i = 1.0
            for p in model.parameters () do
                let p64 = p.detach().to_type(torch.float64)
                acc <- acc + i * p64.sum().item<float>() + p64.square().sum().item<float>() / i
                i <- i + 1.0
            acc.ToString("R", Globalization.CultureInfo.InvariantCulture)
        let fnv =
            let mutable h = 14695981039346656037UL
            for t in tokens do h <- (h ^^^ uint64 (uint32 t)) * 1099511628211UL
            h.ToString("x16")
        Map.ofList
            [ "model_config", sprintf "d_model %d, layers %d, heads %d, d_mlp %d, vocab %d, n_ctx %d" mc.DModel mc.NLayers mc.NHeads mc.DMlp mc.VocabSize mc.NCtx
              "model_weights", weights
              "text", textName
              "text_tokens", sprintf "%d tokens, fnv64 %s" tokens.Length fnv
              "ctx", string config.Ctx
              "pass_rows", string config.PassRows
              "rows", (match config.Rows with Packed -> "packed" | RandomWindows -> "random_windows")
              "text_seed", string config.TextSeed
              "drop_bos", string config.DropBos ]

    /// Writes (or completes) the disk cache of this store's first `rows` rows, resuming an interrupted write.
    /// A cache of another model, text, setting or hook set in `cache.Dir` fails clearly.
    member s.WriteCache(cache: DiskCache, rows: int64, ?onShard: CacheManifest -> unit) : CacheManifest =
        let settings =
            { cache.Settings with
                MaxRows = Some(defaultArg cache.Settings.MaxRows rows)
                Source = Map.fold (fun (m: Map<string, string>) k v -> m.Add(k, v)) cache.Settings.Source s.Provenance }
        use source = s.Source(ActivationCache.resumePosition cache.Dir)
        ActivationCache.writeWith (defaultArg onShard ignore) cache.Dir settings source

    /// Whether `cache.Dir` holds a complete cache of at least `rows` rows of this store's passes for more hooks than
    /// this store's (a sweep's cache, written once for all its coders): it is then read as it is, these hooks only.
    member s.ServedBy(cache: DiskCache, rows: int64) : bool =
        File.Exists(Path.Combine(cache.Dir, CacheManifest.FileName))
        && (let m = CacheManifest.Read cache.Dir
            let cached = set [ for h in m.Hooks -> h.Name ]
            let source = Map.fold (fun (acc: Map<string, string>) k v -> acc.Add(k, v)) cache.Settings.Source s.Provenance
            m.Complete && m.TotalRows >= rows && cached.Count > hooks.Length && hooks |> List.forall cached.Contains
            && m.DType = cache.Settings.DType && m.Source = source)

    /// The cache reader settings of this store: the buffer's seed and device, shards in a seeded order, endless.
    member _.CacheReadConfig =
        { CachedReadConfig.Default with
            Seed = config.Buffer.Seed; ShuffleShards = true; Epochs = None; Device = config.Buffer.Device }

    /// A shuffle buffer over fresh passes of the model, or over `cache` (written first when needed, holding
    /// `cacheRows` rows, read in endless epochs).
    member s.OpenBuffer(?cache: DiskCache, ?cacheRows: int64) : ShuffleBuffer =
        match cache with
        | None -> new ShuffleBuffer(config.Buffer, s.Source())
        | Some c ->
            let rows = defaultArg cacheRows config.Buffer.Rows
            if not (s.ServedBy(c, rows)) then s.WriteCache(c, rows) |> ignore
            CachedActivationSource.Buffer(c.Dir, s.CacheReadConfig, config.Buffer, hooks)

    /// A buffer resumed from a state file written by `ShuffleBuffer.SaveState` (over the same model passes, or the
    /// same cache).
    member s.ResumeBuffer(statePath: string, ?cache: DiskCache) : ShuffleBuffer =
        match cache with
        | None ->
            let state, carried = ShuffleBuffer.LoadState(statePath, config.Buffer.Device)
            let source =
                try s.Source(state.SourceAtCycleStart)
                with _ ->
                    Rows.dispose carried
                    reraise ()
            ShuffleBuffer.Resume(config.Buffer, source, state, carried)
        | Some c -> CachedActivationSource.ResumeBuffer(c.Dir, s.CacheReadConfig, config.Buffer, statePath, hooks)

    /// The first `count` rows of the passes in order, unshuffled, as float32 tensors on the CPU (for held-out
    /// evaluation). Memory: count · Σ d · 4 bytes.
    member s.Collect(count: int64) : Rows =
        if count < 1L then invalidArg "count" (sprintf "collect at least 1 row, not %d" count)
        use source = s.Source()
        let parts = Collections.Generic.List<Rows>()
        let mutable left = count
        while left > 0L do
            use scope = torch.NewDisposeScope()
            match source.Read left with
            | Some r ->
                left <- left - Rows.validate "model passes" hooks r
                parts.Add(r |> Map.map (fun _ t -> t.``to``(torch.float32, torch.CPU).contiguous().MoveToOuterDisposeScope()))
            | None -> left <- 0L
        try hooks |> List.map (fun h -> h, torch.cat([| for p in parts -> p[h] |], 0L)) |> Map.ofList
        finally for p in parts do Rows.dispose p
