namespace Transcoders.Activations

open System
open System.IO
open System.IO.Compression

/// Lossless compression of cache shards: the bytes of each tensor are byte-shuffled (all elements' first
/// bytes, then all second bytes, ...: Blosc's shuffle, which puts a float's low-entropy sign/exponent
/// bytes together) and then compressed with an in-box codec.
///
/// Measured with `scripts/activation_compression.fsx` (compressed size / raw size of the same dtype; speeds
/// per core, taken on a 2-core machine shared with other jobs, so only their ratios are reliable):
///
///   BF16 rows                                 no-shuffle  deflate-  deflate-  brotli-  brotli-  brotli-  brotli-
///                                             brotli-q1   fastest   optimal   q0       q1       q4       q9
///   Gaussian, per-dim scales (16384×768)        0.790      0.871     0.711    0.737    0.718    0.708    0.707
///   + t(4) tails, mean, outlier dims            0.791      0.872     0.713    0.738    0.719    0.709    0.708
///   real: stories260K, 5 layers × resid_pre,    0.687      0.777     0.626    0.645    0.611    0.581    0.582
///     ln2.hook_normalized, mlp_out (8192×64)
///   compress MB/s (Gaussian)                               22        8       109      78       15       2
///   decompress + unshuffle MB/s (Gaussian)                 74       81       152     166      195     186
///
/// F16 and F32 rows compress less (brotli-q1: 0.86 Gaussian, 0.74 real). End to end, bf16 shards of
/// 4096 rows written by `ActivationCache` and read back by `CachedActivationSource` without checksums:
/// uncompressed 2.9–3.2 GB/s read (memory-mapped), brotli-q1 56–64 MB/s read and 21–27 MB/s written
/// (uncompressed: 76–140 MB/s written, most of it SHA-256 and the copy to disk).
///
/// So compression saves 28–42% of a bf16 cache but makes reading about 50× slower: a pair of 4096×768
/// bf16 batches (12.6 MB) takes ~0.2 s to decode on one core, far longer than a GPU training step.
/// bf16's mantissa byte is close to random, so no lossless codec can gain much more; halving the size
/// comes from the dtype (F32 → BF16). Compression therefore defaults to off; Brotli quality 1 is the
/// choice when disk space, not read speed, is the limit (a cache on a network disk, an archive).
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
