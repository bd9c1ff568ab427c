namespace Transcoders.Activations

open System
open System.IO
open TorchSharp
open Transcoders.Files
open Transcoders.Files.Safetensors

/// Settings for reading an activation cache.
type CachedReadConfig =
    { /// Seed of the shard order (one seeded permutation of the shards per epoch).
      Seed: int64
      /// Visit shards in a seeded random order (otherwise in file order).
      ShuffleShards: bool
      /// Passes over the cache; None repeats forever.
      Epochs: int64 option
      /// Where rows are delivered (the shuffle buffer's device).
      Device: torch.Device
      /// Check each shard's SHA-256 the first time this source reads it. SHA-256 runs at ~0.5 GB/s on this
      /// machine's .NET, against ~3 GB/s for reading an uncompressed shard: for fast (GPU) training from a
      /// cache, check it once with `ActivationCache.verify` and read with this off.
      VerifyChecksums: bool
      /// Read a cache whose writing has not finished (its complete shards only).
      AllowIncomplete: bool }

    static member Default =
        { Seed = 0L; ShuffleShards = true; Epochs = Some 1L; Device = torch.CPU; VerifyChecksums = true; AllowIncomplete = false }

/// Rows from an activation cache directory (see `ActivationCache`), shard by shard in a seeded order,
/// each shard's rows in file order (put a `ShuffleBuffer` on top to mix them: `CachedActivationSource.Buffer`).
/// Rows come in the cache's dtype on `Device`; the buffer converts them.
///
/// The position is (epoch, index in that epoch's shard order, rows taken from that shard): a source
/// created at a position with the same seed delivers exactly the rows that followed it. The manifest is
/// validated on open, every shard file's presence and size too (a missing or truncated shard fails
/// then, naming the file); a shard's checksum, header, dtype and shapes when it is read.
/// `hooks` selects some of the cached hooks (default all), e.g. one layer's pair from a cross-layer cache.
[<Sealed>]
type CachedActivationSource(dir: string, config: CachedReadConfig, ?start: Position, ?hooks: string list) =
    let manifest = CacheManifest.Read dir
    let manifestPath = Path.Combine(dir, CacheManifest.FileName)
    let fail path problem : 'a = raise (ActivationFileError(path, problem))
    do
        if not manifest.Complete && not config.AllowIncomplete then
            fail manifestPath "the cache is incomplete (its writing was interrupted?): resume writing it, or read it with AllowIncomplete"
        match config.Epochs with
        | Some e when e < 0L -> invalidArg "Epochs" (sprintf "Epochs must not be negative, got %d" e)
        | _ -> ()
        for s in manifest.Shards do
            match ShardCheck.problem dir false s with
            | Some(path, problem) -> fail path problem
            | None -> ()
    let hooks = defaultArg hooks [ for h in manifest.Hooks -> h.Name ]
    let widths = dict [ for h in manifest.Hooks -> h.Name, h.D ]
    do
        if hooks.IsEmpty then invalidArg "hooks" "select at least one hook"
        for h in hooks do
            if not (widths.ContainsKey h) then
                fail manifestPath (sprintf "the cache has no hook '%s' (has: %s)" h (String.Join(", ", widths.Keys)))
        if List.distinct hooks <> hooks then invalidArg "hooks" "a hook is selected twice"
    let shards = Array.ofList manifest.Shards
    let n = shards.Length
    let orderOf (epoch: int64) =
        if config.ShuffleShards then SeededShuffle.permutation config.Seed "cache-shards" epoch n else Array.init n id
    let start = defaultArg start Position.Start
    do
        if start.Epoch < 0L || start.Chunk < 0L || start.Row < 0L then
            invalidArg "start" (sprintf "position (%O) has a negative field" start)
        if n > 0 && (start.Chunk >= int64 n || start.Row >= shards[(orderOf start.Epoch)[int start.Chunk]].Rows) then
            invalidArg "start" (sprintf "position (%O) lies outside the cache's %d shards" start n)
        if n = 0 && (start.Chunk <> 0L || start.Row <> 0L) then
            invalidArg "start" (sprintf "position (%O) lies outside an empty cache" start)
    let mutable epoch = start.Epoch
    let mutable order = orderOf epoch
    let mutable chunk = int start.Chunk
    let mutable row = start.Row
    let mutable current: Rows option = None
    let mutable disposed = false
    let verified = System.Collections.Generic.HashSet<string>()

    let release () =
        current |> Option.iter Rows.dispose
        current <- None

    let load (shard: ShardInfo) : Rows =
        let path = Path.Combine(dir, shard.File)
        if config.VerifyChecksums && not (verified.Contains shard.File) then
            match ShardCheck.problem dir true shard with
            | Some(p, problem) -> fail p problem
            | None -> verified.Add shard.File |> ignore
        use r = Reader.Open path
        let meta key =
            match r.Metadata.TryFind key with
            | Some v -> v
            | None -> fail path (sprintf "shard metadata has no '%s' (not an activation shard?)" key)
        if meta "format" <> "transcoders.activation-shard" then fail path (sprintf "shard format is '%s'" (meta "format"))
        if meta "rows" <> string shard.Rows then
            fail path (sprintf "shard says it holds %s rows, the manifest says %d" (meta "rows") shard.Rows)
        if meta "compression" <> manifest.Compression.Name then
            fail path (sprintf "shard compression is '%s', the manifest says '%s'" (meta "compression") manifest.Compression.Name)
        let stored = set [ for e in r.Entries -> e.Name ]
        let expected = set [ for h in manifest.Hooks -> h.Name ]
        if stored <> expected then
            fail path (sprintf "shard holds tensors {%s}, the manifest lists hooks {%s}" (String.Join(", ", stored)) (String.Join(", ", expected)))
        let shape h = [| shard.Rows; widths[h] |]
        let loaded = ResizeArray()
        try
            for h in hooks do
                let e = r.Info h
                let t =
                    match manifest.Compression with
                    | NoCompression ->
                        if e.DType <> manifest.DType || e.Shape <> shape h then
                            fail path
                                (sprintf "hook '%s' is %s %s, the manifest says %s %s" h e.DType.Name (Rows.showShape e.Shape)
                                    manifest.DType.Name (Rows.showShape (shape h)))
                        r.Tensor(h, config.Device)
                    | c ->
                        if e.DType <> U8 || e.Shape.Length <> 1 then
                            fail path (sprintf "hook '%s' is %s %s, expected compressed bytes (U8, 1-D)" h e.DType.Name (Rows.showShape e.Shape))
                        let packed = (use b = r.Tensor h in b.bytes.ToArray())
                        let size = manifest.DType.Size
                        let length = shard.Rows * widths[h] * int64 size
                        let raw =
                            try ShardCompression.decompress c size packed (int length)
                            with :? InvalidDataException as ex -> fail path (sprintf "hook '%s': %s" h ex.Message)
                        let cpu = torch.empty(shape h, dtype = manifest.DType.ScalarType)
                        cpu.bytes <- Span<byte>(raw)
                        if config.Device.``type`` = DeviceType.CPU then cpu
                        else
                            use cpu = cpu
                            cpu.``to``(config.Device)
                t.DetachFromDisposeScope() |> ignore
                loaded.Add(h, t)
            Map.ofSeq loaded
        with _ ->
            for _, t in loaded do t.Dispose()
            reraise ()

    let finished () =
        match config.Epochs with
        | Some e -> epoch >= e
        | None -> false

    /// The manifest of the cache being read.
    member _.Manifest = manifest

    /// A shuffle buffer over a new source reading `dir` from the start.
    static member Buffer(dir: string, read: CachedReadConfig, buffer: ShuffleBufferConfig, ?hooks: string list) =
        new ShuffleBuffer(buffer, new CachedActivationSource(dir, read, ?hooks = hooks))

    /// Resumes a shuffle buffer over `dir` from a state file written by `ShuffleBuffer.SaveState`.
    static member ResumeBuffer(dir: string, read: CachedReadConfig, buffer: ShuffleBufferConfig, statePath: string, ?hooks: string list) =
        let state, carried = ShuffleBuffer.LoadState(statePath, buffer.Device)
        let source =
            try new CachedActivationSource(dir, read, state.SourceAtCycleStart, ?hooks = hooks)
            with _ ->
                Rows.dispose carried
                reraise ()
        try ShuffleBuffer.Resume(buffer, source, state, carried)
        with _ ->
            (source :> IDisposable).Dispose()
            reraise ()

    interface IRowSource with
        member _.Hooks = hooks

        member s.Read(maxRows) =
            ObjectDisposedException.ThrowIf(disposed, s)
            if maxRows < 1L then invalidArg "maxRows" (sprintf "read at least 1 row, not %d" maxRows)
            if n = 0 || finished () then None
            else
                let shard = shards[order[chunk]]
                let rows =
                    match current with
                    | Some r -> r
                    | None ->
                        let r = load shard
                        current <- Some r
                        r
                let take = min maxRows (shard.Rows - row)
                let out = rows |> Map.map (fun _ t -> t.narrow(0L, row, take))
                row <- row + take
                if row = shard.Rows then
                    release ()
                    row <- 0L
                    chunk <- chunk + 1
                    if chunk = n then
                        chunk <- 0
                        epoch <- epoch + 1L
                        order <- orderOf epoch
                Some out

        member _.Position = { Epoch = epoch; Chunk = int64 chunk; Row = row }

    interface IDisposable with
        member _.Dispose() =
            if not disposed then
                disposed <- true
                release ()
