/// safetensors read and write (https://github.com/huggingface/safetensors format): u64 LE header
/// length N, N bytes of UTF-8 JSON, then the raw little-endian, row-major data. Headers are validated
/// like Hugging Face's reader does; data is memory-mapped so a large file is never held twice in memory.
///
/// Layout rules, on read and write alike:
/// - the header is at most 100 MB and is a JSON object without duplicate keys: tensor name ->
///   {"dtype", "shape", "data_offsets": [begin, end]} plus an optional "__metadata__" of string -> string;
/// - the tensors cover the data section exactly: in offset order each begins where the previous one
///   ends, with no gap, no overlap and nothing after the last (as Hugging Face requires);
/// - reading does not depend on the order of the header's keys or of the data.
/// Written files follow Hugging Face's own writer, so a file we save is byte-identical to theirs:
/// compact JSON with "__metadata__" first, padded with spaces to a multiple of 8 bytes; tensors in
/// descending dtype order (I64, F64, F32, I32, BF16, F16, I16, I8, U8, BOOL: wider first, which keeps
/// every tensor aligned to its element size), then by name (UTF-8 byte order).
module Transcoders.Files.Safetensors

#nowarn "9" // native pointers into the memory-mapped file and into tensor storage

open System
open System.Buffers.Binary
open System.Collections.Generic
open System.IO
open System.IO.MemoryMappedFiles
open System.Text
open System.Text.Json
open Microsoft.FSharp.NativeInterop
open TorchSharp

/// Element types of the format. Names as in the header ("F32", "BF16", "BOOL", ...).
type DType =
    | F64 | F32 | F16 | BF16 | I64 | I32 | I16 | I8 | U8 | Bool

    /// The name used in headers.
    member d.Name =
        match d with
        | F64 -> "F64" | F32 -> "F32" | F16 -> "F16" | BF16 -> "BF16" | I64 -> "I64"
        | I32 -> "I32" | I16 -> "I16" | I8 -> "I8" | U8 -> "U8" | Bool -> "BOOL"

    /// Bytes per element.
    member d.Size =
        match d with
        | F64 | I64 -> 8
        | F32 | I32 -> 4
        | F16 | BF16 | I16 -> 2
        | I8 | U8 | Bool -> 1

    /// The matching TorchSharp element type.
    member d.ScalarType =
        match d with
        | F64 -> torch.ScalarType.Float64 | F32 -> torch.ScalarType.Float32
        | F16 -> torch.ScalarType.Float16 | BF16 -> torch.ScalarType.BFloat16
        | I64 -> torch.ScalarType.Int64 | I32 -> torch.ScalarType.Int32
        | I16 -> torch.ScalarType.Int16 | I8 -> torch.ScalarType.Int8
        | U8 -> torch.ScalarType.Byte | Bool -> torch.ScalarType.Bool

    /// Position in Hugging Face's dtype enum; their writer orders tensors by it, highest first.
    member internal d.Rank =
        match d with
        | Bool -> 0 | U8 -> 1 | I8 -> 2 | I16 -> 3 | F16 -> 4 | BF16 -> 5
        | I32 -> 6 | F32 -> 7 | F64 -> 8 | I64 -> 9

    static member All = [ F64; F32; F16; BF16; I64; I32; I16; I8; U8; Bool ]

    /// The dtype named `name` in a header, if supported.
    static member TryParse(name: string) = DType.All |> List.tryFind (fun d -> d.Name = name)

    /// The dtype storing TorchSharp's `t`, if the format has one (complex and unsigned wider types have none).
    static member OfScalarType(t: torch.ScalarType) = DType.All |> List.tryFind (fun d -> d.ScalarType = t)

/// One tensor's header entry. `Start`/`End` are byte offsets into the data section.
type Entry =
    { Name: string; DType: DType; Shape: int64[]; Start: int64; End: int64 }

    /// Bytes of data (`End - Start`).
    member e.ByteLength = e.End - e.Start

/// A clear error naming the file and what is wrong with it.
exception SafetensorsError of path: string * problem: string with
    override this.Message = sprintf "%s: %s" this.path this.problem

let private raiseFor path problem : 'a = raise (SafetensorsError(path, problem))

/// Headers longer than this are refused (Hugging Face's limit), so a corrupt length cannot allocate gigabytes.
let maxHeaderBytes = 100_000_000L

/// A shape as the header writes it: [2, 3].
let private showShape (shape: int64[]) = "[" + String.Join(", ", shape) + "]"

/// Element count of `shape`, or None when it overflows int64.
let private elementCount (shape: int64[]) =
    try Some(Array.fold (fun acc d -> Checked.(*) acc d) 1L shape) with :? OverflowException -> None

/// Whether torch can make a tensor of `shape`: its strides (products of the dimensions, zeros counted
/// as ones) must fit int64 even when it has no elements.
let private stridesFit (shape: int64[]) = (elementCount (shape |> Array.map (max 1L))).IsSome

/// Parses and validates a header against a data section of `dataLength` bytes.
/// Returns the entries in the header's key order and the metadata.
let private parseHeader (path: string) (header: byte[]) (dataLength: int64) =
    let fail fmt = Printf.kprintf (raiseFor path) fmt
    let text =
        try UTF8Encoding(false, true).GetString header
        with :? DecoderFallbackException -> fail "header is not valid UTF-8"
    use doc =
        try JsonDocument.Parse text
        with :? JsonException as e -> fail "header is not valid JSON: %s" e.Message
    if doc.RootElement.ValueKind <> JsonValueKind.Object then
        fail "header is a JSON %A, not an object (not a safetensors file?)" doc.RootElement.ValueKind
    /// An object's properties, refusing duplicate keys (JSON parsers disagree on which one wins).
    let properties (what: string) (o: JsonElement) =
        let seen = HashSet<string>()
        [ for p in o.EnumerateObject() do
              if not (seen.Add p.Name) then fail "%s has the key '%s' twice" what p.Name
              p.Name, p.Value ]
    let naturals name field (v: JsonElement) =
        if v.ValueKind <> JsonValueKind.Array then fail "tensor '%s': %s is not an array" name field
        [| for x in v.EnumerateArray() ->
               if x.ValueKind <> JsonValueKind.Number then
                   fail "tensor '%s': %s holds %s, not a number" name field (x.GetRawText())
               match x.TryGetInt64() with
               | true, n when n >= 0L -> n
               | true, n -> fail "tensor '%s': %s holds the negative number %d" name field n
               | _ -> fail "tensor '%s': %s holds %s, not an integer that fits 64 bits" name field (x.GetRawText()) |]
    let entry name (v: JsonElement) =
        if v.ValueKind <> JsonValueKind.Object then fail "tensor '%s' is not a JSON object" name
        let fields = dict (properties (sprintf "tensor '%s'" name) v)
        let field key =
            match fields.TryGetValue key with
            | true, x -> x
            | _ -> fail "tensor '%s' has no '%s'" name key
        let dtype =
            let d = field "dtype"
            if d.ValueKind <> JsonValueKind.String then fail "tensor '%s': dtype is %s, not a string" name (d.GetRawText())
            match DType.TryParse(d.GetString()) with
            | Some t -> t
            | None ->
                fail "tensor '%s': unsupported dtype '%s' (supported: %s)" name (d.GetString())
                    (DType.All |> List.map (fun d -> d.Name) |> String.concat ", ")
        let shape = naturals name "shape" (field "shape")
        if not (stridesFit shape) then fail "tensor '%s': shape %s is too large for a tensor" name (showShape shape)
        let offsets = naturals name "data_offsets" (field "data_offsets")
        if offsets.Length <> 2 then fail "tensor '%s': data_offsets has %d numbers, not 2" name offsets.Length
        let b, e = offsets[0], offsets[1]
        if b > e then fail "tensor '%s': data_offsets [%d, %d] begin after they end" name b e
        if e > dataLength then
            fail "tensor '%s': data_offsets [%d, %d] run past the data section (%d bytes)" name b e dataLength
        match elementCount shape with
        | Some n when n <= Int64.MaxValue / int64 dtype.Size && n * int64 dtype.Size = e - b -> ()
        | _ ->
            fail "tensor '%s': shape %s of %s does not match the byte length of data_offsets [%d, %d] (%d bytes)"
                name (showShape shape) dtype.Name b e (e - b)
        { Name = name; DType = dtype; Shape = shape; Start = b; End = e }
    let mutable metadata = Map.empty
    let entries = ResizeArray()
    for name, v in properties "header" doc.RootElement do
        if name = "__metadata__" then
            if v.ValueKind <> JsonValueKind.Object then fail "__metadata__ is not a JSON object"
            for key, value in properties "__metadata__" v do
                if value.ValueKind <> JsonValueKind.String then
                    fail "__metadata__ value of '%s' is %s, not a string" key (value.GetRawText())
                metadata <- metadata.Add(key, value.GetString())
        else entries.Add(entry name v)
    // Exact coverage: in offset order, each tensor starts where the previous one ended.
    let mutable cursor = 0L
    let mutable previous = "the start of the data section"
    for e in entries |> Seq.sortBy (fun e -> e.Start, e.End) do
        if e.Start < cursor then fail "tensor '%s' (bytes %d..%d) overlaps %s" e.Name e.Start e.End previous
        if e.Start > cursor then fail "gap of %d bytes between %s and tensor '%s'" (e.Start - cursor) previous e.Name
        cursor <- e.End
        previous <- sprintf "tensor '%s' (ending at byte %d)" e.Name e.End
    if cursor <> dataLength then
        fail "data section has %d bytes after the last tensor (%d bytes, tensors cover %d)" (dataLength - cursor) dataLength cursor
    List.ofSeq entries, metadata

/// Tensors are copied in pieces of at most this many bytes (a span's length is an int).
let private chunkBytes = 1L <<< 30

/// What to do with one piece of a tensor's bytes: (offset of the piece within the tensor, the piece).
type private PieceAction = delegate of int64 * Span<byte> -> unit

/// Calls `f` over `t` (contiguous, on the CPU) in pieces of at most `chunkBytes` bytes.
let private forEachPiece (t: torch.Tensor) (f: PieceAction) =
    let n = t.NumberOfElements
    if n > 0L then
        use flat = t.view(-1L)
        let size = t.ElementSize
        let per = max 1L (chunkBytes / size)
        let mutable i = 0L
        while i < n do
            let count = min per (n - i)
            use piece = flat.narrow(0L, i, count)
            f.Invoke(i * size, piece.bytes)
            i <- i + count

/// The span of `length` (< 2 GB) bytes at `address`.
let private spanAt (address: nativeint) (length: int) =
    ReadOnlySpan<byte>(NativePtr.toVoidPtr (NativePtr.ofNativeInt<byte> address), length)

/// An open safetensors file (validated header, memory-mapped data). Dispose to unmap; the file is not
/// locked against deletion or replacement meanwhile, and is released entirely on Dispose.
[<Sealed>]
type Reader private (path: string, entries: Entry list, metadata: Map<string, string>,
                     file: MemoryMappedFile, view: MemoryMappedViewAccessor, data: nativeint) =
    let byName = dict [ for e in entries -> e.Name, e ]
    let mutable disposed = false

    interface IDisposable with
        member _.Dispose() =
            if not disposed then
                disposed <- true
                view.SafeMemoryMappedViewHandle.ReleasePointer()
                view.Dispose()
                file.Dispose()

    /// Opens and validates `path`; raises SafetensorsError naming the file and the problem.
    static member Open(path: string) : Reader =
        let fail fmt = Printf.kprintf (raiseFor path) fmt
        if not BitConverter.IsLittleEndian then fail "reading safetensors needs a little-endian machine"
        let stream =
            try new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read ||| FileShare.Delete)
            with
            | :? FileNotFoundException | :? DirectoryNotFoundException -> fail "no such file"
            | :? IOException | :? UnauthorizedAccessException | :? ArgumentException as e -> fail "cannot open: %s" e.Message
        try
            let length = stream.Length
            if length < 8L then fail "file has %d bytes, fewer than the 8 of the header length" length
            let prefix = Array.zeroCreate<byte> 8
            stream.ReadExactly prefix
            let n = BinaryPrimitives.ReadUInt64LittleEndian prefix
            if n > uint64 maxHeaderBytes then fail "header length %d exceeds the limit of %d bytes" n maxHeaderBytes
            if int64 n > length - 8L then fail "header length %d runs past the end of the file (%d bytes)" n length
            let header = Array.zeroCreate<byte> (int n)
            stream.ReadExactly header
            let entries, metadata = parseHeader path header (length - 8L - int64 n)
            let file = MemoryMappedFile.CreateFromFile(stream, null, 0L, MemoryMappedFileAccess.Read, HandleInheritability.None, false)
            try
                let view = file.CreateViewAccessor(0L, 0L, MemoryMappedFileAccess.Read)
                let mutable p = NativePtr.nullPtr<byte>
                view.SafeMemoryMappedViewHandle.AcquirePointer(&p)
                let data = NativePtr.toNativeInt p + nativeint view.PointerOffset + nativeint (8L + int64 n)
                new Reader(path, entries, metadata, file, view, data)
            with _ ->
                file.Dispose()
                reraise ()
        with _ ->
            stream.Dispose()
            reraise ()

    /// The file this reader reads.
    member _.Path = path
    /// The header's entries, in the header's key order.
    member _.Entries = entries
    /// The header's "__metadata__" (empty when absent).
    member _.Metadata = metadata
    /// Whether the file holds a tensor called `name`.
    member _.Contains(name: string) = byName.ContainsKey name

    /// The entry of tensor `name`; raises SafetensorsError when there is none.
    member _.Info(name: string) : Entry =
        match byName.TryGetValue name with
        | true, e -> e
        | _ ->
            let known = entries |> List.truncate 8 |> List.map (fun e -> e.Name) |> String.concat ", "
            raiseFor path (sprintf "no tensor named '%s' (%d tensors: %s%s)" name entries.Length known
                               (if entries.Length > 8 then ", ..." else ""))

    /// A new tensor (the caller owns it) with the entry's dtype and shape, on `device` (default CPU).
    /// Its bytes are copied once from the mapped file (plus the copy to `device` when that is not the CPU).
    member r.Tensor(name: string, ?device: torch.Device) : torch.Tensor =
        ObjectDisposedException.ThrowIf(disposed, r)
        let e = r.Info name
        let device = defaultArg device torch.CPU
        let cpu = torch.empty(e.Shape, dtype = e.DType.ScalarType, device = torch.CPU)
        try
            forEachPiece cpu (PieceAction(fun offset piece -> (spanAt (data + nativeint (e.Start + offset)) piece.Length).CopyTo piece))
            if e.DType = Bool then
                forEachPiece cpu (PieceAction(fun _ piece ->
                    if piece.IndexOfAnyExcept(0uy, 1uy) >= 0 then
                        raiseFor path (sprintf "tensor '%s': BOOL data holds a byte other than 0 and 1" name)))
        with _ ->
            cpu.Dispose()
            reraise ()
        if device.``type`` = DeviceType.CPU then cpu
        else
            use cpu = cpu
            cpu.``to``(device)

    /// Tensor `name` converted to `dtype` (e.g. BF16 weights read as float32), on `device` (default CPU).
    member r.TensorAs(name: string, dtype: torch.ScalarType, ?device: torch.Device) : torch.Tensor =
        let t = r.Tensor(name, ?device = device)
        if t.dtype = dtype then t
        else
            use t = t
            t.to_type dtype

/// Every tensor of a file, in header order, on `device`. The caller owns the tensors.
let load (path: string) (device: torch.Device) : (string * torch.Tensor) list =
    use r = Reader.Open path
    let loaded = ResizeArray()
    try
        for e in r.Entries do loaded.Add(e.Name, r.Tensor(e.Name, device))
        List.ofSeq loaded
    with _ ->
        for _, t in loaded do t.Dispose()
        reraise ()

/// Places tensors (name, dtype, shape) in the data section in Hugging Face's order (see the module comment).
let private layout (path: string) (specs: (string * DType * int64[]) seq) : Entry list =
    let fail fmt = Printf.kprintf (raiseFor path) fmt
    let seen = HashSet<string>()
    let specs = List.ofSeq specs
    for name, dtype, shape in specs do
        if isNull name then fail "a tensor has a null name"
        if name = "__metadata__" then fail "'__metadata__' is reserved and cannot name a tensor"
        if not (seen.Add name) then fail "two tensors are named '%s'" name
        if shape |> Array.exists (fun d -> d < 0L) then fail "tensor '%s': negative dimension in shape %s" name (showShape shape)
        let fits = stridesFit shape && (elementCount shape).Value <= Int64.MaxValue / int64 dtype.Size
        if not fits then
            fail "tensor '%s': shape %s is too large" name (showShape shape)
    let utf8 (s: string) =
        try UTF8Encoding(false, true).GetBytes s
        with :? EncoderFallbackException -> fail "tensor name %A is not valid Unicode" s
    let keyed = specs |> List.map (fun (name, dtype, shape) -> utf8 name, (name, dtype, shape))
    let order (an: byte[], (_, (ad: DType), _)) (bn: byte[], (_, (bd: DType), _)) =
        if ad.Rank <> bd.Rank then compare bd.Rank ad.Rank
        else ReadOnlySpan<byte>(an).SequenceCompareTo(ReadOnlySpan<byte>(bn))
    let mutable offset = 0L
    [ for _, (name, dtype, shape) in List.sortWith order keyed ->
          let bytes = (elementCount shape).Value * int64 dtype.Size
          let e = { Name = name; DType = dtype; Shape = shape; Start = offset; End = Checked.(+) offset bytes }
          offset <- e.End
          e ]

/// The header bytes for `entries` (already laid out), padded with spaces to a multiple of 8.
let private headerBytes (path: string) (metadata: Map<string, string>) (entries: Entry list) =
    let strict = UTF8Encoding(false, true)
    for KeyValue(k, v) in metadata do
        if isNull k || isNull v then raiseFor path "metadata keys and values must not be null"
        try strict.GetByteCount k + strict.GetByteCount v |> ignore
        with :? EncoderFallbackException -> raiseFor path (sprintf "metadata entry %A is not valid Unicode" k)
    use buffer = new MemoryStream()
    do
        let options = JsonWriterOptions(Encoder = Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping)
        use w = new Utf8JsonWriter(buffer, options)
        w.WriteStartObject()
        if not metadata.IsEmpty then
            w.WriteStartObject "__metadata__"
            for KeyValue(k, v) in metadata do w.WriteString(k, v)
            w.WriteEndObject()
        for e in entries do
            w.WriteStartObject e.Name
            w.WriteString("dtype", e.DType.Name)
            w.WriteStartArray "shape"
            for d in e.Shape do w.WriteNumberValue d
            w.WriteEndArray()
            w.WriteStartArray "data_offsets"
            w.WriteNumberValue e.Start
            w.WriteNumberValue e.End
            w.WriteEndArray()
            w.WriteEndObject()
        w.WriteEndObject()
    while buffer.Length % 8L <> 0L do buffer.WriteByte(byte ' ')
    if buffer.Length > maxHeaderBytes then raiseFor path (sprintf "header would have %d bytes, over the %d limit" buffer.Length maxHeaderBytes)
    buffer.ToArray()

/// The format's dtype of `t`, or a SafetensorsError naming the tensor.
let private dtypeOf (path: string) (name: string) (t: torch.Tensor) =
    match DType.OfScalarType t.dtype with
    | Some d -> d
    | None -> raiseFor path (sprintf "tensor '%s' has dtype %A, which safetensors cannot store" name t.dtype)

/// Writes `t`'s bytes (any device, any strides) to `stream`, moving at most one tensor to the CPU at a time.
let private writeTensor (path: string) (stream: Stream) (e: Entry) (t: torch.Tensor) =
    if t.is_sparse then raiseFor path (sprintf "tensor '%s' is sparse; save its dense form or its indices and values" e.Name)
    let dtype = dtypeOf path e.Name t
    if dtype <> e.DType || t.shape <> e.Shape then
        raiseFor path (sprintf "tensor '%s' is %s %s but was declared %s %s" e.Name dtype.Name (showShape t.shape) e.DType.Name (showShape e.Shape))
    // A scope, because detach/cpu/contiguous may each make a new handle (or a copy) that must be freed here.
    use _ = torch.NewDisposeScope()
    let cpu = t.detach().cpu().contiguous()
    forEachPiece cpu (PieceAction(fun _ piece -> stream.Write(Span<byte>.op_Implicit piece)))

/// Writes a file, atomically, whose tensors are declared up front as (name, dtype, shape) and produced one
/// at a time, in file order, by `produce name`: a large file is written without holding all its tensors.
/// The writer disposes each produced tensor once written (pass `t.alias()` to keep one of your own).
let saveStreaming (path: string) (metadata: Map<string, string>) (specs: (string * DType * int64[]) seq)
                  (produce: string -> torch.Tensor) : unit =
    let entries = layout path specs
    let header = headerBytes path metadata entries
    AtomicFile.write path (fun stream ->
        let prefix = Array.zeroCreate<byte> 8
        BinaryPrimitives.WriteUInt64LittleEndian(prefix, uint64 header.Length)
        stream.Write(prefix, 0, 8)
        stream.Write(header, 0, header.Length)
        for e in entries do
            use t = produce e.Name
            writeTensor path stream e t)

/// Writes tensors (any of the supported dtypes, any device) and string metadata, atomically.
/// The tensors stay the caller's; each is copied to the CPU (when elsewhere) only while it is written.
let save (path: string) (metadata: Map<string, string>) (tensors: (string * torch.Tensor) seq) : unit =
    let tensors = List.ofSeq tensors
    let byName = Dictionary<string, torch.Tensor>()
    for name, t in tensors do
        if not (isNull name) then byName[name] <- t
    let specs = [ for name, t in tensors -> name, dtypeOf path name t, t.shape ]
    saveStreaming path metadata specs (fun name -> byName[name].alias())
