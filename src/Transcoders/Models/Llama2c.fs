/// Karpathy's llama2.c checkpoints (`.bin`, the legacy "version 0" export, e.g. stories260K): a header of
/// 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a negative vocab_size
/// means an untied classifier at the end), then float32 tensors back to back, layers stacked. Its rotary
/// embedding turns adjacent pairs (2i, 2i+1), θ = 10000; RMSNorm ε = 1e-5; SwiGLU w2(silu(w1 x) ⊙ w3 x).
module Transcoders.Models.Llama2c

open System
open System.IO
open System.Runtime.InteropServices
open TorchSharp

/// The header of a llama2.c checkpoint.
type Header =
    { Dim: int; HiddenDim: int; NLayers: int; NHeads: int; NKvHeads: int
      /// Vocabulary size (positive even when the file stores it negated).
      VocabSize: int
      SeqLen: int
      /// The classifier is the token embedding (vocab_size > 0 in the file).
      SharedClassifier: bool }

let private headerBytes = 28L
let private magicV1 = 0x616b3432 // "ak42": llama2.c's versioned exports (version 1 fp32, version 2 int8)

/// The model the header describes.
let config (h: Header) : TransformerConfig =
    { DModel = h.Dim; NLayers = h.NLayers; NHeads = h.NHeads; NKvHeads = h.NKvHeads; DHead = None; DMlp = h.HiddenDim
      NCtx = h.SeqLen; VocabSize = h.VocabSize; Norm = RMSNorm; NormEps = 1e-5; FinalNorm = true
      Positions = Rotary (Interleaved, 10000.0); Mlp = Gated Silu; Biases = Biases.None
      TiedUnembed = h.SharedClassifier; InitRange = 0.02; Dropout = 0.0
      ParallelResidual = false; RotaryDim = None }

/// The tensors in file order: name in our model (None for the skipped RoPE tables) and element count.
let private layout (h: Header) : (string option * int64) list =
    let d, hd, l = int64 h.Dim, int64 (h.Dim / h.NHeads), h.NLayers
    let q, kv, m = int64 h.NHeads * hd, int64 h.NKvHeads * hd, int64 h.HiddenDim
    let perLayer name size = [ for i in 0 .. l - 1 -> Some (sprintf "blocks.%d.%s" i name), size ]
    [ yield Some "embed.weight", int64 h.VocabSize * d
      yield! perLayer "ln1.weight" d
      yield! perLayer "attn.q.weight" (q * d)
      yield! perLayer "attn.k.weight" (kv * d)
      yield! perLayer "attn.v.weight" (kv * d)
      yield! perLayer "attn.o.weight" (d * q)
      yield! perLayer "ln2.weight" d
      yield! perLayer "mlp.fc_gate.weight" (m * d) // w1, through silu
      yield! perLayer "mlp.fc_out.weight" (d * m) // w2
      yield! perLayer "mlp.fc_in.weight" (m * d) // w3, the linear branch
      yield Some "ln_final.weight", d
      yield None, int64 h.SeqLen * hd / 2L // freq_cis_real
      yield None, int64 h.SeqLen * hd / 2L // freq_cis_imag
      if not h.SharedClassifier then yield Some "unembed.weight", int64 h.VocabSize * d ]

/// The file size the header implies (None when it overflows 64 bits: no file is that long).
let private tryExpectedBytes (h: Header) =
    try
        let mutable total = headerBytes
        // checked: a corrupt header can make the sizes overflow and wrap to a plausible length
        let d, hd, l = int64 h.Dim, int64 (h.Dim / h.NHeads), int64 h.NLayers
        let q, kv, m, v = Checked.(*) (int64 h.NHeads) hd, Checked.(*) (int64 h.NKvHeads) hd, int64 h.HiddenDim, int64 h.VocabSize
        let sizes =
            [ v, d; l, d; l, Checked.(*) q d; l, Checked.(*) kv d; l, Checked.(*) kv d; l, Checked.(*) d q; l, d
              l, Checked.(*) m d; l, Checked.(*) d m; l, Checked.(*) m d; 1L, d
              int64 h.SeqLen, hd / 2L; int64 h.SeqLen, hd / 2L; (if h.SharedClassifier then 0L else v), d ]
        for count, size in sizes do total <- Checked.(+) total (Checked.(*) 4L (Checked.(*) count size))
        Some total
    with :? OverflowException -> None

/// The file size the header implies.
let expectedBytes (h: Header) =
    match tryExpectedBytes h with
    | Some n -> n
    | None -> Int64.MaxValue

/// Reads and validates the header (not the tensors); fails naming the file when it is not a
/// llama2.c version-0 checkpoint or its size disagrees with the header.
let readHeader (path: string) : Header =
    if not (File.Exists path) then raise (CheckpointError(path, "file not found"))
    let length = FileInfo(path).Length
    if length < headerBytes then
        raise (CheckpointError(path, sprintf "too short for a llama2.c checkpoint: %d bytes, the header alone is %d" length headerBytes))
    let ints =
        use f = File.OpenRead path
        use r = new BinaryReader(f)
        Array.init 7 (fun _ -> r.ReadInt32())
    if ints.[0] = magicV1 then
        raise (CheckpointError(path, sprintf "a llama2.c versioned export (magic 'ak42', version %d); only the legacy version-0 export is supported (export.py --version 0)" ints.[1]))
    let names = [| "dim"; "hidden_dim"; "n_layers"; "n_heads"; "n_kv_heads"; "vocab_size"; "seq_len" |]
    ints |> Array.iteri (fun i v ->
        if (i = 5 && (v = 0 || v = Int32.MinValue)) || (i <> 5 && v <= 0) then
            raise (CheckpointError(path, sprintf "not a llama2.c checkpoint: header field %s = %d (header %s)" names.[i] v (Shape.show (Array.map int64 ints)))))
    let h =
        { Dim = ints.[0]; HiddenDim = ints.[1]; NLayers = ints.[2]; NHeads = ints.[3]; NKvHeads = ints.[4]
          VocabSize = abs ints.[5]; SeqLen = ints.[6]; SharedClassifier = ints.[5] > 0 }
    if h.Dim % h.NHeads <> 0 || h.NHeads % h.NKvHeads <> 0 || (h.Dim / h.NHeads) % 2 <> 0 then
        raise (CheckpointError(path, sprintf "not a llama2.c checkpoint: dim %d, n_heads %d, n_kv_heads %d do not divide into even heads" h.Dim h.NHeads h.NKvHeads))
    let expected =
        match tryExpectedBytes h with
        | Some n -> n
        | None -> raise (CheckpointError(path, sprintf "not a llama2.c checkpoint: the header %s implies more than 2^63 bytes" (Shape.show (Array.map int64 ints))))
    if length <> expected then
        let what = if length < expected then "truncated" else "longer than its header says"
        raise (CheckpointError(path, sprintf "%s: the header (dim %d, hidden %d, layers %d, heads %d/%d, vocab %d%s, seq_len %d) implies %d bytes, the file has %d"
                                         what h.Dim h.HiddenDim h.NLayers h.NHeads h.NKvHeads h.VocabSize (if h.SharedClassifier then " tied" else " untied") h.SeqLen expected length))
    h

/// Loads a llama2.c checkpoint as a Transformer on `device` (the header is checked against the file's size
/// before anything is allocated); weights holding NaN or ±∞ are refused unless `options` allows them.
let loadWith (options: LoadOptions) (path: string) (device: torch.Device) : Transformer =
    let h = readHeader path
    let m = Transformer.create (config h) device
    let shapes = Transformer.parameters m |> List.map (fun (n, p) -> n, p.shape) |> dict
    use f = File.OpenRead path
    f.Seek(headerBytes, SeekOrigin.Begin) |> ignore
    let read (count: int64) =
        let bytes = Array.zeroCreate<byte> (int (count * 4L))
        f.ReadExactly(bytes, 0, bytes.Length)
        MemoryMarshal.Cast<byte, float32>(ReadOnlySpan bytes).ToArray()
    let tensors =
        seq {
          for name, count in layout h do
              match name with
              | None -> f.Seek(count * 4L, SeekOrigin.Current) |> ignore
              | Some name ->
                  yield name, torch.tensor((read count: float32[]), ReadOnlySpan<int64>(shapes.[name]), device = torch.CPU) }
    try CheckpointFile.copyInto (Some options) path m tensors
    with _ ->
        m.Dispose()
        reraise ()
    WeightProcessing.apply options m

/// `loadWith LoadOptions.Default`: finite weights only.
let load (path: string) (device: torch.Device) : Transformer = loadWith LoadOptions.Default path device
