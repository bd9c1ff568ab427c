namespace Transcoders.Activations

open System
open System.IO
open System.Security.Cryptography
open System.Text.Json
open Transcoders.Files
open Transcoders.Files.Safetensors

/// One hook stored in a cache: its name and row width (0 until the first rows are written).
type CachedHook = { Name: string; D: int64 }

/// One complete shard of a cache.
type ShardInfo =
    { /// File name inside the cache directory (shard_00000.safetensors, ...).
      File: string
      Rows: int64
      /// File size in bytes.
      Bytes: int64
      /// SHA-256 of the whole file, lowercase hex.
      Sha256: string
      /// The source's position after this shard's rows: where writing resumes.
      End: Position }

/// `manifest.json` of an activation cache directory: what was cached, how, and which shards are complete.
/// It holds no timestamps, so an interrupted and resumed write produces the same bytes as an
/// uninterrupted one.
type CacheManifest =
    { /// The caller's description of where the rows come from: model id, dataset, seed, ...
      Source: Map<string, string>
      Hooks: CachedHook list
      DType: DType
      Compression: Compression
      RowsPerShard: int64
      MaxRows: int64 option
      TotalRows: int64
      /// Whether the source was written to its end (or to MaxRows).
      Complete: bool
      Shards: ShardInfo list }

    static member FileName = "manifest.json"

    /// The name of shard `i`.
    static member ShardFile(i: int) = sprintf "shard_%05d.safetensors" i

    /// The manifest as indented JSON.
    member m.ToJson() =
        JsonFields.render (fun w ->
            w.WriteStartObject()
            w.WriteString("format", "transcoders.activation-cache")
            w.WriteNumber("version", 1)
            w.WriteStartObject "source"
            for KeyValue(k, v) in m.Source do w.WriteString(k, v)
            w.WriteEndObject()
            w.WriteStartArray "hooks"
            for h in m.Hooks do
                w.WriteStartObject()
                w.WriteString("name", h.Name)
                w.WriteNumber("d", h.D)
                w.WriteEndObject()
            w.WriteEndArray()
            w.WriteString("dtype", m.DType.Name)
            w.WriteString("compression", m.Compression.Name)
            w.WriteNumber("rows_per_shard", m.RowsPerShard)
            match m.MaxRows with
            | Some n -> w.WriteNumber("max_rows", n)
            | None -> w.WriteNull "max_rows"
            w.WriteNumber("total_rows", m.TotalRows)
            w.WriteBoolean("complete", m.Complete)
            w.WriteStartArray "shards"
            for s in m.Shards do
                w.WriteStartObject()
                w.WriteString("file", s.File)
                w.WriteNumber("rows", s.Rows)
                w.WriteNumber("bytes", s.Bytes)
                w.WriteString("sha256", s.Sha256)
                JsonFields.writePosition w "end" s.End
                w.WriteEndObject()
            w.WriteEndArray()
            w.WriteEndObject())

    /// Parses and validates manifest text; `path` names the file in errors.
    static member OfJson(path: string, text: string) : CacheManifest =
        let fail problem = JsonFields.fail path problem
        use doc = JsonFields.parse path text
        let o = doc.RootElement
        let where = "manifest"
        let format = JsonFields.text path where "format" o
        if format <> "transcoders.activation-cache" then fail (sprintf "format is '%s', not an activation cache manifest" format)
        let version = JsonFields.integer path where "version" o
        if version <> 1L then fail (sprintf "manifest version %d is not supported (this library reads 1)" version)
        let source =
            [ for p in (JsonFields.obj path where "source" o).EnumerateObject() ->
                  if p.Value.ValueKind <> JsonValueKind.String then fail (sprintf "source field '%s' is not a string" p.Name)
                  p.Name, p.Value.GetString() ]
            |> Map.ofList
        let hooks =
            JsonFields.items path where "hooks" o
            |> List.mapi (fun i h ->
                let w = sprintf "hooks[%d]" i
                { Name = JsonFields.text path w "name" h; D = JsonFields.natural path w "d" h })
        if hooks.IsEmpty then fail "hooks is empty"
        if (hooks |> List.distinctBy (fun h -> h.Name)).Length <> hooks.Length then fail "hooks lists a hook twice"
        let dtype =
            match DType.TryParse(JsonFields.text path where "dtype" o) with
            | Some(F32 | BF16 | F16 as d) -> d
            | _ -> fail (sprintf "dtype '%s' is not F32, BF16 or F16" (JsonFields.text path where "dtype" o))
        let compression =
            let name = JsonFields.text path where "compression" o
            match Compression.TryParse name with
            | Some c -> c
            | None -> fail (sprintf "unknown compression '%s'" name)
        let rowsPerShard = JsonFields.natural path where "rows_per_shard" o
        if rowsPerShard < 1L then fail "rows_per_shard must be at least 1"
        let maxRows =
            match o.TryGetProperty "max_rows" with
            | true, v when v.ValueKind = JsonValueKind.Null -> None
            | true, _ -> Some(JsonFields.natural path where "max_rows" o)
            | _ -> fail "manifest has no field 'max_rows'"
        let shards =
            JsonFields.items path where "shards" o
            |> List.mapi (fun i s ->
                let w = sprintf "shards[%d]" i
                let info =
                    { File = JsonFields.text path w "file" s
                      Rows = JsonFields.natural path w "rows" s
                      Bytes = JsonFields.natural path w "bytes" s
                      Sha256 = JsonFields.text path w "sha256" s
                      End = JsonFields.position path w "end" s }
                if info.File <> CacheManifest.ShardFile i then
                    fail (sprintf "%s names file '%s', expected '%s'" w info.File (CacheManifest.ShardFile i))
                if info.Rows < 1L || info.Rows > rowsPerShard then
                    fail (sprintf "%s has %d rows, outside 1..rows_per_shard (%d)" w info.Rows rowsPerShard)
                if info.Sha256.Length <> 64 || info.Sha256 |> Seq.exists (fun c -> not (Char.IsAsciiHexDigitLower c || Char.IsAsciiDigit c)) then
                    fail (sprintf "%s sha256 '%s' is not 64 lowercase hex digits" w info.Sha256)
                info)
        shards |> List.iteri (fun i s ->
            if i < shards.Length - 1 && s.Rows <> rowsPerShard then
                fail (sprintf "shards[%d] has %d rows but only the last shard may hold fewer than rows_per_shard (%d)" i s.Rows rowsPerShard))
        let total = JsonFields.natural path where "total_rows" o
        let sum = shards |> List.sumBy (fun s -> s.Rows)
        if total <> sum then fail (sprintf "total_rows is %d but the shards hold %d rows" total sum)
        if not shards.IsEmpty && hooks |> List.exists (fun h -> h.D = 0L) then fail "a hook has d = 0 although shards exist"
        { Source = source; Hooks = hooks; DType = dtype; Compression = compression; RowsPerShard = rowsPerShard
          MaxRows = maxRows; TotalRows = total; Complete = JsonFields.boolean path where "complete" o; Shards = shards }

    /// Reads `dir/manifest.json`.
    static member Read(dir: string) =
        let path = Path.Combine(dir, CacheManifest.FileName)
        if not (File.Exists path) then JsonFields.fail path "no such file (not an activation cache directory?)"
        CacheManifest.OfJson(path, File.ReadAllText path)

    /// Writes `dir/manifest.json` atomically.
    member m.Write(dir: string) = AtomicFile.writeAllText (Path.Combine(dir, CacheManifest.FileName)) (m.ToJson())

/// Checks of shard files against their manifest entries.
module ShardCheck =
    /// SHA-256 of a file, lowercase hex (read in 1 MB pieces: ~1.3× faster here than hashing a default FileStream).
    let sha256 (path: string) =
        use s = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 0)
        use h = IncrementalHash.CreateHash HashAlgorithmName.SHA256
        let buffer = Array.zeroCreate<byte> (1 <<< 20)
        let mutable n = s.Read(buffer, 0, buffer.Length)
        while n > 0 do
            h.AppendData(buffer, 0, n)
            n <- s.Read(buffer, 0, buffer.Length)
        Convert.ToHexStringLower(h.GetHashAndReset())

    /// None when `dir/shard.File` exists with the recorded size (and checksum when `checksum`), else the problem.
    let problem (dir: string) (checksum: bool) (shard: ShardInfo) =
        let path = Path.Combine(dir, shard.File)
        if not (File.Exists path) then Some(path, "shard file is missing")
        else
            let size = FileInfo(path).Length
            if size <> shard.Bytes then
                Some(path, sprintf "shard file has %d bytes, the manifest records %d (truncated or replaced?)" size shard.Bytes)
            elif checksum then
                let actual = sha256 path
                if actual <> shard.Sha256 then
                    Some(path, sprintf "checksum mismatch: the manifest records sha256 %s, the file has %s (corrupt or changed shard)" shard.Sha256 actual)
                else None
            else None
