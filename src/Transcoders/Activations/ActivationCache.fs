namespace Transcoders.Activations

open System
open System.IO
open TorchSharp
open Transcoders.Files
open Transcoders.Files.Safetensors

/// Settings for writing an activation cache.
type CacheConfig =
    { /// Rows (tokens) per shard; every shard but the last holds exactly this many.
      RowsPerShard: int64
      /// Stored element type: BF16 (default: half of F32, ample for training data), F16, or F32 (exact).
      DType: DType
      /// See `Compression` for the measured trade-off; off by default.
      Compression: Compression
      /// Stop after this many rows; None writes until the source ends.
      MaxRows: int64 option
      /// Where the rows come from (model id, dataset, seed, ...), recorded in the manifest and required to
      /// match when an interrupted write resumes.
      Source: Map<string, string>
      /// When resuming, verify the checksums of the shards already written (otherwise their sizes only).
      VerifyExisting: bool }

    static member Default =
        { RowsPerShard = 65_536L; DType = BF16; Compression = NoCompression; MaxRows = None
          Source = Map.empty; VerifyExisting = true }

    /// Fails with a message naming the field at fault.
    member c.Validate() =
        if c.RowsPerShard < 1L then invalidArg "RowsPerShard" (sprintf "RowsPerShard must be at least 1, got %d" c.RowsPerShard)
        match c.DType with
        | F32 | BF16 | F16 -> ()
        | d -> invalidArg "DType" (sprintf "cache DType must be F32, BF16 or F16, got %s" d.Name)
        match c.MaxRows with
        | Some n when n < 0L -> invalidArg "MaxRows" (sprintf "MaxRows must not be negative, got %d" n)
        | _ -> ()
        c.Compression.Validate()

/// Writing activations to disk once, to train many coders (or sweep hyperparameters) without rerunning
/// the model: `dir/shard_00000.safetensors`, ... each holding the aligned rows of every hook ([rows, d]
/// per hook, named by hook), and `dir/manifest.json` (see `CacheManifest`).
///
/// Each shard is written atomically, then the manifest is rewritten atomically to list it, so a crash
/// leaves a consistent prefix of complete shards. Writing again into the same directory resumes: the
/// shards the manifest lists are kept when their size (and checksum, `VerifyExisting`) match — from the
/// first one that does not, everything is rewritten — and the source continues from the last kept
/// shard's end position: a source created at that position (`resumePosition`) continues directly, and a
/// source at its start is read and discarded up to it. The result is byte-identical to an uninterrupted
/// write of the same source.
module ActivationCache =
    let private fail path problem : 'a = raise (ActivationFileError(path, problem))

    let private shardMetadata (config: CacheConfig) (index: int) (rows: int64) =
        Map.ofList
            [ "format", "transcoders.activation-shard"
              "version", "1"
              "shard", string index
              "rows", string rows
              "dtype", config.DType.Name
              "compression", config.Compression.Name ]

    /// Writes one shard file from rows [n, d] per hook (CPU, in the cache dtype).
    let private writeShard (path: string) (config: CacheConfig) (index: int) (rows: Rows) =
        let n = Rows.count rows
        let metadata = shardMetadata config index n
        match config.Compression with
        | NoCompression -> Safetensors.save path metadata (Map.toList rows)
        | c ->
            let tensors =
                [ for KeyValue(h, t) in rows ->
                      if t.NumberOfElements * t.ElementSize > int64 Int32.MaxValue then
                          fail path (sprintf "hook '%s': %d bytes per shard is too many to compress; use fewer RowsPerShard" h (t.NumberOfElements * t.ElementSize))
                      let packed = ShardCompression.compress c (int t.ElementSize) (ReadOnlySpan(t.contiguous().bytes.ToArray()))
                      h, torch.tensor(packed) ]
            try Safetensors.save path metadata tensors
            finally for _, t in tensors do t.Dispose()

    /// The position a source should start at to continue writing `dir` (Start when nothing is written yet).
    let resumePosition (dir: string) =
        if File.Exists(Path.Combine(dir, CacheManifest.FileName)) then
            match (CacheManifest.Read dir).Shards with
            | [] -> Position.Start
            | shards -> (List.last shards).End
        else Position.Start

    /// Removes temporary files a crashed atomic write left behind.
    let private removeStaleTemporaries (dir: string) =
        for pattern in [ ".shard_*.tmp"; "." + CacheManifest.FileName + ".*.tmp" ] do
            for f in Directory.GetFiles(dir, pattern) do
                try File.Delete f with _ -> ()

    /// Writes (or resumes writing) the cache in `dir` from `source` (not disposed here), calling `onShard`
    /// with the manifest after each shard. Returns the final manifest.
    let writeWith (onShard: CacheManifest -> unit) (dir: string) (config: CacheConfig) (source: IRowSource) : CacheManifest =
        config.Validate()
        Directory.CreateDirectory dir |> ignore
        removeStaleTemporaries dir
        let manifestPath = Path.Combine(dir, CacheManifest.FileName)
        let hooks = source.Hooks
        let fresh =
            { Source = config.Source; Hooks = [ for h in hooks -> { Name = h; D = 0L } ]; DType = config.DType
              Compression = config.Compression; RowsPerShard = config.RowsPerShard; MaxRows = config.MaxRows
              TotalRows = 0L; Complete = false; Shards = [] }
        let existing = if File.Exists manifestPath then Some(CacheManifest.Read dir) else None
        let mismatch field (was: string) (now: string) =
            fail manifestPath
                (sprintf "the cache here was written with %s = %s, this write asks for %s: use another directory or delete this one" field was now)
        let start =
            match existing with
            | None -> fresh
            | Some m ->
                let names (hs: CachedHook list) = String.Join(", ", hs |> List.map (fun h -> h.Name))
                if names m.Hooks <> names fresh.Hooks then mismatch "hooks" (names m.Hooks) (names fresh.Hooks)
                if m.DType <> config.DType then mismatch "dtype" m.DType.Name config.DType.Name
                if m.Compression <> config.Compression then mismatch "compression" m.Compression.Name config.Compression.Name
                if m.RowsPerShard <> config.RowsPerShard then mismatch "rows_per_shard" (string m.RowsPerShard) (string config.RowsPerShard)
                if m.MaxRows <> config.MaxRows then mismatch "max_rows" (sprintf "%A" m.MaxRows) (sprintf "%A" config.MaxRows)
                if m.Source <> config.Source then mismatch "source" (sprintf "%A" m.Source) (sprintf "%A" config.Source)
                let kept = m.Shards |> List.takeWhile (fun s -> (ShardCheck.problem dir config.VerifyExisting s).IsNone)
                if kept.Length = m.Shards.Length && m.Complete then m
                else
                    { m with Shards = kept; TotalRows = kept |> List.sumBy (fun s -> s.Rows); Complete = false
                             Hooks = (if kept.IsEmpty then fresh.Hooks else m.Hooks) }
        if start.Complete then start
        else
            start.Write dir
            // Position the source at the end of the kept shards.
            let target = match start.Shards with [] -> Position.Start | s -> (List.last s).End
            if source.Position <> target then
                if source.Position <> Position.Start then
                    fail manifestPath
                        (sprintf "the source is at (%O); resuming needs it at its start or at (%O), where the last kept shard ends"
                            source.Position target)
                let mutable left = start.TotalRows
                while left > 0L do
                    use _ = torch.NewDisposeScope()
                    match source.Read left with
                    | None -> fail manifestPath (sprintf "the source ended %d rows before the %d rows already cached" left start.TotalRows)
                    | Some rows -> left <- left - Rows.validate "row source" hooks rows
                if source.Position <> target then
                    fail manifestPath
                        (sprintf "after skipping the %d cached rows the source is at (%O), but the cache's last shard ends at (%O): a different source?"
                            start.TotalRows source.Position target)
            let mutable manifest = start
            let mutable exhausted = false
            while not manifest.Complete do
                let want =
                    match config.MaxRows with
                    | Some n -> min config.RowsPerShard (n - manifest.TotalRows)
                    | None -> config.RowsPerShard
                use _ = torch.NewDisposeScope()
                let chunks = ResizeArray<Rows>()
                let mutable got = 0L
                while got < want && not exhausted do
                    match source.Read(want - got) with
                    | None -> exhausted <- true
                    | Some rows ->
                        let n = Rows.validate "row source" hooks rows
                        if n < 1L || n > want - got then
                            invalidArg "source" (sprintf "the row source returned %d rows when asked for 1 to %d" n (want - got))
                        chunks.Add(rows |> Map.map (fun _ t -> t.to_type(config.DType.ScalarType).cpu()))
                        got <- got + n
                if got > 0L then
                    let index = manifest.Shards.Length
                    let rows = hooks |> List.map (fun h -> h, torch.cat([| for c in chunks -> c[h] |], 0L)) |> Map.ofList
                    let hooksInfo =
                        manifest.Hooks
                        |> List.map (fun h ->
                            let d = rows[h.Name].shape[1]
                            if h.D <> 0L && h.D <> d then
                                fail manifestPath (sprintf "hook '%s' rows have d = %d, the cache holds d = %d" h.Name d h.D)
                            { h with D = d })
                    let file = CacheManifest.ShardFile index
                    let path = Path.Combine(dir, file)
                    writeShard path config index rows
                    let info =
                        { File = file; Rows = got; Bytes = FileInfo(path).Length; Sha256 = ShardCheck.sha256 path
                          End = source.Position }
                    manifest <- { manifest with Hooks = hooksInfo; Shards = manifest.Shards @ [ info ]; TotalRows = manifest.TotalRows + got }
                let limitReached =
                    match config.MaxRows with
                    | Some n -> manifest.TotalRows >= n
                    | None -> false
                manifest <- { manifest with Complete = exhausted || limitReached }
                if got > 0L || manifest.Complete then
                    manifest.Write dir
                    onShard manifest
            manifest

    /// Checks every shard of the cache in `dir` against its manifest (presence, size, SHA-256) and returns
    /// the problems found as (file, problem), empty when the cache is intact. Raises on a bad manifest.
    let verify (dir: string) : (string * string) list =
        let m = CacheManifest.Read dir
        m.Shards |> List.choose (ShardCheck.problem dir true)

    /// `writeWith` without progress reports.
    let write (dir: string) (config: CacheConfig) (source: IRowSource) = writeWith ignore dir config source
