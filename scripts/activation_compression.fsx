// Does compressing activation-cache shards pay? Size ratio and single-core speed of each codec
// (byte shuffle + Deflate/Brotli, see src/Transcoders/Activations/ShardCompression.fs) on rows stored
// as BF16, F16 and F32, against reading an uncompressed (memory-mapped) shard.
//
//   dotnet build src/Transcoders -c Release
//   dotnet fsi scripts/activation_compression.fsx [--rows N] [activations.safetensors]
//
// --rows: synthetic rows per dataset (default 16384; the tests pass a small number).
// The optional file holds real activations (F32 tensors [tokens, d], one per hook); without it only
// synthetic rows are measured: Gaussian with per-dimension scales, and a heavier-tailed variant with a
// mean offset and a few large outlier dimensions, as residual streams have.
#load "load.fsx"

open System
open System.Diagnostics
open System.IO
open System.IO.Compression
open TorchSharp
open Transcoders.Activations
open Transcoders.Files
open Transcoders.Files.Safetensors

torch.set_num_threads 1
let rows, args =
    match fsi.CommandLineArgs |> Array.tail |> List.ofArray with
    | "--rows" :: n :: rest -> int64 n, Array.ofList rest
    | rest -> 16384L, Array.ofList rest

/// Synthetic rows [n, d]: per-dimension log-normal scales; `heavy` adds Student-t(4) tails, a per-dimension
/// mean and 4 outlier dimensions 30× larger.
let synthetic (n: int64) (d: int64) (heavy: bool) =
    torch.manual_seed 1L |> ignore
    use scales = torch.randn(d).mul(torch.tensor 0.5f).exp()
    use z = torch.randn(n, d)
    if not heavy then z.mul(scales)
    else
        use chi = torch.randn(n, d, 4L).pow(torch.tensor 2.0f).sum(-1L).div(torch.tensor 4.0f)
        use t = z.div(chi.sqrt())
        use mean = torch.randn(d).mul(torch.tensor 0.5f)
        use outliers = torch.ones(d)
        outliers.narrow(0L, 0L, 4L).fill_(30.0f) |> ignore
        t.mul(scales).mul(outliers).add(mean)

let datasets =
    [ yield sprintf "Gaussian %d×768" rows, [ "x", synthetic rows 768L false ]
      yield sprintf "heavy-tailed + outliers %d×768" rows, [ "x", synthetic rows 768L true ]
      if args.Length > 0 then
          yield sprintf "real: %s" (Path.GetFileName args[0]), Safetensors.load args[0] torch.CPU ]

let bytesOf (t: torch.Tensor) = (use c = t.contiguous() in c.bytes.ToArray())

/// Best of `reps` timings of f, in seconds.
let best reps (f: unit -> unit) =
    [ for _ in 1 .. reps ->
          let sw = Stopwatch.StartNew()
          f ()
          sw.Elapsed.TotalSeconds ]
    |> List.min

let mb (bytes: int64) (seconds: float) = float bytes / 1e6 / seconds

let codecs = [ Deflate CompressionLevel.Fastest; Deflate CompressionLevel.Optimal; Brotli 0; Brotli 1; Brotli 4; Brotli 6; Brotli 9 ]

/// Brotli q1 without the byte shuffle, to show what the shuffle contributes.
let unshuffledBrotli (data: byte[]) =
    let out = Array.zeroCreate<byte> (int (BrotliEncoder.GetMaxCompressedLength data.Length))
    let mutable written = 0
    BrotliEncoder.TryCompress(ReadOnlySpan data, Span out, &written, 1, 22) |> ignore
    written

printfn "| rows | dtype | codec | size ratio | compress MB/s | decompress+unshuffle MB/s |"
printfn "|---|---|---|---|---|---|"
for name, tensors in datasets do
    for dtype in [ BF16; F16; F32 ] do
        let raw = [ for _, t in tensors -> (use c = t.to_type(dtype.ScalarType) in bytesOf c) ]
        let total = raw |> List.sumBy (fun b -> int64 b.Length)
        let plain = raw |> List.sumBy (fun b -> int64 (unshuffledBrotli b))
        printfn "| %s | %s | brotli-q1, no shuffle | %.3f | | |" name dtype.Name (float plain / float total)
        for c in codecs do
            let mutable packed = []
            let tc = best 2 (fun () -> packed <- [ for b in raw -> ShardCompression.compress c dtype.Size (ReadOnlySpan b) ])
            let size = packed |> List.sumBy (fun p -> int64 p.Length)
            let td = best 3 (fun () -> for p, b in List.zip packed raw do ShardCompression.decompress c dtype.Size p b.Length |> ignore)
            printfn "| %s | %s | %s | %.3f | %.0f | %.0f |" name dtype.Name c.Name (float size / float total) (mb total tc) (mb total td)

// End to end: write a cache and read it back through CachedActivationSource (rows to tensors, checksums).
printfn "\n| rows | cache | shard bytes | write MB/s | read MB/s (no checksum) | read MB/s (checksum) |"
printfn "|---|---|---|---|---|---|"
for name, tensors in datasets do
    let hooks = tensors |> List.map fst
    let n = (snd tensors.Head).shape[0]
    for c in [ NoCompression; Brotli 1 ] do
        let dir = Path.Combine(Path.GetTempPath(), "activation-compression-" + Guid.NewGuid().ToString("N"))
        try
            let source () =
                let mutable given = false
                let next () =
                    if given then None
                    else
                        given <- true
                        Some(Pass.ofMap (Map.ofList [ for h, t in tensors -> h, t.unsqueeze(0L) ]))
                new PassSource(hooks, KeepBos, next) :> IRowSource
            let config = { CacheConfig.Default with RowsPerShard = 4096L; Compression = c; DType = BF16 }
            let mutable m = Unchecked.defaultof<CacheManifest>
            let tw = best 1 (fun () -> use s = source () in m <- ActivationCache.write dir config s)
            let logical = int64 hooks.Length * n * (tensors |> List.averageBy (fun (_, t) -> float t.shape[1]) |> int64) * 2L
            let read verify =
                best 3 (fun () ->
                    use r = new CachedActivationSource(dir, { CachedReadConfig.Default with VerifyChecksums = verify }) :> IRowSource
                    let mutable go = true
                    while go do
                        use _ = torch.NewDisposeScope()
                        go <- (r.Read 4096L).IsSome)
            let bytes = m.Shards |> List.sumBy (fun s -> s.Bytes)
            printfn "| %s | bf16 %s | %d (%.3f) | %.0f | %.0f | %.0f |" name c.Name bytes (float bytes / float logical)
                (mb logical tw) (mb logical (read false)) (mb logical (read true))
        finally
            if Directory.Exists dir then Directory.Delete(dir, true)
