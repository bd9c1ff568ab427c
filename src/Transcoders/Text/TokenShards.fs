/// Token shards on disk: a folder per split holding `shard_00000.bin`, `shard_00001.bin`, ... and `meta.json`.
///
/// A shard is a 32-byte little-endian header — 8 ASCII bytes `TCTOKENS`, int32 format version (1), int32 bytes
/// per token (2 = uint16, used when the vocabulary has at most 65,536 ids; 4 = int32 otherwise), int64 token
/// count, int64 index of the shard's first token in the split's stream — then the tokens. The shards of a
/// folder, in order, hold one stream: the documents one after the other, each as `Tokenizer.encodeDocument`
/// made it (BOS first when `bos` is true, EOS last when `eos` is true).
///
/// `meta.json` records the format, the split and the rule that made it, the tokenizer (its full JSON, so the
/// folder is self-contained), the dtype, the numbers of documents and tokens, the source files with their
/// sizes, and each shard's file and token count. A folder is written beside its destination and moved into
/// place when complete; every header, size and id is validated on reading.
module Transcoders.Text.TokenShards

open System
open System.IO
open System.Runtime.InteropServices
open System.Text
open System.Text.Json
open System.Text.Json.Nodes
open Transcoders.Files

/// A clear error naming the shard folder or file and what is wrong.
exception ShardError of path: string * problem: string with
    override this.Message = sprintf "%s: %s" this.path this.problem

/// Element type of a shard.
type DType =
    | UInt16
    | Int32
    member d.ByteWidth = match d with UInt16 -> 2 | Int32 -> 4
    member d.Name = match d with UInt16 -> "uint16" | Int32 -> "int32"

/// uint16 when every id fits (vocabulary ≤ 65,536), else int32.
let dtypeFor (vocabSize: int) = if vocabSize <= 65536 then UInt16 else Int32

[<Literal>]
let Magic = "TCTOKENS"

[<Literal>]
let FormatVersion = 1

[<Literal>]
let HeaderBytes = 32

[<Literal>]
let MetaFile = "meta.json"

[<Literal>]
let FormatName = "transcoders-token-shards"

/// The file name of shard `i`.
let shardName (i: int) = sprintf "shard_%05d.bin" i

/// A source file of the corpus and its size in bytes.
type SourceFile = { Path: string; Bytes: int64 }

/// One shard: its file name (inside the folder) and token count.
type ShardFile = { File: string; Tokens: int64 }

/// The contents of `meta.json`.
type Meta =
    { Split: string
      SplitRule: string
      /// The tokenizer's JSON (`Tokenizer.toJson`), as text.
      TokenizerJson: string
      /// A short name of the tokenizer (`Tokenizer.describe`).
      TokenizerName: string
      VocabSize: int
      DType: DType
      Bos: bool
      Eos: bool
      Documents: int64
      Tokens: int64
      Sources: SourceFile list
      Shards: ShardFile list }

/// What a writer records about the data besides the tokens.
type ShardInfo =
    { Split: string
      SplitRule: string
      Bos: bool
      Eos: bool
      Sources: SourceFile list }

/// The sources' sizes, for `ShardInfo.Sources`.
let sourcesOf (files: string seq) =
    [ for f in files -> { Path = f; Bytes = (if File.Exists f then FileInfo(f).Length else raise (FileNotFoundException(sprintf "corpus file not found: %s" f, f))) } ]

// ---------------------------------------------------------------------------------------------- one shard

let private writeShard (path: string) (dtype: DType) (start: int64) (tokens: ReadOnlySpan<int>) (vocabSize: int) =
    let count = tokens.Length
    let data = Array.zeroCreate<byte> (HeaderBytes + count * dtype.ByteWidth)
    Encoding.ASCII.GetBytes(Magic).CopyTo(data, 0)
    BitConverter.TryWriteBytes(Span(data, 8, 4), FormatVersion) |> ignore
    BitConverter.TryWriteBytes(Span(data, 12, 4), dtype.ByteWidth) |> ignore
    BitConverter.TryWriteBytes(Span(data, 16, 8), int64 count) |> ignore
    BitConverter.TryWriteBytes(Span(data, 24, 8), start) |> ignore
    let body = Span(data, HeaderBytes, count * dtype.ByteWidth)
    for i in 0 .. count - 1 do
        let t = tokens[i]
        if t < 0 || t >= vocabSize then invalidArg "tokens" (sprintf "token %d at stream position %d is outside 0..%d" t (start + int64 i) (vocabSize - 1))
    match dtype with
    | UInt16 ->
        let dst = MemoryMarshal.Cast<byte, uint16> body
        for i in 0 .. count - 1 do dst[i] <- uint16 tokens[i]
    | Int32 -> tokens.CopyTo(MemoryMarshal.Cast<byte, int> body)
    if not BitConverter.IsLittleEndian then failwith "token shards are little-endian; this machine is big-endian"
    AtomicFile.writeAllBytes path data

/// Reads one shard file into `dest` (which must hold exactly its tokens), validating the header against what
/// the meta says (dtype, count, start) and every id against `vocabSize`.
let private readShardInto (path: string) (dtype: DType) (count: int64) (start: int64) (vocabSize: int) (dest: Span<int>) =
    let fail p = raise (ShardError(path, p))
    if not (File.Exists path) then fail "shard file is missing"
    let len = FileInfo(path).Length
    if len < int64 HeaderBytes then fail (sprintf "file is %d bytes, shorter than the %d-byte header" len HeaderBytes)
    use fs = File.OpenRead path
    let header = Array.zeroCreate<byte> HeaderBytes
    fs.ReadExactly(header, 0, HeaderBytes)
    if Encoding.ASCII.GetString(header, 0, 8) <> Magic then fail (sprintf "not a token shard (magic is not %s)" Magic)
    let version = BitConverter.ToInt32(header, 8)
    if version <> FormatVersion then fail (sprintf "shard format version %d is not supported (this library reads %d)" version FormatVersion)
    let width = BitConverter.ToInt32(header, 12)
    if width <> dtype.ByteWidth then fail (sprintf "header says %d bytes per token, meta.json says %s" width dtype.Name)
    let n = BitConverter.ToInt64(header, 16)
    if n <> count then fail (sprintf "header counts %d tokens, meta.json %d" n count)
    let s = BitConverter.ToInt64(header, 24)
    if s <> start then fail (sprintf "header says the shard starts at token %d, expected %d from the shards before it" s start)
    let expected = int64 HeaderBytes + count * int64 width
    if len <> expected then fail (sprintf "file is %d bytes, expected %d for %d %s tokens" len expected count dtype.Name)
    let buffer = Array.zeroCreate<byte> (1 <<< 20)
    let mutable done' = 0
    while int64 done' < count do
        let take = int (min (int64 (buffer.Length / width)) (count - int64 done'))
        fs.ReadExactly(buffer, 0, take * width)
        let chunk = dest.Slice(done', take)
        match dtype with
        | UInt16 ->
            let src = MemoryMarshal.Cast<byte, uint16>(ReadOnlySpan(buffer, 0, take * width))
            for i in 0 .. take - 1 do chunk[i] <- int src[i]
        | Int32 -> MemoryMarshal.Cast<byte, int>(ReadOnlySpan(buffer, 0, take * width)).CopyTo chunk
        for i in 0 .. take - 1 do
            if chunk[i] < 0 || chunk[i] >= vocabSize then
                fail (sprintf "token %d at position %d is outside the vocabulary 0..%d" chunk[i] (int64 done' + int64 i) (vocabSize - 1))
        done' <- done' + take

// ---------------------------------------------------------------------------------------------- meta.json

let private metaToJson (m: Meta) : string =
    let o = JsonObject()
    o["format"] <- JsonValue.Create FormatName
    o["version"] <- JsonValue.Create FormatVersion
    o["split"] <- JsonValue.Create m.Split
    o["split_rule"] <- JsonValue.Create m.SplitRule
    o["tokenizer_name"] <- JsonValue.Create m.TokenizerName
    o["tokenizer"] <- JsonNode.Parse m.TokenizerJson
    o["vocab_size"] <- JsonValue.Create m.VocabSize
    o["dtype"] <- JsonValue.Create m.DType.Name
    o["bos"] <- JsonValue.Create m.Bos
    o["eos"] <- JsonValue.Create m.Eos
    o["documents"] <- JsonValue.Create m.Documents
    o["tokens"] <- JsonValue.Create m.Tokens
    let sources = JsonArray()
    for s in m.Sources do
        let e = JsonObject()
        e["path"] <- JsonValue.Create s.Path
        e["bytes"] <- JsonValue.Create s.Bytes
        sources.Add e
    o["sources"] <- sources
    let shards = JsonArray()
    for s in m.Shards do
        let e = JsonObject()
        e["file"] <- JsonValue.Create s.File
        e["tokens"] <- JsonValue.Create s.Tokens
        shards.Add e
    o["shards"] <- shards
    o.ToJsonString(JsonSerializerOptions(WriteIndented = true, Encoder = Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping))

/// Parses and validates `meta.json` text; `path` names the file in errors.
let parseMeta (path: string) (json: string) : Meta =
    let fail field p = raise (ShardError(path, sprintf "field '%s': %s" field p))
    let doc =
        try JsonDocument.Parse json
        with :? JsonException as e -> raise (ShardError(path, sprintf "not valid JSON: %s" e.Message))
    use doc = doc
    let root = doc.RootElement
    if root.ValueKind <> JsonValueKind.Object then raise (ShardError(path, sprintf "expected a JSON object, found %O" root.ValueKind))
    let get (o: JsonElement) (prefix: string) name =
        match o.TryGetProperty(name: string) with
        | true, p -> p
        | _ -> fail (prefix + name) "missing"
    let str (o: JsonElement) prefix name =
        let e = get o prefix name
        if e.ValueKind <> JsonValueKind.String then fail (prefix + name) (sprintf "expected a string, found %O" e.ValueKind)
        e.GetString()
    let int64Of (o: JsonElement) prefix name =
        let e = get o prefix name
        match e.ValueKind with
        | JsonValueKind.Number ->
            match e.TryGetInt64() with
            | true, v when v >= 0L -> v
            | _ -> fail (prefix + name) (sprintf "expected a non-negative integer, found %s" (e.GetRawText()))
        | k -> fail (prefix + name) (sprintf "expected an integer, found %O" k)
    let boolOf name =
        let e = get root "" name
        match e.ValueKind with
        | JsonValueKind.True -> true
        | JsonValueKind.False -> false
        | k -> fail name (sprintf "expected true or false, found %O" k)
    let arr name =
        let e = get root "" name
        if e.ValueKind <> JsonValueKind.Array then fail name (sprintf "expected an array, found %O" e.ValueKind)
        e.EnumerateArray() |> Seq.toArray
    if str root "" "format" <> FormatName then fail "format" (sprintf "expected %A" FormatName)
    let version = int64Of root "" "version"
    if version <> int64 FormatVersion then fail "version" (sprintf "%d is not supported (this library reads %d)" version FormatVersion)
    let tok = get root "" "tokenizer"
    if tok.ValueKind <> JsonValueKind.Object then fail "tokenizer" (sprintf "expected an object, found %O" tok.ValueKind)
    let vocab = int64Of root "" "vocab_size"
    if vocab < 1L || vocab > int64 Int32.MaxValue then fail "vocab_size" (sprintf "%d is out of range" vocab)
    let dtype =
        match str root "" "dtype" with
        | "uint16" -> UInt16
        | "int32" -> Int32
        | d -> fail "dtype" (sprintf "unknown dtype %A (expected uint16 or int32)" d)
    if dtype = UInt16 && vocab > 65536L then fail "dtype" (sprintf "uint16 cannot hold the ids of a %d-token vocabulary" vocab)
    let shards =
        arr "shards" |> Array.mapi (fun i e ->
            let p = sprintf "shards[%d]." i
            if e.ValueKind <> JsonValueKind.Object then fail (sprintf "shards[%d]" i) (sprintf "expected an object, found %O" e.ValueKind)
            let file = str e p "file"
            if file <> shardName i then fail (p + "file") (sprintf "%A, expected %A (shards are numbered in order)" file (shardName i))
            { File = file; Tokens = int64Of e p "tokens" })
        |> Array.toList
    let sources =
        arr "sources" |> Array.mapi (fun i e ->
            let p = sprintf "sources[%d]." i
            if e.ValueKind <> JsonValueKind.Object then fail (sprintf "sources[%d]" i) (sprintf "expected an object, found %O" e.ValueKind)
            { Path = str e p "path"; Bytes = int64Of e p "bytes" })
        |> Array.toList
    let tokens = int64Of root "" "tokens"
    let shardSum = shards |> List.sumBy (fun s -> s.Tokens)
    if shardSum <> tokens then fail "tokens" (sprintf "%d, but the shards hold %d" tokens shardSum)
    { Split = str root "" "split"
      SplitRule = str root "" "split_rule"
      TokenizerJson = JsonNode.Parse(tok.GetRawText()).ToJsonString(JsonSerializerOptions(Encoder = Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping))
      TokenizerName = str root "" "tokenizer_name"
      VocabSize = int vocab
      DType = dtype
      Bos = boolOf "bos"
      Eos = boolOf "eos"
      Documents = int64Of root "" "documents"
      Tokens = tokens
      Sources = sources
      Shards = shards }

/// Reads and validates a folder's `meta.json`.
let readMeta (folder: string) : Meta =
    let path = Path.Combine(folder, MetaFile)
    if not (Directory.Exists folder) then raise (DirectoryNotFoundException(sprintf "token shard folder not found: %s" folder))
    if not (File.Exists path) then raise (ShardError(folder, sprintf "no %s: not a token shard folder, or its writing did not finish" MetaFile))
    parseMeta path (File.ReadAllText path)

/// The tokenizer recorded in a folder's meta.
let tokenizerOf (meta: Meta) : Tokenizer =
    use doc = JsonDocument.Parse meta.TokenizerJson
    Tokenizer.ofJsonElement "meta.json tokenizer" doc.RootElement

// ---------------------------------------------------------------------------------------------- writing

/// Streams documents into a shard folder. Writes into a sibling temporary folder; `Complete` moves it into
/// place (replacing an older shard folder, never another kind of folder); disposing without `Complete`
/// removes the temporary folder.
type ShardWriter(folder: string, tokenizer: Tokenizer, info: ShardInfo, ?tokensPerShard: int64) =
    let tokensPerShard = defaultArg tokensPerShard (1L <<< 24)
    do if tokensPerShard < 1L || tokensPerShard > int64 (Int32.MaxValue / 4 - HeaderBytes) then
        invalidArg "tokensPerShard" (sprintf "%d is out of range" tokensPerShard)
    let folder = Path.GetFullPath folder
    do if File.Exists folder then raise (ShardError(folder, "is a file, not a folder"))
    do if Directory.Exists folder && Directory.EnumerateFileSystemEntries(folder) |> Seq.isEmpty |> not
          && not (File.Exists(Path.Combine(folder, MetaFile))) then
        raise (ShardError(folder, sprintf "refusing to replace a non-empty folder that is not a token shard folder (no %s)" MetaFile))
    let tmp = folder.TrimEnd(Path.DirectorySeparatorChar) + ".tmp-" + Guid.NewGuid().ToString("N").[..7]
    do Directory.CreateDirectory tmp |> ignore
    let vocab = Tokenizer.vocabSize tokenizer
    let dtype = dtypeFor vocab
    let buffer = ResizeArray<int>(int (min tokensPerShard (1L <<< 22)))
    let shards = ResizeArray<ShardFile>()
    let mutable written = 0L
    let mutable docs = 0L
    let mutable completed = false
    let flush () =
        if buffer.Count > 0 then
            let name = shardName shards.Count
            writeShard (Path.Combine(tmp, name)) dtype written (Span.op_Implicit (CollectionsMarshal.AsSpan buffer)) vocab
            shards.Add { File = name; Tokens = int64 buffer.Count }
            written <- written + int64 buffer.Count
            buffer.Clear()
    member _.Folder = folder
    /// Documents added so far.
    member _.Documents = docs
    /// Appends one document's tokens (already with BOS/EOS as `info` says).
    member _.Add(doc: int[]) =
        if completed then invalidOp "the shard folder is already complete"
        let mutable i = 0
        while i < doc.Length do
            let take = min (doc.Length - i) (int (tokensPerShard - int64 buffer.Count))
            for j in i .. i + take - 1 do
                let t = doc[j]
                if t < 0 || t >= vocab then invalidArg "doc" (sprintf "token %d is outside the vocabulary 0..%d" t (vocab - 1))
                buffer.Add t
            i <- i + take
            if int64 buffer.Count = tokensPerShard then flush ()
        docs <- docs + 1L
    /// Writes the last shard and `meta.json`, moves the folder into place and returns its meta.
    member _.Complete() : Meta =
        if completed then invalidOp "the shard folder is already complete"
        flush ()
        let meta =
            { Split = info.Split; SplitRule = info.SplitRule
              TokenizerJson = (Tokenizer.toJson tokenizer).ToJsonString(JsonSerializerOptions(Encoder = Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping))
              TokenizerName = Tokenizer.describe tokenizer
              VocabSize = vocab; DType = dtype; Bos = info.Bos; Eos = info.Eos
              Documents = docs; Tokens = written; Sources = info.Sources; Shards = List.ofSeq shards }
        AtomicFile.writeAllText (Path.Combine(tmp, MetaFile)) (metaToJson meta)
        if Directory.Exists folder then
            let old = folder.TrimEnd(Path.DirectorySeparatorChar) + ".old-" + Guid.NewGuid().ToString("N").[..7]
            Directory.Move(folder, old)
            Directory.Move(tmp, folder)
            Directory.Delete(old, true)
        else
            Directory.CreateDirectory(Path.GetDirectoryName folder) |> ignore
            Directory.Move(tmp, folder)
        completed <- true
        meta
    interface IDisposable with
        member _.Dispose() =
            if not completed && Directory.Exists tmp then (try Directory.Delete(tmp, true) with _ -> ())

/// Writes documents to a shard folder in one call.
let write (folder: string) (tokenizer: Tokenizer) (info: ShardInfo) (tokensPerShard: int64) (docs: seq<int[]>) : Meta =
    use w = new ShardWriter(folder, tokenizer, info, tokensPerShard)
    for d in docs do w.Add d
    w.Complete()

// ---------------------------------------------------------------------------------------------- reading

/// A folder's meta and its whole token stream.
let read (folder: string) : Meta * int[] =
    let meta = readMeta folder
    if meta.Tokens > int64 Array.MaxLength then
        raise (ShardError(folder, sprintf "%d tokens do not fit one array; read shard by shard" meta.Tokens))
    let tokens = Array.zeroCreate<int> (int meta.Tokens)
    let mutable start = 0L
    for s in meta.Shards do
        readShardInto (Path.Combine(folder, s.File)) meta.DType s.Tokens start meta.VocabSize (Span(tokens, int start, int s.Tokens))
        start <- start + s.Tokens
    meta, tokens

/// A folder's whole token stream.
let readTokens (folder: string) : int[] = snd (read folder)

// ---------------------------------------------------------------------------------------------- corpus → shards

/// How `prepare` turns corpus files into shards.
type PrepareOptions =
    { Split: Corpus.SplitRule
      /// Put BOS before each document (when the tokenizer has one).
      AddBos: bool
      /// Put EOS after each document (when the tokenizer has one).
      AddEos: bool
      TokensPerShard: int64 }
    /// Validation = the shipped V1 validation head; BOS before each story; 16M tokens per shard.
    static member Default =
        { Split = Corpus.ByFile [ Corpus.shippedValidationFile ]; AddBos = true; AddEos = false; TokensPerShard = 1L <<< 24 }

/// Tokenizes corpus files into `outFolder/train` and `outFolder/validation` (in parallel, in story order) and
/// returns both metas.
let prepare (tokenizer: Tokenizer) (files: string seq) (options: PrepareOptions) (outFolder: string) : Meta * Meta =
    let files = Seq.toList files
    let sources = sourcesOf files
    let info split = { Split = split; SplitRule = options.Split.Describe; Bos = options.AddBos; Eos = options.AddEos; Sources = sources }
    use train = new ShardWriter(Path.Combine(outFolder, "train"), tokenizer, info "train", options.TokensPerShard)
    use valid = new ShardWriter(Path.Combine(outFolder, "validation"), tokenizer, info "validation", options.TokensPerShard)
    let encode = Tokenizer.encodeDocument tokenizer options.AddBos options.AddEos
    Corpus.readAllStories files
    |> Seq.chunkBySize 256
    |> Seq.iter (fun chunk ->
        let docs = chunk |> Array.Parallel.map (fun s -> Corpus.assign options.Split s, encode s.Text)
        for split, doc in docs do
            match split with
            | Corpus.Train -> train.Add doc
            | Corpus.Validation -> valid.Add doc)
    let t = train.Complete()
    let v = valid.Complete()
    t, v
