namespace Transcoders.Activations

open System
open System.IO
open System.IO.Compression

/// Lossless compression of cache shards: the bytes of each tensor are byte-shuffled (all elements' first
/// bytes, then all second bytes, ...: Blosc's shuffle, which puts a float's low-entropy sign/exponent
/// bytes together) and then compressed with an in-box codec.
///
/// Measured on this project's machine (AMD EPYC Zen 4, one core; `scripts/activation_compression.fsx`,
/// 16,384 rows × 768, bf16 unless noted; "read" = decompress + un-shuffle into a tensor; uncompressed
/// shards are memory-mapped and read at several GB/s):
///
///   rows                      codec           size   write MB/s   read MB/s
///   Gaussian, per-dim scales  deflate-fastest 0.80      ~95         ~330
///                             brotli-q1       0.80     ~310         ~350
///                             brotli-q5       0.77      ~90         ~330
///   + outlier dims, t-tails   brotli-q1       0.79     ~300         ~350
///   float32 rows              brotli-q1       0.78     ~300         ~410
///
/// (Filled in from the script's run; see the report for exact figures.) bf16 keeps 8 bits of exponent and
/// 7 of mantissa: the mantissa byte is close to random, so no lossless codec gains more than the
/// exponent's spare entropy, about 20%, while reading is 10× slower than a memory map. Halving the size
/// comes from the dtype (f32 → bf16), not from compression. Compression therefore defaults to off; use
/// Brotli quality 1 when disk space, not read speed, is the limit (e.g. a cache on a network disk).
type Compression =
    | NoCompression
    /// Byte shuffle + Deflate (RFC 1951) at a System.IO.Compression level.
    | Deflate of level: CompressionLevel
    /// Byte shuffle + Brotli at quality 0 (fastest) .. 11 (smallest).
    | Brotli of quality: int

    /// The name written in manifests: none, deflate-fastest|optimal|smallest|none, brotli-q{0..11}.
    member c.Name =
        match c with
        | NoCompression -> "none"
        | Deflate CompressionLevel.Fastest -> "deflate-fastest"
        | Deflate CompressionLevel.Optimal -> "deflate-optimal"
        | Deflate CompressionLevel.SmallestSize -> "deflate-smallest"
        | Deflate CompressionLevel.NoCompression -> "deflate-none"
        | Deflate l -> invalidArg "level" (sprintf "unknown Deflate level %A" l)
        | Brotli q -> sprintf "brotli-q%d" q

    /// Fails unless the settings are valid (Brotli quality 0..11).
    member c.Validate() =
        match c with
        | Brotli q when q < 0 || q > 11 -> invalidArg "Compression" (sprintf "Brotli quality must be 0..11, got %d" q)
        | _ -> c.Name |> ignore

    /// The compression a manifest names, if known.
    static member TryParse(name: string) =
        match name with
        | "none" -> Some NoCompression
        | "deflate-fastest" -> Some(Deflate CompressionLevel.Fastest)
        | "deflate-optimal" -> Some(Deflate CompressionLevel.Optimal)
        | "deflate-smallest" -> Some(Deflate CompressionLevel.SmallestSize)
        | "deflate-none" -> Some(Deflate CompressionLevel.NoCompression)
        | n when n.StartsWith "brotli-q" ->
            match Int32.TryParse(n.Substring 8) with
            | true, q when q >= 0 && q <= 11 && n = sprintf "brotli-q%d" q -> Some(Brotli q)
            | _ -> None
        | _ -> None

/// Byte shuffling and the codecs.
module ShardCompression =
    /// dst[b·n + i] = src[i·size + b] for n = src.Length / size elements.
    let shuffle (elementSize: int) (src: ReadOnlySpan<byte>) (dst: Span<byte>) =
        if src.Length % elementSize <> 0 || dst.Length <> src.Length then
            invalidArg "src" "shuffle needs whole elements and a destination of the same length"
        let n = src.Length / elementSize
        if elementSize = 2 then
            for i in 0 .. n - 1 do
                dst[i] <- src[2 * i]
                dst[n + i] <- src[2 * i + 1]
        else
            for i in 0 .. n - 1 do
                for b in 0 .. elementSize - 1 do
                    dst[b * n + i] <- src[i * elementSize + b]

    /// The inverse of `shuffle`.
    let unshuffle (elementSize: int) (src: ReadOnlySpan<byte>) (dst: Span<byte>) =
        if src.Length % elementSize <> 0 || dst.Length <> src.Length then
            invalidArg "src" "unshuffle needs whole elements and a destination of the same length"
        let n = src.Length / elementSize
        if elementSize = 2 then
            for i in 0 .. n - 1 do
                dst[2 * i] <- src[i]
                dst[2 * i + 1] <- src[n + i]
        else
            for i in 0 .. n - 1 do
                for b in 0 .. elementSize - 1 do
                    dst[i * elementSize + b] <- src[b * n + i]

    /// The compressed form of `data` (elements of `elementSize` bytes).
    let compress (c: Compression) (elementSize: int) (data: ReadOnlySpan<byte>) : byte[] =
        let shuffled = Array.zeroCreate<byte> data.Length
        shuffle elementSize data (Span shuffled)
        match c with
        | NoCompression -> shuffled
        | Brotli quality ->
            let out = Array.zeroCreate<byte> (int (BrotliEncoder.GetMaxCompressedLength data.Length))
            let mutable written = 0
            if not (BrotliEncoder.TryCompress(ReadOnlySpan shuffled, Span out, &written, quality, 22)) then
                failwith "Brotli compression failed"
            out[.. written - 1]
        | Deflate level ->
            use ms = new MemoryStream()
            do
                use z = new DeflateStream(ms, level, true)
                z.Write(shuffled, 0, shuffled.Length)
            ms.ToArray()

    /// The `length` bytes `compress` was given; raises InvalidDataException when `data` is corrupt or
    /// decodes to another length.
    let decompress (c: Compression) (elementSize: int) (data: byte[]) (length: int) : byte[] =
        let shuffled =
            match c with
            | NoCompression ->
                if data.Length <> length then
                    raise (InvalidDataException(sprintf "holds %d bytes, expected %d" data.Length length))
                data
            | Brotli _ ->
                let out = Array.zeroCreate<byte> length
                let mutable written = 0
                if not (BrotliDecoder.TryDecompress(ReadOnlySpan data, Span out, &written)) || written <> length then
                    raise (InvalidDataException(sprintf "Brotli data is corrupt or does not decode to %d bytes" length))
                out
            | Deflate _ ->
                let out = Array.zeroCreate<byte> length
                try
                    use z = new DeflateStream(new MemoryStream(data), CompressionMode.Decompress)
                    let got = z.ReadAtLeast(Span out, length, false)
                    let extra = Array.zeroCreate<byte> 1
                    if got <> length || z.Read(extra, 0, 1) <> 0 then
                        raise (InvalidDataException(sprintf "Deflate data does not decode to %d bytes" length))
                with :? InvalidDataException as e ->
                    raise (InvalidDataException(sprintf "Deflate data is corrupt: %s" e.Message))
                out
        let result = Array.zeroCreate<byte> length
        unshuffle elementSize (ReadOnlySpan shuffled) (Span result)
        result
