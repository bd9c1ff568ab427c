/// Model checkpoints: our format's round trip, Hugging Face shards and errors, llama2.c files (untied,
/// corrupt), detection and inspection.
module Transcoders.Tests.ModelFileTests

open System
open System.IO
open System.Text.Json
open System.Text.Json.Nodes
open Expecto
open TorchSharp
open Transcoders.Files
open Transcoders.Models
open Transcoders.Tests.Fixtures

let private json (text: string) = JsonDocument.Parse(text).RootElement.Clone()

let private sameJson (a: JsonElement) (b: JsonElement) =
    JsonNode.DeepEquals(JsonNode.Parse(a.GetRawText()), JsonNode.Parse(b.GetRawText()))

/// Edits a JSON file in place.
let private editJson (path: string) (edit: JsonObject -> unit) =
    let node = JsonNode.Parse(File.ReadAllText path).AsObject()
    edit node
    File.WriteAllText(path, node.ToJsonString())

let private copyFolder (source: string) (target: string) =
    Directory.CreateDirectory target |> ignore
    for f in Directory.GetFiles source do File.Copy(f, Path.Combine(target, Path.GetFileName f))

let private throwsCheckpoint (f: unit -> 'a) (fragments: string list) =
    let ex = Expect.throwsC (fun () -> f () |> ignore) id
    Expect.isTrue (ex :? CheckpointError) (sprintf "a CheckpointError, got %s: %s" (ex.GetType().Name) ex.Message)
    for fragment in fragments do Expect.stringContains ex.Message fragment fragment

/// Writes a llama2.c legacy checkpoint of a Llama-like model of ours (from the format's description).
let private writeLlama2c (path: string) (m: Transformer) =
    let c = m.Config
    let p name = m.get_parameter name :> torch.Tensor
    use f = File.Create path
    use w = new BinaryWriter(f)
    for v in [ c.DModel; c.DMlp; c.NLayers; c.NHeads; c.NKvHeads; (if c.TiedUnembed then c.VocabSize else -c.VocabSize); c.NCtx ] do w.Write(v: int)
    let floats (t: torch.Tensor) = for x in t.contiguous().data<float32>().ToArray() do w.Write(x: float32)
    let layers name = for l in 0 .. c.NLayers - 1 do floats (p (sprintf "blocks.%d.%s" l name))
    floats (p "embed.weight")
    for name in [ "ln1.weight"; "attn.q.weight"; "attn.k.weight"; "attn.v.weight"; "attn.o.weight"; "ln2.weight"
                  "mlp.fc_gate.weight"; "mlp.fc_out.weight"; "mlp.fc_in.weight" ] do layers name
    floats (p "ln_final.weight")
    let hd = TransformerConfig.dHead c
    for _ in 1 .. 2 * c.NCtx * hd / 2 do w.Write(nanf) // the RoPE tables, which must be skipped
    if not c.TiedUnembed then floats (p "unembed.weight")

let ownFormatTests =
    testList "own format" [
        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 12 } "save → load gives identical config, parameters, logits and metadata"
        <| fun (seed: int) (kindIndex: uint8) ->
            let c = randomConfig seed kinds.[int kindIndex % 3]
            use m = randomModel seed c
            use dir = new TempDir()
            let meta =
                { Checkpoint.Metadata.Tokenizer = Some (json """{"kind":"gpt2","files":["encoder.json","vocab.bpe"],"eot":50256}""")
                  Checkpoint.Metadata.Training = Some (json (sprintf """{"steps":%d,"loss":1.25,"data":"tinystories"}""" (abs seed))) }
            Checkpoint.save dir.Path meta m
            let loaded, meta2 = Checkpoint.load dir.Path cpu
            use loaded = loaded
            Expect.equal loaded.Config c "config"
            let a, b = Transformer.parameters m, Transformer.parameters loaded
            Expect.sequenceEqual (List.map fst b) (List.map fst a) "parameter names"
            for (name, x), (_, y) in List.zip a b do Expect.isTrue (identical x y) (sprintf "%s bit-identical" name)
            use tokens = randomTokens seed c.VocabSize 2 (min c.NCtx 5)
            use l1 = Transformer.forward m tokens
            use l2 = Transformer.forward loaded tokens
            Expect.isTrue (identical l1 l2) "identical logits"
            Expect.isTrue (sameJson meta2.Tokenizer.Value meta.Tokenizer.Value) "tokenizer metadata"
            Expect.isTrue (sameJson meta2.Training.Value meta.Training.Value) "training metadata"
            Expect.isEmpty (Directory.GetFiles(dir.Path, "*.tmp")) "no temporary files left"

        testCase "the saved files are what the docs say: safetensors under our names, a complete config.json" <| fun () ->
            let c = randomConfig 3 LlamaLike
            use m = randomModel 3 c
            use dir = new TempDir()
            Checkpoint.save dir.Path Checkpoint.Metadata.Empty m
            use r = Safetensors.Reader.Open(Checkpoint.weightsPath dir.Path)
            Expect.sequenceEqual (r.Entries |> List.map (fun e -> e.Name) |> Set.ofList) (Transformer.parameters m |> List.map fst |> Set.ofList) "tensor names"
            Expect.equal (r.Metadata.TryFind "format") (Some Checkpoint.FormatName) "format in metadata"
            use doc = JsonDocument.Parse(File.ReadAllText(Checkpoint.configPath dir.Path))
            let config = doc.RootElement.GetProperty "config"
            Expect.equal (doc.RootElement.GetProperty("format").GetString()) "transcoders.transformer" "format"
            Expect.equal (config.GetProperty("normalization").GetString()) "rmsnorm" "normalization"
            Expect.equal (config.GetProperty("positions").GetProperty("kind").GetString()) "rotary" "positions"
            Expect.isFalse (doc.RootElement.TryGetProperty "tokenizer" |> fst) "no tokenizer when none was given"
            // saving again over the same folder replaces it
            Checkpoint.save dir.Path Checkpoint.Metadata.Empty m
            Expect.isEmpty (Directory.GetFiles(dir.Path, "*.tmp")) "no temporary files left"

        testCase "bad config.json files fail clearly, naming the field" <| fun () ->
            let c = randomConfig 5 GptLike
            use m = randomModel 5 c
            use dir = new TempDir()
            let fresh () =
                Checkpoint.save dir.Path Checkpoint.Metadata.Empty m
                Checkpoint.configPath dir.Path
            let config (o: JsonObject) = o.["config"].AsObject()
            editJson (fresh ()) (fun o -> (config o).Remove "n_heads" |> ignore)
            throwsCheckpoint (fun () -> Checkpoint.load dir.Path cpu) [ "config.json"; "'config.n_heads' is missing" ]
            editJson (fresh ()) (fun o -> (config o).["normalization"] <- JsonValue.Create "batchnorm")
            throwsCheckpoint (fun () -> Checkpoint.load dir.Path cpu) [ "'config.normalization' is 'batchnorm'"; "'layernorm'" ]
            editJson (fresh ()) (fun o -> (config o).["architecture"] <- JsonValue.Create "mamba")
            throwsCheckpoint (fun () -> Checkpoint.load dir.Path cpu) [ "'mamba'" ]
            editJson (fresh ()) (fun o -> (config o).["positions"].AsObject().["kind"] <- JsonValue.Create "alibi")
            throwsCheckpoint (fun () -> Checkpoint.load dir.Path cpu) [ "'config.positions.kind' is 'alibi'" ]
            editJson (fresh ()) (fun o -> (config o).["d_model"] <- JsonValue.Create 2.5)
            throwsCheckpoint (fun () -> Checkpoint.load dir.Path cpu) [ "'config.d_model' must be an integer" ]
            editJson (fresh ()) (fun o -> (config o).["n_kv_heads"] <- JsonValue.Create (c.NHeads + 1))
            throwsCheckpoint (fun () -> Checkpoint.load dir.Path cpu) [ "invalid model configuration" ]
            editJson (fresh ()) (fun o -> (config o).["d_mlp"] <- JsonValue.Create (c.DMlp + 1))
            throwsCheckpoint (fun () -> Checkpoint.load dir.Path cpu) [ "model.safetensors"; "tensor for 'blocks.0.mlp."; sprintf "has shape [%d]" c.DMlp; sprintf "the model expects [%d]" (c.DMlp + 1) ]
            editJson (fresh ()) (fun o -> o.["format_version"] <- JsonValue.Create 99)
            throwsCheckpoint (fun () -> Checkpoint.load dir.Path cpu) [ "format_version 99" ]
            editJson (fresh ()) (fun o -> o.Remove "format" |> ignore)
            throwsCheckpoint (fun () -> Checkpoint.load dir.Path cpu) [ "no \"format\" field" ]
            File.WriteAllText(fresh (), "{ not json")
            throwsCheckpoint (fun () -> Checkpoint.load dir.Path cpu) [ "not valid JSON" ]
            fresh () |> ignore
            File.Delete(Checkpoint.weightsPath dir.Path)
            throwsCheckpoint (fun () -> Checkpoint.load dir.Path cpu) [ "model.safetensors"; "not found" ]
            throwsCheckpoint (fun () -> Checkpoint.load (fixture "hf-gpt2-tiny") cpu) [ "Hugging Face" ]

        testCase "a weights file missing a parameter or holding an extra one is refused" <| fun () ->
            let c = randomConfig 6 GptLike
            use m = randomModel 6 c
            use dir = new TempDir()
            Checkpoint.save dir.Path Checkpoint.Metadata.Empty m
            let all = Safetensors.load (Checkpoint.weightsPath dir.Path) cpu
            Safetensors.save (Checkpoint.weightsPath dir.Path) Map.empty (all |> List.filter (fun (n, _) -> n <> "blocks.0.ln1.bias"))
            throwsCheckpoint (fun () -> Checkpoint.load dir.Path cpu) [ "no tensor for parameter(s) blocks.0.ln1.bias" ]
            use extra = torch.zeros(3L)
            Safetensors.save (Checkpoint.weightsPath dir.Path) Map.empty (all @ [ "blocks.0.mystery", extra ])
            throwsCheckpoint (fun () -> Checkpoint.load dir.Path cpu) [ "unexpected tensor 'blocks.0.mystery'" ]
            for _, t in all do t.Dispose()
    ]

let huggingFaceTests =
    testList "Hugging Face files" [
        testCase "sharded weights (model.safetensors.index.json) load like a single file" <| fun () ->
            use dir = new TempDir()
            let source = fixture "hf-gpt2-tiny"
            File.Copy(Path.Combine(source, "config.json"), dir.File "config.json")
            let all = Safetensors.load (Path.Combine(source, "model.safetensors")) cpu
            let first, second = all |> List.splitAt (all.Length / 2)
            Safetensors.save (dir.File "model-00001-of-00002.safetensors") Map.empty first
            Safetensors.save (dir.File "model-00002-of-00002.safetensors") Map.empty second
            let index = JsonObject()
            let map = JsonObject()
            for n, _ in first do map.[n] <- JsonValue.Create "model-00001-of-00002.safetensors"
            for n, _ in second do map.[n] <- JsonValue.Create "model-00002-of-00002.safetensors"
            index.["metadata"] <- JsonObject()
            index.["weight_map"] <- map
            File.WriteAllText(dir.File "model.safetensors.index.json", index.ToJsonString())
            for _, t in all do t.Dispose()
            use a = HuggingFace.load source cpu
            use b = HuggingFace.load dir.Path cpu
            use tokens = randomTokens 1 512 1 10
            use la = Transformer.forward a tokens
            use lb = Transformer.forward b tokens
            Expect.isTrue (identical la lb) "same logits"

        testCase "unsupported architectures and options fail clearly" <| fun () ->
            use dir = new TempDir()
            copyFolder (fixture "hf-gpt2-tiny") dir.Path
            let config = dir.File "config.json"
            editJson config (fun o -> o.["architectures"] <- JsonArray(JsonValue.Create "BertForMaskedLM"))
            throwsCheckpoint (fun () -> HuggingFace.load dir.Path cpu) [ "unsupported architecture 'BertForMaskedLM'"; "GPT2LMHeadModel" ]
            throwsCheckpoint (fun () -> ModelFiles.inspect dir.Path) [ "BertForMaskedLM" ]
            editJson config (fun o -> o.Remove "architectures" |> ignore; o.["model_type"] <- JsonValue.Create "bert")
            throwsCheckpoint (fun () -> HuggingFace.load dir.Path cpu) [ "unsupported model_type 'bert'" ]
            editJson config (fun o -> o.["model_type"] <- JsonValue.Create "gpt2"; o.["activation_function"] <- JsonValue.Create "quick_gelu")
            throwsCheckpoint (fun () -> HuggingFace.load dir.Path cpu) [ "'activation_function' is 'quick_gelu'" ]
            editJson config (fun o -> o.["activation_function"] <- JsonValue.Create "gelu_new"; o.["n_embd"] <- JsonValue.Create 66)
            throwsCheckpoint (fun () -> HuggingFace.load dir.Path cpu) [ "d_model 66 is not divisible by n_heads 4" ]
            editJson config (fun o -> o.["n_embd"] <- JsonValue.Create 64; o.["n_layer"] <- JsonValue.Create 3)
            throwsCheckpoint (fun () -> HuggingFace.load dir.Path cpu) [ "'transformer.h.2.ln_1.weight' is missing" ]
            editJson config (fun o -> o.["n_layer"] <- JsonValue.Create 1)
            throwsCheckpoint (fun () -> HuggingFace.load dir.Path cpu) [ "unexpected tensors"; "transformer.h.1." ]
            use llama = new TempDir()
            copyFolder (fixture "hf-llama-tiny") llama.Path
            editJson (llama.File "config.json") (fun o -> o.["rope_parameters"].AsObject().["rope_type"] <- JsonValue.Create "llama3")
            throwsCheckpoint (fun () -> HuggingFace.load llama.Path cpu) [ "'rope_parameters.rope_type' is 'llama3'" ]
            editJson (llama.File "config.json") (fun o -> o.["rope_parameters"].AsObject().["rope_type"] <- JsonValue.Create "default")
            File.Delete(llama.File "model.safetensors")
            throwsCheckpoint (fun () -> HuggingFace.load llama.Path cpu) [ "no model.safetensors" ]
    ]

let llama2cTests =
    testList "llama2.c files" [
        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 8 } "a file written from the format description loads back to the same model (tied and untied)"
        <| fun (seed: int) (tied: bool) ->
            let c = { randomConfig seed LlamaLike with Positions = Rotary (Interleaved, 10000.0); NormEps = 1e-5; DHead = None; TiedUnembed = tied; InitRange = 0.02; Dropout = 0.0 }
            let c = { c with DModel = c.NHeads * 4 }
            use m = randomModel seed c
            use dir = new TempDir()
            writeLlama2c (dir.File "model.bin") m
            use loaded = Llama2c.load (dir.File "model.bin") cpu
            Expect.equal loaded.Config c "config"
            for (name, x), (_, y) in List.zip (Transformer.parameters m) (Transformer.parameters loaded) do
                Expect.isTrue (identical x y) name
            Expect.equal (ModelFiles.detect (dir.File "model.bin")) ModelFiles.Llama2c "detected"

        testCase "truncated, padded, garbage and versioned files fail clearly" <| fun () ->
            use dir = new TempDir()
            let bytes = File.ReadAllBytes stories260K
            let write name (b: byte[]) =
                let path = dir.File name
                File.WriteAllBytes(path, b)
                path
            throwsCheckpoint (fun () -> Llama2c.load (write "truncated.bin" bytes.[.. bytes.Length - 5]) cpu) [ "truncated.bin"; "truncated"; "implies 1056540 bytes, the file has 1056536" ]
            throwsCheckpoint (fun () -> Llama2c.load (write "padded.bin" (Array.append bytes [| 0uy; 0uy; 0uy; 0uy |])) cpu) [ "longer than its header says" ]
            throwsCheckpoint (fun () -> Llama2c.load (write "tiny.bin" bytes.[.. 9]) cpu) [ "too short" ]
            let garbage = Array.init 4096 (fun i -> byte (i * 37 + 11))
            throwsCheckpoint (fun () -> Llama2c.load (write "garbage.bin" garbage) cpu) [ "garbage.bin" ]
            let v1 = Array.copy bytes
            BitConverter.GetBytes(0x616b3432).CopyTo(v1, 0)
            BitConverter.GetBytes(1).CopyTo(v1, 4)
            throwsCheckpoint (fun () -> Llama2c.load (write "v1.bin" v1) cpu) [ "version 1" ]
            let zeroLayers = Array.copy bytes
            BitConverter.GetBytes(0).CopyTo(zeroLayers, 8)
            throwsCheckpoint (fun () -> Llama2c.load (write "zero.bin" zeroLayers) cpu) [ "n_layers = 0" ]
            throwsCheckpoint (fun () -> Llama2c.load (dir.File "absent.bin") cpu) [ "not found" ]
    ]

let inspectionTests =
    testList "detect and inspect" [
        testCase "every kind is detected and described from its configuration alone" <| fun () ->
            let check path kind =
                let i = ModelFiles.inspect path
                Expect.equal i.Kind kind (sprintf "%s kind" path)
                let m, _ = ModelFiles.load path cpu
                use m = m
                Expect.equal i.Config m.Config "config"
                Expect.equal i.ParameterCount (Transformer.parameterCount m) "parameter count"
            check (fixture "hf-gpt2-tiny") (ModelFiles.HuggingFace "GPT2LMHeadModel")
            check (fixture "hf-llama-tiny") (ModelFiles.HuggingFace "LlamaForCausalLM")
            check stories260K ModelFiles.Llama2c
            use dir = new TempDir()
            use m = randomModel 1 (randomConfig 1 TinyLike)
            Checkpoint.save dir.Path { Checkpoint.Metadata.Empty with Tokenizer = Some (json """{"kind":"llama2c"}""") } m
            check dir.Path ModelFiles.Native
            Expect.isSome (ModelFiles.inspect dir.Path).Tokenizer "metadata comes with the inspection"
            throwsCheckpoint (fun () -> ModelFiles.detect (dir.File "nothing-here")) [ "no such file or folder" ]
            use empty = new TempDir()
            throwsCheckpoint (fun () -> ModelFiles.detect empty.Path) [ "config.json" ]
    ]

/// Rewrites a safetensors file with `edit` applied to its (name, tensor) list; the metadata is kept.
let private rewrite (path: string) (edit: (string * torch.Tensor) list -> (string * torch.Tensor) list) =
    let metadata = (use r = Safetensors.Reader.Open path in r.Metadata)
    let all = Safetensors.load path cpu
    try Safetensors.save path metadata (edit all)
    finally for _, t in all do t.Dispose()

/// Replaces the dtype string of one tensor in a safetensors header (same length, so the bytes stay in place).
let private relabel (path: string) (name: string) (from: string) (into: string) =
    let bytes = File.ReadAllBytes path
    let n = int (BitConverter.ToUInt64(bytes, 0))
    let header = Text.Encoding.UTF8.GetString(bytes, 8, n)
    let key = sprintf "\"%s\":{\"dtype\":\"%s\"" name from
    let at = header.IndexOf key
    Expect.isGreaterThanOrEqual at 0 (sprintf "%s found in the header" key)
    let edited = header.Substring(0, at) + sprintf "\"%s\":{\"dtype\":\"%s\"" name into + header.Substring(at + key.Length)
    File.WriteAllBytes(path, Array.concat [ bytes.[.. 7]; Text.Encoding.UTF8.GetBytes edited; bytes.[8 + n ..] ])

let loadingCheckTests =
    testList "checks before loading" [
        testPropertyWithConfig { FsCheckConfig.defaultConfig with maxTest = 30 } "parameterShapes lists the model's parameters and parameterCount counts them, without building it"
        <| fun (seed: int) (kindIndex: uint8) ->
            let c = randomConfig seed kinds.[int kindIndex % 3]
            use m = Transformer.create c cpu
            let built = Transformer.parameters m |> List.map (fun (n, p) -> n, List.ofArray p.shape)
            let computed = TransformerConfig.parameterShapes c |> List.map (fun (n, s) -> n, List.ofArray s)
            Expect.equal computed built "names, shapes and order"
            Expect.equal (computed |> List.sumBy (fun (_, s) -> List.fold (*) 1L s)) (TransformerConfig.parameterCount c) "parameterCount"

        testCase "a GPT-2 bias longer or shorter than the config says is refused by name, before any native call" <| fun () ->
            for delta in [ 1L; -1L; 64L ] do
                use dir = new TempDir()
                copyFolder (fixture "hf-gpt2-tiny") dir.Path
                let weights = dir.File "model.safetensors"
                rewrite weights (List.map (fun (n, t) ->
                    if n = "transformer.h.1.attn.c_attn.bias" then n, (if delta > 0L then torch.cat([| t; torch.ones(delta) |], 0L) else t.narrow(0L, 0L, t.shape.[0] + delta))
                    else n, t))
                throwsCheckpoint (fun () -> HuggingFace.load dir.Path cpu)
                    [ weights; "'transformer.h.1.attn.c_attn.bias'"; sprintf "has shape [%d]" (192L + delta); "expects [192]"; dir.File "config.json" ]

        testCase "a config asking for millions of positions, tokens or layers fails on the headers at once" <| fun () ->
            use dir = new TempDir()
            copyFolder (fixture "hf-gpt2-tiny") dir.Path
            let config = dir.File "config.json"
            let original = File.ReadAllText config
            let cases =
                [ "n_positions", 10_000_000, [ "'transformer.wpe.weight'"; "[64, 64]"; "expects [10000000, 64]" ]
                  "n_positions", Int32.MaxValue, [ "'transformer.wpe.weight'"; sprintf "expects [%d, 64]" Int32.MaxValue ]
                  "vocab_size", 100_000_000, [ "'transformer.wte.weight'"; "[512, 64]"; "expects [100000000, 64]" ]
                  "n_layer", 1_000_000, [ "asks for 1000000 layers"; "weights hold only" ]
                  "n_inner", 1 <<< 30, [ "'transformer.h.0.mlp.c_fc.weight'"; sprintf "expects [64, %d]" (1 <<< 30) ] ]
            for field, value, fragments in cases do
                File.WriteAllText(config, original)
                editJson config (fun o -> o.[field] <- JsonValue.Create value)
                throwsCheckpoint (fun () -> HuggingFace.load dir.Path cpu) (config :: fragments)
            // our format: a learned n_ctx far beyond pos_embed, a rotary n_ctx far beyond the weights
            let c = { randomConfig 8 GptLike with Biases = Biases.All }
            use m = randomModel 8 c
            use own = new TempDir()
            Checkpoint.save own.Path Checkpoint.Metadata.Empty m
            editJson (own.File "config.json") (fun o -> o.["config"].AsObject().["n_ctx"] <- JsonValue.Create 50_000_000)
            throwsCheckpoint (fun () -> Checkpoint.load own.Path cpu) [ Checkpoint.weightsPath own.Path; "'pos_embed.weight'"; "expects [50000000, " ]
            use llama = new TempDir()
            copyFolder (fixture "hf-llama-tiny") llama.Path
            editJson (llama.File "config.json") (fun o -> o.["max_position_embeddings"] <- JsonValue.Create 100_000_000)
            throwsCheckpoint (fun () -> HuggingFace.load llama.Path cpu) [ llama.File "config.json"; "max_position_embeddings 100000000"; "rotary tables" ]
            editJson (llama.File "config.json") (fun o -> o.["max_position_embeddings"] <- JsonValue.Create 4096)
            use ok = HuggingFace.load llama.Path cpu
            Expect.equal ok.Config.NCtx 4096 "a plausible context length still loads"

        testCase "integer and boolean dtypes cannot hold a weight; F64 and F16 are converted" <| fun () ->
            let c = randomConfig 9 GptLike
            use m = randomModel 9 c
            use dir = new TempDir()
            Checkpoint.save dir.Path Checkpoint.Metadata.Empty m
            let weights = Checkpoint.weightsPath dir.Path
            let original = File.ReadAllBytes weights
            for dtype, name in [ torch.int32, "I32"; torch.uint8, "U8"; torch.ScalarType.Bool, "BOOL"; torch.int64, "I64" ] do
                File.WriteAllBytes(weights, original)
                rewrite weights (List.map (fun (n, t) -> if n = "ln_final.weight" then n, t.to_type dtype else n, t))
                throwsCheckpoint (fun () -> Checkpoint.load dir.Path cpu) [ weights; "'ln_final.weight'"; sprintf "stored as %s" name; "floating-point" ]
            // the same F32 bytes relabelled I32 (no conversion at all): refused, not reinterpreted
            File.WriteAllBytes(weights, original)
            relabel weights "ln_final.weight" "F32" "I32"
            throwsCheckpoint (fun () -> Checkpoint.load dir.Path cpu) [ weights; "'ln_final.weight'"; "stored as I32" ]
            // wider and narrower floats load (F64 exactly)
            File.WriteAllBytes(weights, original)
            rewrite weights (List.map (fun (n, t) -> n, t.to_type torch.float64))
            use wide = fst (Checkpoint.load dir.Path cpu)
            for (n, a), (_, b) in List.zip (Transformer.parameters m) (Transformer.parameters wide) do
                Expect.isTrue (identical a b) (sprintf "%s identical through F64" n)
            File.WriteAllBytes(weights, original)
            rewrite weights (List.map (fun (n, t) -> n, t.to_type torch.float16))
            use half = fst (Checkpoint.load dir.Path cpu)
            Expect.isLessThan (maxDiff (m.get_parameter "embed.weight") (half.get_parameter "embed.weight")) 0.01 "F16 converted"

        testCase "non-finite weights are refused with the file and tensor named, unless allowed" <| fun () ->
            let c = randomConfig 10 LlamaLike
            use m = randomModel 10 c
            use dir = new TempDir()
            Checkpoint.save dir.Path Checkpoint.Metadata.Empty m
            let weights = Checkpoint.weightsPath dir.Path
            for bad in [ nan; infinity; -infinity ] do
                rewrite weights (List.map (fun (n, t) ->
                    if n = "blocks.0.attn.k.weight" then (let u = t.clone() in u.view(-1L).[1L] <- torch.tensor(bad, dtype = torch.float32); n, u) else n, t))
                throwsCheckpoint (fun () -> Checkpoint.load dir.Path cpu) [ weights; "'blocks.0.attn.k.weight'"; "1 non-finite value"; "AllowNonFinite" ]
                throwsCheckpoint (fun () -> ModelFiles.load dir.Path cpu) [ weights; "'blocks.0.attn.k.weight'" ]
                use allowed = fst (Checkpoint.loadWith { LoadOptions.Default with AllowNonFinite = true } dir.Path cpu)
                let k = allowed.get_parameter "blocks.0.attn.k.weight"
                Expect.isFalse (k.view(-1L).[1L].isfinite().item<bool> ()) "allowed: the value as stored"
            // Hugging Face names the file's tensor
            use hf = new TempDir()
            copyFolder (fixture "hf-gpt2-tiny") hf.Path
            rewrite (hf.File "model.safetensors") (List.map (fun (n, t) ->
                if n = "transformer.wte.weight" then (let u = t.clone() in u.[3L, 5L] <- torch.tensor(nan, dtype = torch.float32); n, u) else n, t))
            throwsCheckpoint (fun () -> HuggingFace.load hf.Path cpu) [ hf.File "model.safetensors"; "'transformer.wte.weight'"; "non-finite" ]
            use allowedHf = HuggingFace.loadWith { LoadOptions.Default with AllowNonFinite = true } hf.Path cpu
            Expect.isTrue ((allowedHf.get_parameter "embed.weight").[3L, 5L].isnan().item<bool> ()) "loaded as stored"

        testCase "a tied model whose file holds a different lm_head is refused" <| fun () ->
            use dir = new TempDir()
            copyFolder (fixture "hf-llama-tiny") dir.Path
            editJson (dir.File "config.json") (fun o -> o.["tie_word_embeddings"] <- JsonValue.Create true)
            throwsCheckpoint (fun () -> HuggingFace.load dir.Path cpu) [ dir.File "model.safetensors"; "'lm_head.weight' differs from 'model.embed_tokens.weight'"; "tie_word_embeddings" ]
            rewrite (dir.File "model.safetensors") (fun all ->
                let embed = all |> List.find (fst >> (=) "model.embed_tokens.weight") |> snd
                all |> List.map (fun (n, t) -> if n = "lm_head.weight" then n, embed.clone() else n, t))
            use tied = HuggingFace.load dir.Path cpu
            Expect.isTrue tied.Config.TiedUnembed "the same matrix: tied"
    ]

let neoxTests =
    testList "GPT-NeoX (Pythia) files" [
        testCase "config.json maps to a parallel-residual, partial-rotary LayerNorm model; inspection agrees with the loaded model" <| fun () ->
            for name, isParallel, theta, vocab in [ "hf-neox-tiny", true, 10000.0, 320; "hf-neox-tiny-sequential", false, 500.0, 128 ] do
                let dir = fixture name
                let i = ModelFiles.inspect dir
                Expect.equal i.Kind (ModelFiles.HuggingFace "GPTNeoXForCausalLM") "kind"
                let c = i.Config
                Expect.equal (c.DModel, c.NLayers, c.NHeads, c.DMlp, c.VocabSize, c.NCtx) (64, 2, 4, 256, vocab, 64) "sizes"
                Expect.equal c.ParallelResidual isParallel "use_parallel_residual"
                // rotary_pct 0.25 of d_head 16
                Expect.equal c.RotaryDim (Some 4) "rotary dims"
                Expect.equal c.Positions (Rotary (HalfSplit, theta)) "rotary layout and base"
                Expect.equal (c.Norm, c.Mlp, c.TiedUnembed, c.Biases) (LayerNorm, Plain Gelu, false, { Biases.All with Unembed = false }) "norm, MLP, head, biases"
                let m, _ = ModelFiles.load dir cpu
                use m = m
                Expect.equal m.Config c "loaded config"
                Expect.equal i.ParameterCount (Transformer.parameterCount m) "parameter count"
                Expect.equal (HookNames.all c |> List.exists (fun h -> h.EndsWith "hook_resid_mid")) (not isParallel) "hook_resid_mid only without a parallel residual"

        testCase "a GPTNeoXModel-style file (no gpt_neox. prefix) and a model_type-only config load the same model" <| fun () ->
            use dir = new TempDir()
            copyFolder (fixture "hf-neox-tiny") dir.Path
            rewrite (dir.File "model.safetensors") (List.map (fun (n: string, t) -> (if n.StartsWith "gpt_neox." then n.Substring 9 else n), t))
            editJson (dir.File "config.json") (fun o -> o.Remove "architectures" |> ignore)
            use a = HuggingFace.load (fixture "hf-neox-tiny") cpu
            use b = HuggingFace.load dir.Path cpu
            use tokens = randomTokens 3 128 2 12
            use la = Transformer.forward a tokens
            use lb = Transformer.forward b tokens
            Expect.isTrue (identical la lb) "same logits"

        testCase "saved in our format, a GPT-NeoX model comes back with its parallel residual and partial rotary" <| fun () ->
            use m = HuggingFace.load (fixture "hf-neox-tiny") cpu
            use dir = new TempDir()
            Checkpoint.save dir.Path Checkpoint.Metadata.Empty m
            let loaded, _ = Checkpoint.load dir.Path cpu
            use loaded = loaded
            Expect.equal loaded.Config m.Config "config"
            use tokens = randomTokens 4 128 2 10
            use l1 = Transformer.forward m tokens
            use l2 = Transformer.forward loaded tokens
            Expect.isTrue (identical l1 l2) "identical logits"

        testCase "a damaged folder (query_key_value of the wrong shape, a missing tensor, a stray tensor) is refused naming the file and tensor" <| fun () ->
            for delta in [ -16L; 64L ] do
                use dir = new TempDir()
                copyFolder (fixture "hf-neox-tiny") dir.Path
                let weights = dir.File "model.safetensors"
                let name = "gpt_neox.layers.1.attention.query_key_value.weight"
                rewrite weights (List.map (fun (n, t) ->
                    if n = name then n, (if delta > 0L then torch.cat([| t; torch.zeros(delta, 64L) |], 0L) else t.narrow(0L, 0L, 192L + delta))
                    else n, t))
                throwsCheckpoint (fun () -> HuggingFace.load dir.Path cpu)
                    [ weights; sprintf "'%s'" name; sprintf "has shape [%d, 64]" (192L + delta); "expects [192, 64]"; dir.File "config.json" ]
            use dir = new TempDir()
            copyFolder (fixture "hf-neox-tiny") dir.Path
            let weights = dir.File "model.safetensors"
            rewrite weights (List.filter (fun (n, _) -> n <> "gpt_neox.layers.0.mlp.dense_4h_to_h.bias"))
            throwsCheckpoint (fun () -> HuggingFace.load dir.Path cpu) [ weights; "tensor 'gpt_neox.layers.0.mlp.dense_4h_to_h.bias' is missing"; "[64]" ]
            copyFolder (fixture "hf-neox-tiny") (dir.File "headless")
            rewrite (dir.File "headless/model.safetensors") (List.filter (fun (n, _) -> n <> "embed_out.weight"))
            throwsCheckpoint (fun () -> HuggingFace.load (dir.File "headless") cpu) [ "tensor 'embed_out.weight' is missing"; "[320, 64]" ]
            copyFolder (fixture "hf-neox-tiny") (dir.File "stray")
            rewrite (dir.File "stray/model.safetensors") (fun all -> all @ [ "gpt_neox.layers.0.attention.q_proj.weight", torch.zeros(2L) ])
            throwsCheckpoint (fun () -> HuggingFace.load (dir.File "stray") cpu) [ "unexpected tensors for a GPT-NeoX model"; "gpt_neox.layers.0.attention.q_proj.weight" ]

        testCase "options this loader cannot compute faithfully are refused by field" <| fun () ->
            use dir = new TempDir()
            copyFolder (fixture "hf-neox-tiny") dir.Path
            let config = dir.File "config.json"
            let original = File.ReadAllText config
            let cases : (string * (JsonObject -> unit) * string list) list =
                [ "rope_scaling", (fun o -> o.["rope_scaling"] <- JsonNode.Parse """{"type":"linear","factor":2.0}"""), [ "'rope_scaling' is set" ]
                  "hidden_act", (fun o -> o.["hidden_act"] <- JsonValue.Create "quick_gelu"), [ "'hidden_act' is 'quick_gelu'" ]
                  "rotary_pct odd", (fun o -> o.["rotary_pct"] <- JsonValue.Create 0.1), [ "'rotary_pct' is 0.1"; "rotates 1 of the 16" ]
                  "rotary_pct zero", (fun o -> o.["rotary_pct"] <- JsonValue.Create 0.0), [ "'rotary_pct' is 0" ]
                  "heads", (fun o -> o.["num_attention_heads"] <- JsonValue.Create 5), [ "'num_attention_heads' is 5" ] ]
            for what, edit, fragments in cases do
                File.WriteAllText(config, original)
                editJson config edit
                let ex = Expect.throwsC (fun () -> HuggingFace.load dir.Path cpu |> ignore) id
                for f in config :: fragments do Expect.stringContains ex.Message f (sprintf "%s: %s" what f)
            // rotary_pct 1 rotates whole heads, as Llama does
            File.WriteAllText(config, original)
            editJson config (fun o -> o.["rotary_pct"] <- JsonValue.Create 1.0)
            use whole = HuggingFace.load dir.Path cpu
            Expect.equal whole.Config.RotaryDim (Some 16) "rotary_pct 1"
    ]

let tests =
    testList "Model files" [ ownFormatTests; huggingFaceTests; llama2cTests; inspectionTests; loadingCheckTests; neoxTests ]
