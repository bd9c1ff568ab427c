/// safetensors: round trips, Hugging Face fixtures, an independent parser, corrupt files, atomic saves.
module Transcoders.Tests.SafetensorsTests

open System
open System.IO
open System.Runtime.InteropServices
open System.Text
open System.Text.Json
open System.Text.Json.Nodes
open Expecto
open FsCheck
open FsCheck.FSharp
open TorchSharp
open Transcoders.Files
open Transcoders.Files.Safetensors
open Transcoders.Tests.Fixtures

/// A minimal safetensors parser written from the format's description, independent of the reader.
module Independent =
    type Tensor = { Name: string; DType: string; Shape: int64[]; Begin: int64; End: int64 }

    /// Header length, header text, entries in key order, metadata, and where the data section starts.
    let parse (bytes: byte[]) =
        use r = new BinaryReader(new MemoryStream(bytes))
        let n = r.ReadUInt64()
        let header = Encoding.UTF8.GetString(bytes, 8, int n)
        use doc = JsonDocument.Parse header
        let mutable metadata = Map.empty
        let tensors = ResizeArray()
        for p in doc.RootElement.EnumerateObject() do
            if p.Name = "__metadata__" then
                for m in p.Value.EnumerateObject() do metadata <- metadata.Add(m.Name, m.Value.GetString())
            else
                let offsets = [| for x in p.Value.GetProperty("data_offsets").EnumerateArray() -> x.GetInt64() |]
                tensors.Add { Name = p.Name; DType = p.Value.GetProperty("dtype").GetString()
                              Shape = [| for x in p.Value.GetProperty("shape").EnumerateArray() -> x.GetInt64() |]
                              Begin = offsets[0]; End = offsets[1] }
        int64 n, header, List.ofSeq tensors, metadata, 8L + int64 n

    /// The bytes of a tensor in the file.
    let data (bytes: byte[]) (t: Tensor) =
        let _, _, _, _, start = parse bytes
        bytes[int (start + t.Begin) .. int (start + t.End) - 1]

/// A tensor's bytes, row-major, read through the CPU.
let bytesOf (t: torch.Tensor) =
    use c = t.cpu().contiguous()
    if c.NumberOfElements = 0L then [||] else c.bytes.ToArray()

/// A tensor holding exactly `bytes` (row-major) as `dtype`.
let tensorOfBytes (dtype: DType) (shape: int64[]) (bytes: byte[]) =
    let t = torch.empty(shape, dtype = dtype.ScalarType)
    if bytes.Length > 0 then t.bytes <- Span<byte>(bytes)
    t

/// Random raw bytes for a tensor: every bit pattern (NaN payloads, infinities, subnormals, -0) for floats.
let randomBytes (dtype: DType) (shape: int64[]) (seed: int) =
    let rng = Random seed
    let n = int (Array.fold (*) 1L shape) * dtype.Size
    let b = Array.zeroCreate<byte> n
    rng.NextBytes b
    if dtype = Bool then b |> Array.map (fun x -> x &&& 1uy) else b

/// Runs `f` and expects a SafetensorsError naming `path` whose problem contains `keyword`.
let expectError (path: string) (keyword: string) (f: unit -> unit) =
    try
        f ()
        failtestf "expected a SafetensorsError containing '%s'" keyword
    with SafetensorsError(p, problem) as e ->
        Expect.equal p path "the error names the file"
        Expect.stringContains problem keyword "the error says what is wrong"
        Expect.stringContains e.Message path "the message names the file"

/// Opens a file and reads every tensor (to bytes), disposing everything.
let readAll (path: string) =
    use r = Reader.Open path
    r.Metadata, [ for e in r.Entries -> e, (use t = r.Tensor e.Name in bytesOf t) ]

/// A file made of a length prefix, `header` (as given, unpadded) and `data`.
let rawFile (header: string) (data: byte[]) =
    let h = Encoding.UTF8.GetBytes header
    Array.concat [ BitConverter.GetBytes(uint64 h.Length); h; data ]

let nameGen =
    gen {
        let! chars = Gen.elements [ "a"; "b"; "Z"; "."; "_"; "0"; "é"; "中"; "😀"; "\""; "\\"; "\t"; " " ] |> Gen.listOf
        return String.concat "" (List.truncate 6 chars)
    }

let shapeGen =
    gen {
        let! ndim = Gen.choose (0, 4)
        return! Gen.arrayOfLength ndim (Gen.frequency [ 1, Gen.constant 0L; 8, Gen.choose (1, 5) |> Gen.map int64 ])
    }

/// Tensors as (name, dtype, shape, seed) with distinct names, and metadata.
let fileGen =
    gen {
        let! names = Gen.listOf nameGen |> Gen.map (List.distinct >> List.truncate 6)
        let! specs =
            names |> List.map (fun name ->
                gen {
                    let! dtype = Gen.elements DType.All
                    let! shape = shapeGen
                    let! seed = Gen.choose (0, Int32.MaxValue)
                    return name, dtype, shape, seed
                }) |> Gen.sequenceToList
        let! keys = Gen.listOf nameGen |> Gen.map (List.distinct >> List.truncate 3)
        let! values = Gen.listOfLength keys.Length nameGen
        return specs, Map.ofList (List.zip keys values)
    }

/// A small valid file with every kind of entry, used as the seed of corruption tests.
let sampleFile (dir: TempDir) =
    let path = dir.File "sample.safetensors"
    let tensors =
        [ "w", tensorOfBytes F32 [| 2L; 3L |] (randomBytes F32 [| 2L; 3L |] 1)
          "ids", tensorOfBytes I64 [| 2L |] (randomBytes I64 [| 2L |] 2)
          "scale", tensorOfBytes BF16 [||] (randomBytes BF16 [||] 3)
          "empty", tensorOfBytes U8 [| 0L; 4L |] [||]
          "mask", tensorOfBytes Bool [| 3L |] [| 1uy; 0uy; 1uy |] ]
    save path (Map.ofList [ "format", "pt"; "note", "é" ]) tensors
    for _, t in tensors do t.Dispose()
    path, File.ReadAllBytes path

/// Ways to corrupt a file: bytes of the header, the length field, or the header's JSON structure.
type Mutation =
    | SetByte of pos: int * value: byte
    | DeleteByte of pos: int
    | InsertByte of pos: int * value: byte
    | SetLength of uint64
    | SetField of entry: int * field: string * json: string
    | RemoveField of entry: int * field: string

let mutationGen =
    let jsonValues =
        [ "\"F32\""; "\"I64\""; "\"BOOL\""; "\"U16\""; "\"f32\""; "12"; "null"; "true"; "[]"; "[3]"; "[2,3]"; "[-1]"
          "[0,4]"; "[0,24]"; "[1.5]"; "[0]"; "[24,48]"; "[99999999999999999999]"; "{}"; "[\"2\"]"; "[0,0,0]" ]
    Gen.oneof [
        gen { let! p = Gen.choose (0, 400) in let! v = Gen.choose (0, 255) in return SetByte(p, byte v) }
        gen { let! p = Gen.choose (8, 400) in return DeleteByte p }
        gen { let! p = Gen.choose (8, 400) in let! v = Gen.elements [ 0x20; 0x7B; 0x7D; 0x22; 0x2C; 0x30; 0xC3; 0xFF ] in return InsertByte(p, byte v) }
        gen {
            let! l = Gen.oneof [ Gen.choose (0, 600) |> Gen.map uint64; Gen.elements [ UInt64.MaxValue; 1UL <<< 40; 100_000_001UL ] ]
            return SetLength l }
        gen {
            let! e = Gen.choose (0, 6)
            let! f = Gen.elements [ "dtype"; "shape"; "data_offsets"; "extra" ]
            let! v = Gen.elements jsonValues
            return SetField(e, f, v) }
        gen { let! e = Gen.choose (0, 6) in let! f = Gen.elements [ "dtype"; "shape"; "data_offsets" ] in return RemoveField(e, f) }
    ]

let applyMutation (bytes: byte[]) (m: Mutation) =
    let n = int (BitConverter.ToUInt64(bytes, 0) |> min (uint64 bytes.Length))
    let headerEnd = min bytes.Length (8 + n)
    let withHeader (node: JsonNode) =
        let h = Encoding.UTF8.GetBytes(node.ToJsonString())
        Array.concat [ BitConverter.GetBytes(uint64 h.Length); h; bytes[headerEnd..] ]
    let entryNode (e: int) =
        try
            let root = JsonNode.Parse(Encoding.UTF8.GetString(bytes, 8, n)).AsObject()
            let tensors = root |> Seq.filter (fun kv -> kv.Key <> "__metadata__") |> Array.ofSeq
            if tensors.Length = 0 then None else Some(root, tensors[e % tensors.Length].Value.AsObject())
        with _ -> None
    match m with
    | SetByte(p, v) -> let c = Array.copy bytes in (if p < headerEnd then c[p] <- v); c
    | DeleteByte p when p < headerEnd -> Array.append bytes[.. p - 1] bytes[p + 1 ..]
    | InsertByte(p, v) when p < headerEnd -> Array.concat [ bytes[.. p - 1]; [| v |]; bytes[p..] ]
    | DeleteByte _ | InsertByte _ -> bytes
    | SetLength l -> Array.append (BitConverter.GetBytes l) bytes[8..]
    | SetField(e, f, v) ->
        match entryNode e with
        | Some(root, o) -> o[f] <- JsonNode.Parse v; withHeader root
        | None -> bytes
    | RemoveField(e, f) ->
        match entryNode e with
        | Some(root, o) -> o.Remove f |> ignore; withHeader root
        | None -> bytes

let tests =
    testList "safetensors" [
        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 60 }
            "random tensors of every dtype and shape, and metadata, round-trip bit-exactly" <|
            Prop.forAll (Arb.fromGen fileGen) (fun (specs, metadata) ->
                use dir = new TempDir()
                let path = dir.File "t.safetensors"
                let originals = [ for name, dtype, shape, seed in specs -> name, dtype, shape, randomBytes dtype shape seed ]
                let tensors = [ for name, dtype, shape, bytes in originals -> name, tensorOfBytes dtype shape bytes ]
                save path metadata tensors
                for _, t in tensors do t.Dispose()
                let readMetadata, read = readAll path
                Expect.equal readMetadata metadata "metadata"
                Expect.equal (read |> List.map (fun (e, _) -> e.Name) |> set) (originals |> List.map (fun (n, _, _, _) -> n) |> set) "names"
                let byName = dict [ for e, b in read -> e.Name, (e, b) ]
                for name, dtype, shape, bytes in originals do
                    let e, b = byName[name]
                    Expect.equal e.DType dtype $"dtype of {name}"
                    Expect.equal e.Shape shape $"shape of {name}"
                    Expect.equal b bytes $"bytes of {name}"
                let loaded = load path torch.CPU
                try
                    for name, t in loaded do
                        let _, dtype, shape, bytes = originals |> List.find (fun (n, _, _, _) -> n = name)
                        Expect.equal t.dtype dtype.ScalarType "load gives the file's dtype"
                        Expect.equal t.shape shape "load gives the file's shape"
                        Expect.equal (bytesOf t) bytes "load gives the file's bytes"
                finally
                    for _, t in loaded do t.Dispose())

        test "a written file has the layout of the format, checked by an independent parser" {
            use dir = new TempDir()
            let path = dir.File "layout.safetensors"
            let f32 = [| 1.5f; -2.0f; 3.25f; Single.NaN; Single.NegativeInfinity; -0.0f |]
            let i64 = [| 7L; -1L; Int64.MaxValue |]
            use a = torch.tensor(f32).reshape(2L, 3L)
            use b = torch.tensor(i64)
            use c = torch.tensor([| 1.0f; -2.5f; 3.140625f |]).to_type(torch.ScalarType.BFloat16)
            use d = torch.tensor([| true; false |])
            use a2 = b.to_type(torch.ScalarType.Float32)
            save path (Map.ofList [ "format", "pt" ]) [ "b.f32", a; "a.f32", a2; "i64", b; "bf", c; "mask", d ]
            let bytes = File.ReadAllBytes path
            let n, header, tensors, metadata, start = Independent.parse bytes
            Expect.equal (n % 8L) 0L "header length is a multiple of 8"
            Expect.equal (header.TrimEnd ' ' |> Seq.last) '}' "the header is JSON padded with spaces"
            Expect.isTrue (header.StartsWith "{\"__metadata__\":{\"format\":\"pt\"}") "compact JSON, metadata first"
            Expect.equal metadata (Map.ofList [ "format", "pt" ]) "metadata"
            Expect.equal [ for t in tensors -> t.Name ] [ "i64"; "a.f32"; "b.f32"; "bf"; "mask" ] "wider dtypes first, then by name"
            let mutable cursor = 0L
            for t in tensors do
                Expect.equal t.Begin cursor $"{t.Name} starts where the previous tensor ends"
                cursor <- t.End
            Expect.equal (start + cursor) (int64 bytes.Length) "the data section ends with the last tensor"
            let find name = tensors |> List.find (fun t -> t.Name = name)
            Expect.equal (find "b.f32").Shape [| 2L; 3L |] "shape"
            Expect.equal (find "b.f32").DType "F32" "dtype name"
            Expect.equal (Independent.data bytes (find "b.f32")) (MemoryMarshal.AsBytes(ReadOnlySpan f32).ToArray()) "F32 bytes, row-major"
            Expect.equal (Independent.data bytes (find "i64")) (MemoryMarshal.AsBytes(ReadOnlySpan i64).ToArray()) "I64 bytes"
            Expect.equal (find "bf").DType "BF16" "BF16 name"
            Expect.equal (Independent.data bytes (find "bf")) [| 0x80uy; 0x3Fuy; 0x20uy; 0xC0uy; 0x49uy; 0x40uy |] "BF16 of 1, -2.5, 3.140625"
            Expect.equal (find "mask").DType "BOOL" "BOOL name"
            Expect.equal (Independent.data bytes (find "mask")) [| 1uy; 0uy |] "BOOL bytes"
        }

        test "non-contiguous, grad-requiring and scalar tensors are written in row-major order" {
            use dir = new TempDir()
            let path = dir.File "views.safetensors"
            use m = torch.arange(6L, dtype = torch.ScalarType.Float32).reshape(2L, 3L)
            use mt = m.t()
            use g = torch.ones([| 2L |], requires_grad = true)
            use s = torch.tensor(4.5)
            save path Map.empty [ "mt", mt; "g", g; "s", s ]
            use r = Reader.Open path
            use back = r.Tensor "mt"
            Expect.equal back.shape [| 3L; 2L |] "transposed shape"
            Expect.equal (back.data<float32>().ToArray()) [| 0.0f; 3.0f; 1.0f; 4.0f; 2.0f; 5.0f |] "transposed values, row-major"
            use sb = r.Tensor "s"
            Expect.equal sb.shape [||] "0-d scalar"
            Expect.equal (sb.item<float>()) 4.5 "scalar value"
            use gb = r.Tensor "g"
            Expect.equal (gb.data<float32>().ToArray()) [| 1.0f; 1.0f |] "a grad-requiring tensor's values"
            Expect.isFalse gb.requires_grad "read tensors do not require grad"
        }

        test "reads the GPT-2 fixture, agreeing with an independent decode" {
            let path = fixture "hf-gpt2-tiny/model.safetensors"
            let bytes = File.ReadAllBytes path
            let _, _, tensors, metadata, start = Independent.parse bytes
            use r = Reader.Open path
            Expect.equal r.Metadata metadata "metadata"
            Expect.equal r.Metadata.["format"] "pt" "HF writes format=pt"
            Expect.equal [ for e in r.Entries -> e.Name, e.DType.Name, e.Shape, e.Start, e.End ]
                         [ for t in tensors -> t.Name, t.DType, t.Shape, t.Begin, t.End ] "entries in header order"
            Expect.equal (r.Info "transformer.wte.weight").Shape [| 512L; 64L |] "token embedding"
            Expect.equal (r.Info "transformer.h.1.attn.c_attn.weight").Shape [| 64L; 192L |] "Conv1D weights are [in, out]"
            use wte = r.Tensor "transformer.wte.weight"
            let e = r.Info "transformer.wte.weight"
            use br = new BinaryReader(new MemoryStream(bytes))
            for (i, j) in [ 0, 0; 3, 17; 511, 63 ] do
                br.BaseStream.Position <- start + e.Start + int64 (i * 64 + j) * 4L
                let expected = br.ReadSingle()
                Expect.equal (wte[int64 i, int64 j].item<float32>()) expected $"wte[{i},{j}]"
            Expect.isTrue (wte.abs().max().item<float32>() < 10.0f) "initialised weights are small"
        }

        test "reads the expected-activations fixture: I64 ids and F32 activations" {
            let path = fixture "hf-gpt2-tiny/expected.safetensors"
            let bytes = File.ReadAllBytes path
            let _, _, tensors, _, start = Independent.parse bytes
            let loaded = load path torch.CPU
            try
                Expect.equal [ for n, _ in loaded -> n ] [ for t in tensors -> t.Name ] "names in header order"
                let get name = loaded |> List.find (fun (n, _) -> n = name) |> snd
                let ids = get "input_ids"
                Expect.equal ids.dtype torch.ScalarType.Int64 "ids are I64"
                Expect.equal ids.shape [| 2L; 16L |] "ids shape"
                let raw = tensors |> List.find (fun t -> t.Name = "input_ids")
                let rawIds = Array.init 32 (fun k -> BitConverter.ToInt64(bytes, int (start + raw.Begin) + 8 * k))
                Expect.equal (ids.data<int64>().ToArray()) rawIds "ids match the raw bytes"
                Expect.isTrue (rawIds |> Array.forall (fun x -> x >= 0L && x < 512L)) "ids are in the vocabulary"
                let logits = get "logits"
                Expect.equal logits.shape [| 2L; 16L; 512L |] "logits shape"
                let rawL = tensors |> List.find (fun t -> t.Name = "logits")
                Expect.equal (logits[1L, 15L, 511L].item<float32>()) (BitConverter.ToSingle(bytes, int (start + rawL.End) - 4)) "last logit"
            finally
                for _, t in loaded do t.Dispose()
        }

        test "re-saving Hugging Face files reproduces them byte for byte" {
            use dir = new TempDir()
            for name in [ "hf-gpt2-tiny/model.safetensors"; "hf-gpt2-tiny/expected.safetensors"; "hf-llama-tiny/model.safetensors" ] do
                let original = fixture name
                let metadata = (use r = Reader.Open original in r.Metadata)
                let tensors = load original torch.CPU
                let copy = dir.File "copy.safetensors"
                save copy metadata tensors
                for _, t in tensors do t.Dispose()
                Expect.equal (File.ReadAllBytes copy) (File.ReadAllBytes original) $"{name} re-saved"
        }

        test "reading does not depend on the order of header keys or data" {
            use dir = new TempDir()
            let path = dir.File "order.safetensors"
            let data = Array.concat [ BitConverter.GetBytes 7; BitConverter.GetBytes -8; BitConverter.GetBytes 1.5f; BitConverter.GetBytes -0.25f ]
            File.WriteAllBytes(path, rawFile "{\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]},\"__metadata__\":{\"k\":\"v\"},\"a\":{\"dtype\":\"I32\",\"shape\":[2],\"data_offsets\":[0,8]}}" data)
            use r = Reader.Open path
            Expect.equal [ for e in r.Entries -> e.Name ] [ "b"; "a" ] "entries in the header's key order"
            use a = r.Tensor "a"
            use b = r.Tensor "b"
            Expect.equal (a.data<int>().ToArray()) [| 7; -8 |] "a, stored first"
            Expect.equal (b.data<float32>().ToArray()) [| 1.5f; -0.25f |] "b, stored second"
            Expect.equal r.Metadata (Map.ofList [ "k", "v" ]) "metadata between entries"
        }

        test "BF16 and F16 convert on request and keep their bits otherwise" {
            use dir = new TempDir()
            let path = dir.File "half.safetensors"
            use x = torch.tensor([| 1.0f; -2.5f; 65504.0f; 1e-3f |])
            use bf = x.to_type(torch.ScalarType.BFloat16)
            use h = x.to_type(torch.ScalarType.Float16)
            save path Map.empty [ "bf", bf; "h", h ]
            use r = Reader.Open path
            use bf2 = r.Tensor "bf"
            use h2 = r.Tensor "h"
            Expect.equal (bytesOf bf2) (bytesOf bf) "BF16 bits"
            Expect.equal (bytesOf h2) (bytesOf h) "F16 bits"
            use asF32 = r.TensorAs("h", torch.ScalarType.Float32)
            use expected = h.to_type(torch.ScalarType.Float32)
            Expect.equal asF32.dtype torch.ScalarType.Float32 "converted dtype"
            Expect.isTrue (asF32.eq(expected).all().item<bool>()) "converted values"
        }

        test "reads onto the run's device" {
            let device = if torch.cuda.is_available () then torch.CUDA else torch.CPU
            use dir = new TempDir()
            let path = dir.File "device.safetensors"
            use x = torch.randn([| 3L; 4L |], device = device)
            save path Map.empty [ "x", x ]
            use r = Reader.Open path
            use y = r.Tensor("x", device)
            Expect.equal y.device_type device.``type`` "on the requested device"
            Expect.isTrue (x.eq(y).all().item<bool>()) "same values"
        }

        test "every truncation of a valid file is refused with a SafetensorsError" {
            use dir = new TempDir()
            let _, bytes = sampleFile dir
            let path = dir.File "cut.safetensors"
            for length in 0 .. bytes.Length - 1 do
                File.WriteAllBytes(path, bytes[.. length - 1])
                expectError path "" (fun () -> readAll path |> ignore)
            File.WriteAllBytes(path, bytes)
            Expect.equal (readAll path |> snd |> List.length) 5 "the whole file reads"
        }

        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 400 }
            "corrupted headers are refused with a SafetensorsError or read back as the file says" <|
            Prop.forAll (Arb.fromGen (Gen.listOf mutationGen |> Gen.map (List.truncate 3))) (fun mutations ->
                use dir = new TempDir()
                let _, valid = sampleFile dir
                let bytes = mutations |> List.fold applyMutation valid
                let path = dir.File "mutant.safetensors"
                File.WriteAllBytes(path, bytes)
                try
                    let metadata, read = readAll path
                    // Accepted: what we read must be what the file says, by the independent parser.
                    let _, _, tensors, indMetadata, _ = Independent.parse bytes
                    Expect.equal metadata indMetadata "metadata as in the file"
                    Expect.equal [ for e, _ in read -> e.Name, e.DType.Name, e.Shape, e.Start, e.End ]
                                 [ for t in tensors -> t.Name, t.DType, t.Shape, t.Begin, t.End ] "entries as in the file"
                    for (e, b), t in List.zip read tensors do
                        Expect.equal b (Independent.data bytes t) $"bytes of {e.Name}"
                with SafetensorsError(p, _) -> Expect.equal p path "the error names the file")

        testList "each validation rule gives a clear error" [
            let case name keyword (bytes: byte[]) =
                test name {
                    use dir = new TempDir()
                    let path = dir.File "bad.safetensors"
                    File.WriteAllBytes(path, bytes)
                    expectError path keyword (fun () -> readAll path |> ignore)
                }
            let entry = "\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}"
            let eight = Array.zeroCreate<byte> 8
            test "the baseline of these cases is valid" {
                use dir = new TempDir()
                let path = dir.File "ok.safetensors"
                File.WriteAllBytes(path, rawFile ("{" + entry + "}") eight)
                Expect.equal (readAll path |> snd |> List.map (fun (e, _) -> e.Name)) [ "x" ] "one tensor"
            }
            case "file shorter than 8 bytes" "fewer than the 8" [| 1uy; 0uy; 0uy |]
            case "header length over the limit" "exceeds the limit" (Array.append (BitConverter.GetBytes 200_000_000UL) (Encoding.ASCII.GetBytes "{}"))
            case "header length past the end of the file" "past the end of the file" (Array.append (BitConverter.GetBytes 50UL) (Encoding.ASCII.GetBytes "{}"))
            let notUtf8 = Array.concat [ "{\"x"B; [| 0xFFuy |]; "\":{}}"B ]
            case "header not UTF-8" "UTF-8" (Array.append (BitConverter.GetBytes(uint64 notUtf8.Length)) notUtf8)
            case "header not JSON" "not valid JSON" (rawFile "{\"x\": nope}" [||])
            case "header not an object" "not an object" (rawFile "[1, 2]" [||])
            case "entry not an object" "not a JSON object" (rawFile "{\"x\": 3}" [||])
            case "missing dtype" "no 'dtype'" (rawFile "{\"x\":{\"shape\":[2],\"data_offsets\":[0,8]}}" eight)
            case "missing shape" "no 'shape'" (rawFile "{\"x\":{\"dtype\":\"F32\",\"data_offsets\":[0,8]}}" eight)
            case "missing data_offsets" "no 'data_offsets'" (rawFile "{\"x\":{\"dtype\":\"F32\",\"shape\":[2]}}" eight)
            case "dtype not a string" "not a string" (rawFile "{\"x\":{\"dtype\":4,\"shape\":[2],\"data_offsets\":[0,8]}}" eight)
            case "shape not an array" "not an array" (rawFile "{\"x\":{\"dtype\":\"F32\",\"shape\":2,\"data_offsets\":[0,8]}}" eight)
            case "shape with a string" "not a number" (rawFile "{\"x\":{\"dtype\":\"F32\",\"shape\":[\"2\"],\"data_offsets\":[0,8]}}" eight)
            case "shape with a fraction" "not an integer" (rawFile "{\"x\":{\"dtype\":\"F32\",\"shape\":[2.5],\"data_offsets\":[0,8]}}" eight)
            case "unknown dtype" "unsupported dtype 'F8_E4M3'" (rawFile "{\"x\":{\"dtype\":\"F8_E4M3\",\"shape\":[8],\"data_offsets\":[0,8]}}" eight)
            case "negative dimension" "negative" (rawFile "{\"x\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}" eight)
            case "three offsets" "not 2" (rawFile "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8,8]}}" eight)
            case "begin after end" "begin after they end" (rawFile "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}" eight)
            case "end past the data" "run past the data section" (rawFile "{\"x\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}" eight)
            case "shape disagrees with the byte length" "byte length" (rawFile "{\"x\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}" eight)
            case "byte length overflows" "byte length" (rawFile "{\"x\":{\"dtype\":\"F32\",\"shape\":[4611686018427387904],\"data_offsets\":[0,8]}}" eight)
            case "element count overflows" "too large" (rawFile "{\"x\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,8]}}" eight)
            case "overlapping tensors" "overlaps" (rawFile ("{" + entry + ",\"y\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}") eight)
            case "gap between tensors" "gap of 4 bytes" (rawFile "{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}" eight)
            case "bytes after the last tensor" "after the last tensor" (rawFile ("{" + entry + "}") (Array.zeroCreate 12))
            case "metadata not an object" "__metadata__ is not" (rawFile ("{\"__metadata__\":[1]," + entry + "}") eight)
            case "metadata value not a string" "not a string" (rawFile ("{\"__metadata__\":{\"k\":1}," + entry + "}") eight)
            case "duplicate tensor names" "key 'x' twice" (rawFile ("{" + entry + "," + entry + "}") eight)
            case "duplicate field in an entry" "key 'dtype' twice" (rawFile "{\"x\":{\"dtype\":\"F32\",\"dtype\":\"I32\",\"shape\":[2],\"data_offsets\":[0,8]}}" eight)
            case "duplicate metadata key" "key 'k' twice" (rawFile ("{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}," + entry + "}") eight)
            case "BOOL byte other than 0 and 1" "BOOL" (rawFile "{\"b\":{\"dtype\":\"BOOL\",\"shape\":[2],\"data_offsets\":[0,2]}}" [| 1uy; 2uy |])
            case "zero-size shape whose strides overflow" "too large" (rawFile "{\"z\":{\"dtype\":\"F64\",\"shape\":[0,4294967296,4294967296,4294967296],\"data_offsets\":[0,0]}}" [||])
            test "a missing file" {
                use dir = new TempDir()
                let path = dir.File "absent.safetensors"
                expectError path "no such file" (fun () -> Reader.Open path |> ignore)
            }
            test "an unknown tensor name" {
                use dir = new TempDir()
                let path = dir.File "ok.safetensors"
                File.WriteAllBytes(path, rawFile ("{" + entry + "}") eight)
                use r = Reader.Open path
                expectError path "no tensor named 'y'" (fun () -> r.Tensor "y" |> ignore)
                Expect.isFalse (r.Contains "y") "Contains agrees"
            }
        ]

        testList "saving" [
            test "a save that fails midway leaves the existing file unchanged" {
                use dir = new TempDir()
                let path, before = sampleFile dir
                use ok = torch.ones([| 4L |])
                expectError path "cannot store" (fun () ->
                    use c = torch.complex(torch.ones(2L), torch.zeros(2L))
                    save path Map.empty [ "ok", ok; "c", c ])
                let mutable produced = 0
                Expect.throwsT<InvalidOperationException> (fun () ->
                    saveStreaming path Map.empty [ "a", F32, [| 1000L |]; "b", F32, [| 4L |] ] (fun name ->
                        produced <- produced + 1
                        if name = "b" then raise (InvalidOperationException "producer failed")
                        torch.zeros([| 1000L |]))) "the producer's exception comes through"
                Expect.equal produced 2 "the first tensor was written before the failure"
                expectError path "declared" (fun () ->
                    saveStreaming path Map.empty [ "a", F32, [| 3L |] ] (fun _ -> torch.zeros([| 4L |])))
                Expect.equal (File.ReadAllBytes path) before "the file is unchanged"
                Expect.equal (Directory.GetFiles dir.Path |> Array.map Path.GetFileName) [| "sample.safetensors" |] "no temporary file is left"
            }
            test "invalid tensor names are refused" {
                use dir = new TempDir()
                let path = dir.File "names.safetensors"
                use t = torch.ones([| 1L |])
                expectError path "two tensors are named 'a'" (fun () -> save path Map.empty [ "a", t; "a", t ])
                expectError path "reserved" (fun () -> save path Map.empty [ "__metadata__", t ])
                expectError path "not valid Unicode" (fun () -> save path Map.empty [ string (char 0xD800), t ])
                Expect.isFalse (File.Exists path) "nothing was written"
            }
            test "streaming writes the declared tensors in file order and disposes them" {
                use dir = new TempDir()
                let path = dir.File "stream.safetensors"
                let made = ResizeArray<torch.Tensor>()
                saveStreaming path (Map.ofList [ "k", "v" ]) [ "small", I8, [| 3L |]; "big", I64, [| 2L |] ] (fun name ->
                    let t = if name = "big" then torch.tensor([| 5L; 6L |]) else torch.tensor([| 1y; 2y; 3y |])
                    made.Add t
                    t)
                Expect.isTrue (made |> Seq.forall (fun t -> t.IsInvalid)) "produced tensors are disposed"
                use r = Reader.Open path
                Expect.equal [ for e in r.Entries -> e.Name ] [ "big"; "small" ] "I64 before I8"
                use big = r.Tensor "big"
                Expect.equal (big.data<int64>().ToArray()) [| 5L; 6L |] "values"
                Expect.equal r.Metadata (Map.ofList [ "k", "v" ]) "metadata"
            }
            test "a file with no tensors" {
                use dir = new TempDir()
                let path = dir.File "empty.safetensors"
                save path Map.empty []
                Expect.equal (File.ReadAllBytes path) (rawFile "{}      " [||]) "an empty object padded to 8"
                Expect.isEmpty (load path torch.CPU) "no tensors"
            }
        ]

        test "a disposed reader does not keep the file locked" {
            use dir = new TempDir()
            let path, _ = sampleFile dir
            do
                use r = Reader.Open path
                use w = r.Tensor "w"
                Expect.equal w.shape [| 2L; 3L |] "read while open"
            File.Delete path
            Expect.isFalse (File.Exists path) "deleted after Dispose"
            use t = torch.tensor([| 7.0f; 7.0f |])
            save path Map.empty [ "t", t ]
            use r = Reader.Open path
            use back = r.Tensor "t"
            Expect.equal (back.data<float32>().ToArray()) [| 7.0f; 7.0f |] "the new file reads"
            (r :> IDisposable).Dispose()
            save path Map.empty [ "t", t ]
            Expect.throwsT<ObjectDisposedException> (fun () -> r.Tensor "t" |> ignore) "a disposed reader refuses reads"
        }
    ]

/// Where the shipped data is found (`Paths`), from hosts outside the checkout too.
let pathsTests =
    testList "data folder" [
        test "found beside the library when neither the host's folder nor the current one leads to it (dotnet fsi elsewhere)" {
            use host = new TempDir() // stands for dotnet fsi's own folder and a current folder outside the checkout
            use lib = new TempDir() // stands for the library's build folder
            Directory.CreateDirectory(Path.Combine(lib.Path, "data")) |> ignore
            Expect.equal (Paths.locateData host.Path (Some lib.Path) host.Path) (Some(Path.Combine(lib.Path, "data"))) "beside the library"
            Expect.equal (Paths.locateData host.Path None host.Path) None "nowhere to be found"
            Directory.CreateDirectory(Path.Combine(host.Path, "data")) |> ignore
            Expect.equal (Paths.locateData host.Path (Some lib.Path) host.Path) (Some(Path.Combine(host.Path, "data"))) "beside the host first, as before"
            let libDir = (Paths.libraryDir ()).Value
            Expect.isTrue (File.Exists(Path.Combine(libDir, "Transcoders.dll"))) "libraryDir is the folder of Transcoders.dll"
            Expect.isTrue (Directory.Exists(Path.Combine(libDir, "data"))) "the build copies data/ beside the library"
            use elsewhere = new TempDir()
            Expect.equal (Paths.locateData elsewhere.Path (Some libDir) elsewhere.Path) (Some(Path.Combine(libDir, "data"))) "found from outside the checkout"
        }
    ]
