/// The C# facade: the C# example program run as a child process, and the facade's classes used directly
/// (they are .NET types), each compared with the F# function it converts for.
module Transcoders.Tests.FacadeTests

open System
open System.Collections.Generic
open System.Diagnostics
open System.IO
open Expecto
open FsCheck
open FsCheck.FSharp
open TorchSharp
open Transcoders
open Transcoders.Tests.Fixtures

module TokCore = Transcoders.Text.Tokenizer
module Gpt2Core = Transcoders.Text.Gpt2Tokenizer
module CompactCore = Transcoders.Text.CompactVocab
module CorpusCore = Transcoders.Text.Corpus
module ShardsCore = Transcoders.Text.TokenShards
module BatchesCore = Transcoders.Text.Batches
module SafetensorsCore = Transcoders.Files.Safetensors
module DeviceCore = Transcoders.Tensors.Device
module ConfigCore = Transcoders.Models.TransformerConfig
module HookNamesCore = Transcoders.Models.HookNames
module TransformerCore = Transcoders.Models.Transformer
module GenerationCore = Transcoders.Models.Generation
module ModelFilesCore = Transcoders.Models.ModelFiles

let private stories260K () = Transcoders.Files.Paths.data "models/stories260K/stories260K.bin"
let private tok512 () = Transcoders.Files.Paths.data "models/stories260K/tok512.bin"
let private config n = { FsCheckConfig.defaultConfig with maxTest = n }

/// A facade model over a core model (the facade owns and disposes it).
let private wrap (m: Transcoders.Models.Transformer) = new LanguageModel(m, null, None)

let private hookFn (f: torch.Tensor -> torch.Tensor) = Func<torch.Tensor, torch.Tensor>(f)

/// The exception `f` raises (a test failure when it raises none).
let private raised (what: string) (f: unit -> unit) : exn =
    try
        f ()
        failtestf "%s: expected an exception" what
    with
    | :? AssertException -> reraise ()
    | e -> e

// ---------------------------------------------------------------------------------------------- the C# example

/// The built example, next to this test binary's configuration (tests/CSharpExample/bin/<Configuration>/<tfm>).
let private exampleDll () =
    let here = DirectoryInfo(Path.TrimEndingDirectorySeparator AppContext.BaseDirectory)
    let tfm, configuration = here.Name, here.Parent.Name
    let candidates =
        [ Path.Combine(repoRoot, "tests", "CSharpExample", "bin", configuration, tfm, "CSharpExample.dll")
          Path.GetFullPath(Path.Combine(here.FullName, "..", "..", "..", "..", "CSharpExample", "bin", configuration, tfm, "CSharpExample.dll")) ]
    match candidates |> List.tryFind File.Exists with
    | Some p -> p
    | None -> failtestf "the C# example is not built (looked for %s); building tests/Transcoders.Tests builds it" (String.Join(" and ", candidates))

/// Runs the example with `dotnet` from a neutral folder, with extra environment variables; returns
/// (exit code, stdout, stderr).
let private runExample (environment: (string * string) list) =
    let host =
        match Environment.GetEnvironmentVariable "DOTNET_HOST_PATH" with
        | null | "" -> "dotnet"
        | p -> p
    let psi = ProcessStartInfo(host, UseShellExecute = false, RedirectStandardOutput = true, RedirectStandardError = true,
                               WorkingDirectory = Path.GetTempPath())
    psi.ArgumentList.Add(exampleDll ())
    for name, value in environment do psi.Environment.[name] <- value
    use p = Process.Start psi
    let out = p.StandardOutput.ReadToEndAsync()
    let err = p.StandardError.ReadToEndAsync()
    if not (p.WaitForExit(TimeSpan.FromMinutes 5.0)) then
        p.Kill true
        failtest "the C# example did not finish within 5 minutes"
    p.WaitForExit()
    p.ExitCode, out.Result, err.Result

let exampleTests =
    testList "C# example" [
        testCase "the example runs, exits 0 and prints what the F# API computes" <| fun () ->
            use m = Transcoders.Models.Llama2c.load (stories260K ()) cpu
            let tokenizer = TokCore.llama2c (tok512 ()) m.Config.VocabSize
            let g = GenerationCore.generate m { GenerationCore.GenerateOptions.Greedy with MaxNewTokens = 20 } [| Transcoders.Text.Llama2cTokenizer.Bos |]
            Expect.equal g.Tokens.Length 21 "BOS and 20 new tokens"
            use tokens = torch.tensor(g.Tokens |> Array.map int64)
            use r = TransformerCore.runWithCache m [ HookNamesCore.residPre 0 ] tokens
            let code, out, err = runExample []
            Expect.equal code 0 (sprintf "exit code (stdout: %s; stderr: %s)" out err)
            let lines = out.Split('\n') |> Array.map (fun l -> l.TrimEnd '\r')
            let value (prefix: string) =
                match lines |> Array.tryFind (fun l -> l.StartsWith prefix) with
                | Some l -> l.Substring prefix.Length
                | None -> failtestf "no line starting with %A in the example's output:\n%s" prefix out
            Expect.equal (value "tokens: ") (String.Join(" ", g.Tokens)) "greedy tokens"
            Expect.equal (value "text: ") (TokCore.decode tokenizer g.Tokens) "greedy text"
            let name = HookNamesCore.residPre 0
            Expect.equal (value (name + ": ")) ("[" + String.Join(", ", r.[name].shape) + "]") "shape of the cached resid_pre"
            Expect.equal (value "spliced top-1 agreement: ") "1" "a transcoder spliced with error terms keeps every prediction"
            let sentence = value "gpt2 text: "
            Expect.isNotEmpty sentence "a sentence"
            Expect.equal (value "gpt2 ids: ") (String.Join(" ", Gpt2Core.encode (Gpt2Core.get ()) sentence)) "GPT-2 ids of the sentence"
            // The program trains and traces: a GPT, transcoders and a cross-layer transcoder, a graph, paths, an intervention.
            Expect.equal (value "lm steps: ") "6" "a GPT trained from C#"
            Expect.equal (value "coders: ") "transcoder-L0 transcoder-L1 clt-L0-1" "transcoders and a cross-layer transcoder trained from C#"
            Expect.stringStarts (value "coder L0: ") "4.0 4.0" "TopK 4 transcoders"
            Expect.equal (value "clt: ") "CrossLayerTranscoder layers 0,1 TopK 4" "the cross-layer transcoder loads"
            Expect.equal (value "graph reloaded: ") "True" "the graph saves and loads with its scores and description"
            Expect.equal (value "graph scores in [0, 1]: ") "True" "replacement and completeness scores"
            Expect.isGreaterThan (int (value "paths: ")) 0 "computational paths"
            Expect.stringEnds (value "intervention on ") ": True" "the graph predicts the constrained effect of an intervention"
            Expect.equal (value "steered tokens: ") "5" "generation with a steering intervention"
            Expect.equal (value "clt graph logits: ") "True" "a graph through the cross-layer transcoder"

        testCase "the example exits non-zero with the core's message when the model is missing" <| fun () ->
            use empty = new TempDir()
            let code, out, err = runExample [ "TRANSCODERS_DATA", empty.Path ]
            Expect.notEqual code 0 (sprintf "exit code (stdout: %s)" out)
            Expect.stringContains err (Path.Combine(empty.Path, "models", "stories260K", "stories260K.bin")) "names the missing file"
    ]

// ---------------------------------------------------------------------------------------------- coders

module CoderCore = Transcoders.Coders.Coder
module FeatureCore = Transcoders.Coders.FeatureAccess

let coderTests =
    testSequenced <| testList "SparseCoder, CoderModel, CoderTrainer" [
        test "a created transcoder saves, loads and encodes exactly as the core coder" {
            use dir = new TempDir()
            torch.manual_seed 3L |> ignore
            use coder = SparseCoder.CreateTranscoder("stories260K", 1, 64, 96, 8)
            Expect.equal coder.Kind SparseCoderKind.Transcoder "kind"
            Expect.equal (List.ofSeq coder.HookIn) [ "blocks.1.ln2.hook_normalized" ] "input hook"
            Expect.equal (List.ofSeq coder.HookOut) [ "blocks.1.hook_mlp_out" ] "output hook"
            Expect.equal (coder.DIn, coder.DOut, coder.Features, coder.Activation) (64, 64, 96, "TopK 8") "widths and activation"
            coder.Save dir.Path
            use loaded = SparseCoder.Load dir.Path
            use x = torch.randn(3L, 5L, 64L)
            use a = coder.Encode x
            use a2 = loaded.Encode x
            use expected = coder.Core.Encode x
            Expect.isTrue (identical a expected) "Encode = Coder.Encode"
            Expect.isTrue (torch.allclose(a, a2, 1e-5, 1e-6)) "the loaded coder encodes the same"
            use y = loaded.Forward x
            use d = loaded.Decode a2
            Expect.isTrue (torch.allclose(y, d, 1e-5, 1e-6)) "Forward = Decode ∘ Encode"
            Expect.equal (a.count_nonzero([| -1L |]).max().item<int64> ()) 8L "TopK 8 keeps at most 8 per token"
            let e = raised "a missing coder" (fun () -> SparseCoder.Load(Path.Combine(dir.Path, "nothing")) |> ignore)
            Expect.stringContains e.Message "nothing" "names the path"
        }

        test "CoderModel: error terms reproduce the model; features by tag = FeatureAccess; a misfit is refused" {
            use model = LanguageModel.Load(stories260K ())
            torch.manual_seed 5L |> ignore
            let d = model.Config.DModel
            use coder = SparseCoder.CreateTranscoder("stories260K", 2, d, 4 * d, 8)
            let tokens = [| 1; 403; 407; 261; 378; 288; 300; 395 |]
            let exact = CoderModel(model, [ coder ], errorTerms = true)
            let f = exact.Compare tokens
            Expect.equal f.Top1Agreement 1.0 "with error terms every top-1 agrees"
            Expect.isLessThan f.MaxAbsLogitDiff 1e-4 "and the logits are the model's"
            let approx = CoderModel(model, [ coder ], errorTerms = false)
            Expect.isGreaterThan (approx.Compare(tokens).KlToOriginal) 1e-6 "a random transcoder changes the output"
            Expect.contains approx.FeatureNames "blocks.2.transcoder.hook_acts" "the feature hook"
            use m2 = approx.Features("M2N5", tokens)
            use t = torch.tensor(tokens |> Array.map int64).unsqueeze(0L)
            use expected = FeatureCore.features model.Core [ coder.Core ] "M2N5" t
            Expect.isTrue (identical m2 expected) "M2N5 = FeatureAccess.features"
            use wide = SparseCoder.CreateTranscoder("stories260K", 2, d + 1, 16, 4)
            let e = raised "a coder of another width" (fun () -> CoderModel(model, [ wide ]) |> ignore)
            Expect.stringContains e.Message (string (d + 1)) "names the width"
        }

        test "CoderTrainer trains, saves and evaluates a transcoder and an SAE on stories260K" {
            use dir = new TempDir()
            let options =
                CoderTrainingOptions(
                    Kinds = ResizeArray [ "transcoder"; "sae" ], Layers = ResizeArray [ 1 ], Features = Nullable 128, K = Nullable 8,
                    Steps = 6, Batch = 128, Out = dir.Path, CheckpointEvery = 0, EvalRows = 256L, SplicedRows = 4)
            let lines = ResizeArray<string>()
            let r = CoderTrainer.Train(stories260K (), options, progress = Action<string>(lines.Add))
            Expect.equal [ for c in r.Coders -> c.Name ] [ "transcoder-L1"; "sae-L1" ] "one coder per kind"
            for c in r.Coders do
                Expect.equal c.L0 8.0 (sprintf "%s: TopK 8 has L0 8" c.Name)
                Expect.isTrue (c.Fvu > 0.0 && Double.IsFinite c.Fvu) (sprintf "%s: a finite FVU" c.Name)
                Expect.isTrue (Double.IsFinite c.CeRecovered) (sprintf "%s: spliced CE evaluated" c.Name)
                use loaded = SparseCoder.Load c.Path
                Expect.equal loaded.Features 128 "the saved width"
            Expect.stringContains r.MetricsMarkdown "| transcoder-L1 | transcoder | 1 | 128 | k=8 |" "the metrics table"
            Expect.isNonEmpty lines "progress lines"
            let bad = CoderTrainingOptions(Layers = ResizeArray [ 9 ], Steps = 2, Out = dir.Path)
            let e = raised "a layer the model lacks" (fun () -> CoderTrainer.Train(stories260K (), bad) |> ignore)
            Expect.stringContains e.Message "layer 9" "names the layer"
        }
    ]

// ---------------------------------------------------------------------------------------------- models

let private kindOf (i: uint8) = kinds.[int i % kinds.Length]

let configTests =
    testList "ModelConfig and Hooks" [
        testPropertyWithConfig (config 200) "ModelConfig ⇄ TransformerConfig loses nothing" <| fun (seed: int) (kind: uint8) ->
            let c = randomConfig seed (kindOf kind)
            ModelConfig.FromCore(c).ToCore() = c

        test "presets are the F# presets, and each call gives an independent object" {
            Expect.equal (ModelConfig.Gpt2().ToCore()) ConfigCore.gpt2 "GPT-2"
            Expect.equal (ModelConfig.Llama().ToCore()) ConfigCore.llama "Llama"
            Expect.equal (ModelConfig.TinyModel().ToCore()) ConfigCore.tinymodel "tinymodel"
            let a = ModelConfig.Llama()
            a.NLayers <- 1
            Expect.equal (ModelConfig.Llama().NLayers) ConfigCore.llama.NLayers "a fresh preset"
            let b = a.Clone()
            b.NLayers <- 2
            Expect.equal a.NLayers 1 "a clone is independent"
        }

        test "properties map onto the record's fields" {
            let mc = ModelConfig.Gpt2()
            mc.Positions <- PositionKind.Rotary
            mc.RotaryLayout <- RotaryLayoutKind.Interleaved
            mc.RotaryTheta <- 500.0
            mc.Norm <- NormKind.RmsNorm
            mc.GatedMlp <- true
            mc.Activation <- ActivationKind.Silu
            mc.DHead <- Nullable 32
            mc.QkvBias <- false
            mc.UnembedBias <- true
            mc.NKvHeads <- 4
            mc.Dropout <- 0.1
            let expected =
                { ConfigCore.gpt2 with
                    Positions = Transcoders.Models.Positions.Rotary(Transcoders.Models.RotaryLayout.Interleaved, 500.0)
                    Norm = Transcoders.Models.Normalization.RMSNorm
                    Mlp = Transcoders.Models.MlpKind.Gated Transcoders.Models.MlpActivation.Silu
                    DHead = Some 32; NKvHeads = 4; Dropout = 0.1
                    Biases = { ConfigCore.gpt2.Biases with Qkv = false; Unembed = true } }
            Expect.equal (mc.ToCore()) expected "record"
            Expect.equal mc.HeadSize 32 "head size"
            Expect.equal mc.ParameterCount (ConfigCore.parameterCount expected) "parameter count"
            Expect.sequenceEqual mc.HookNames (HookNamesCore.all expected) "hook names"
        }

        testPropertyWithConfig (config 200) "Problems and Validate say what TransformerConfig.problems and validate say" <| fun (seed: int) (kind: uint8) ->
            let rng = Random seed
            let c =
                { randomConfig seed (kindOf kind) with
                    DModel = rng.Next(-2, 20); NHeads = rng.Next(-1, 6); NKvHeads = rng.Next(-1, 6)
                    DHead = (if rng.Next 2 = 0 then None else Some(rng.Next(-1, 6)))
                    NormEps = (if rng.Next 4 = 0 then -1e-5 else 1e-5)
                    Dropout = rng.NextDouble() * 1.4 - 0.2 }
            let mc = ModelConfig.FromCore c
            Expect.sequenceEqual (mc.Problems()) (ConfigCore.problems c) "problems"
            match ConfigCore.problems c with
            | [] -> Expect.isTrue (obj.ReferenceEquals(mc.Validate(), mc)) "a valid configuration returns itself"
            | _ ->
                let expected = raised "core" (fun () -> ConfigCore.validate c |> ignore)
                let actual = raised "facade" (fun () -> mc.Validate() |> ignore)
                Expect.equal (actual.GetType()) (expected.GetType()) "same exception type"
                Expect.equal actual.Message expected.Message "same message"
                Expect.throwsT<ArgumentException> (fun () -> LanguageModel.Create(mc, cpu) |> ignore) "Create refuses it"

        test "an invalid configuration is refused with every problem named" {
            let mc = ModelConfig.TinyModel()
            mc.DModel <- 100
            mc.NHeads <- 3
            mc.NKvHeads <- 3
            mc.Dropout <- 1.5
            let e = raised "Validate" (fun () -> mc.Validate() |> ignore)
            Expect.isTrue (e :? ArgumentException) "an ArgumentException"
            Expect.stringContains e.Message "d_model 100 is not divisible by n_heads 3" "names the head problem"
            Expect.stringContains e.Message "dropout must be in [0, 1), got 1.5" "names the dropout problem"
        }

        testProperty "Hooks methods name the hook points HookNames names" <| fun (NonNegativeInt l) ->
            let pairs =
                [ Hooks.ResidPre l, HookNamesCore.residPre l; Hooks.Ln1Scale l, HookNamesCore.ln1Scale l
                  Hooks.Ln1Normalized l, HookNamesCore.ln1Normalized l; Hooks.AttnQ l, HookNamesCore.attnQ l
                  Hooks.AttnK l, HookNamesCore.attnK l; Hooks.AttnV l, HookNamesCore.attnV l
                  Hooks.AttnRotQ l, HookNamesCore.attnRotQ l; Hooks.AttnRotK l, HookNamesCore.attnRotK l
                  Hooks.AttnScores l, HookNamesCore.attnScores l; Hooks.Pattern l, HookNamesCore.pattern l
                  Hooks.Z l, HookNamesCore.z l; Hooks.AttnOut l, HookNamesCore.attnOut l
                  Hooks.ResidMid l, HookNamesCore.residMid l; Hooks.Ln2Scale l, HookNamesCore.ln2Scale l
                  Hooks.Ln2Normalized l, HookNamesCore.ln2Normalized l; Hooks.MlpIn l, HookNamesCore.mlpIn l
                  Hooks.MlpPre l, HookNamesCore.mlpPre l; Hooks.MlpPreLinear l, HookNamesCore.mlpPreLinear l
                  Hooks.MlpPost l, HookNamesCore.mlpPost l; Hooks.MlpOut l, HookNamesCore.mlpOut l
                  Hooks.ResidPost l, HookNamesCore.residPost l
                  Hooks.Embed, HookNamesCore.embed; Hooks.PosEmbed, HookNamesCore.posEmbed
                  Hooks.LnFinalScale, HookNamesCore.lnFinalScale; Hooks.LnFinalNormalized, HookNamesCore.lnFinalNormalized ]
            pairs |> List.forall (fun (a, b) -> a = b)

        testPropertyWithConfig (config 100) "Hooks.All and Resolve = HookNames.all and resolve" <| fun (seed: int) (kind: uint8) ->
            let c = randomConfig seed (kindOf kind)
            let mc = ModelConfig.FromCore c
            Expect.sequenceEqual (Hooks.All mc) (HookNamesCore.all c) "all"
            Expect.sequenceEqual (Hooks.Resolve(mc, "blocks.*.hook_resid_pre")) (HookNamesCore.resolve c "blocks.*.hook_resid_pre") "glob"
            Expect.equal (Hooks.IsPattern "blocks.*.hook_z") true "a glob"

        test "TransformerLens names, and unknown names are refused as the core refuses them" {
            Expect.equal (Hooks.ResidPre 2) "blocks.2.hook_resid_pre" "TransformerLens' name"
            let mc = ModelConfig.Llama()
            let expected = raised "core" (fun () -> HookNamesCore.resolve (mc.ToCore()) "blocks.9.hook_resid_pre" |> ignore)
            let actual = raised "facade" (fun () -> Hooks.Resolve(mc, "blocks.9.hook_resid_pre") |> ignore)
            Expect.equal (actual.GetType(), actual.Message) (expected.GetType(), expected.Message) "same error"
        }
    ]

let modelTests =
    testList "LanguageModel" [
        testPropertyWithConfig (config 10) "Logits and RunWithCache = Transformer.forward and runWithCache; Dispose frees the cache"
        <| fun (seed: int) (kind: uint8) ->
            let c = randomConfig seed (kindOf kind)
            use model = wrap (randomModel seed c)
            let p = min c.NCtx 5
            use tokens = randomTokens seed c.VocabSize 2 p
            use expectedLogits = TransformerCore.forward model.Core tokens
            use logits = model.Logits tokens
            Expect.isTrue (identical logits expectedLogits) "logits of a tensor"
            let row = [| for i in 0L .. int64 p - 1L -> tokens.[0L, i].item<int64> () |]
            use fromLongs = model.Logits row
            use fromInts = model.Logits(row |> Array.map int)
            use firstRow = tokens.narrow(0L, 0L, 1L)
            use expectedRow = TransformerCore.forward model.Core firstRow
            Expect.isTrue (identical fromLongs expectedRow && identical fromInts expectedRow) "logits of int64 and int32 arrays"
            let names = [ HookNamesCore.residPre 0; "blocks.*.hook_mlp_out"; HookNamesCore.pattern 0 ]
            use expected = TransformerCore.runWithCache model.Core names tokens
            let cache = model.RunWithCache(tokens, names)
            Expect.isTrue (identical cache.Logits expected.Logits.Value) "cache logits"
            Expect.sequenceEqual (Seq.sort cache.Keys) (Seq.sort expected.Cache.Keys) "cached names"
            Expect.equal cache.Count expected.Cache.Count "count"
            Expect.sequenceEqual (cache |> Seq.map (fun kv -> kv.Key) |> Seq.sort) (Seq.sort expected.Cache.Keys) "enumerated names"
            for KeyValue(name, t) in expected.Cache do
                Expect.isTrue (identical cache.[name] t) name
                Expect.isTrue (cache.ContainsKey name) name
            Expect.isFalse (fst (cache.TryGetValue(HookNamesCore.residMid 0))) "not cached"
            let e = raised "missing" (fun () -> cache.[HookNamesCore.residMid 0] |> ignore)
            Expect.stringContains e.Message "is not in the cache" "the core's message"
            let kept = cache.Logits
            let activations = List.ofSeq cache.Values
            cache.Dispose()
            Expect.isTrue (kept.IsInvalid && activations |> List.forall (fun t -> t.IsInvalid)) "Dispose frees every tensor"

        test "RunWithHooks = Transformer.runWithHooks; Run caches, hooks and stops early as Transformer.run" {
            let c = randomConfig 21 GptLike
            use model = wrap (randomModel 21 c)
            use tokens = randomTokens 21 c.VocabSize 2 5
            let zero (t: torch.Tensor) = torch.zeros_like t
            let hooks = Dictionary<string, Func<torch.Tensor, torch.Tensor>>()
            hooks.[HookNamesCore.mlpOut 0] <- hookFn zero
            use actual = model.RunWithHooks(tokens, hooks)
            use expected = TransformerCore.runWithHooks model.Core [ HookNamesCore.mlpOut 0, zero ] tokens
            use plain = model.Logits tokens
            Expect.isTrue (identical actual expected) "hooked logits"
            Expect.isFalse (identical actual plain) "the hook changed something"
            let settings = RunSettings(StopAtLayer = Nullable 1)
            settings.Cache.Add(HookNamesCore.mlpOut 0)
            settings.Hooks.[HookNamesCore.mlpOut 0] <- hookFn zero
            use r = model.Run(tokens, settings)
            let options =
                { Transcoders.Models.RunOptions.Default with
                    Cache = set [ HookNamesCore.mlpOut 0 ]; Hooks = [ HookNamesCore.mlpOut 0, zero ]; StopAtLayer = Some 1 }
            use e = TransformerCore.run model.Core options tokens
            Expect.isNull (box r.Logits) "no logits when stopped early"
            Expect.isTrue (identical r.Residual e.Residual.Value) "residual where the run stopped"
            Expect.isTrue (identical r.[HookNamesCore.mlpOut 0] e.[HookNamesCore.mlpOut 0]) "cached after the hook"
            hooks.[HookNamesCore.mlpOut 0] <- null
            let nullHook = raised "null hook" (fun () -> model.RunWithHooks(tokens, hooks).Dispose())
            Expect.stringContains nullHook.Message (HookNamesCore.mlpOut 0) "names the hook point"
            hooks.[HookNamesCore.mlpOut 0] <- hookFn (fun t -> t.sum())
            let badShape = raised "bad shape" (fun () -> model.RunWithHooks(tokens, hooks).Dispose())
            let coreBad = raised "core" (fun () -> (TransformerCore.runWithHooks model.Core [ HookNamesCore.mlpOut 0, (fun t -> t.sum()) ] tokens).Dispose())
            Expect.equal (badShape.GetType(), badShape.Message) (coreBad.GetType(), coreBad.Message) "the core's error, unchanged"
        }

        test "LogitsCached over a prefix and then the rest = Logits of the whole; RunCached = Transformer.runCached" {
            let c = randomConfig 31 LlamaLike
            use model = wrap (randomModel 31 c)
            use _ = torch.no_grad ()
            let p = min c.NCtx 6
            use tokens = randomTokens 31 c.VocabSize 1 p
            use full = model.Logits tokens
            use cache = model.CreateKvCache(1, c.NCtx)
            use a = model.LogitsCached(cache, tokens.narrow(1L, 0L, 2L))
            Expect.equal cache.Length 2 "two positions cached"
            use b = model.LogitsCached(cache, tokens.narrow(1L, 2L, int64 p - 2L))
            Expect.equal (cache.Length, cache.Capacity, cache.Batch) (p, c.NCtx, 1) "length, capacity, batch"
            use joined = torch.cat([| a; b |], 1L)
            Expect.isLessThan (relDiff joined full) 1e-5 "same logits"
            cache.Reset()
            use coreCache = TransformerCore.kvCache model.Core 1 c.NCtx
            let settings = RunSettings()
            settings.Cache.Add(HookNamesCore.pattern 0)
            use r = model.RunCached(cache, tokens, settings)
            use e = TransformerCore.runCached model.Core coreCache { Transcoders.Models.RunOptions.Default with Cache = set [ HookNamesCore.pattern 0 ] } tokens
            Expect.isTrue (identical r.Logits e.Logits.Value) "logits"
            Expect.isTrue (identical r.[HookNamesCore.pattern 0] e.[HookNamesCore.pattern 0]) "pattern"
        }

        testPropertyWithConfig (config 12) "Load + Generate = Generation.generate, for any settings" <| fun (seed: int) ->
            let rng = Random seed
            use model = LanguageModel.Load(stories260K (), cpu)
            use m = Transcoders.Models.Llama2c.load (stories260K ()) cpu
            let prompt = [| yield 1; for _ in 1 .. rng.Next 4 -> rng.Next 512 |]
            let n = rng.Next(0, 40)
            let temperature = if rng.Next 3 = 0 then 0.0 else 0.3 + 2.0 * rng.NextDouble()
            let topK = if rng.Next 2 = 0 then None else Some(rng.Next(1, 50))
            let stops = [ for _ in 1 .. rng.Next 3 -> [| 2; 261; 267; 376; 403 |].[rng.Next 5] ]
            let useCache = rng.Next 2 = 0
            let settings =
                GenerationSettings(MaxNewTokens = n, Temperature = temperature, TopK = Option.toNullable topK,
                                   Seed = Nullable(int64 seed), UseKvCache = useCache)
            for s in stops do settings.StopTokens.Add s
            let options =
                { GenerationCore.GenerateOptions.Greedy with
                    MaxNewTokens = n; Temperature = temperature; TopK = topK; Seed = Some(int64 seed)
                    StopTokens = set stops; UseKvCache = useCache }
            let expected = GenerationCore.generate m options prompt
            let actual = model.Generate(prompt, settings)
            Expect.sequenceEqual actual.Tokens expected.Tokens "tokens"
            Expect.equal actual.PromptLength expected.PromptLength "prompt length"
            Expect.sequenceEqual actual.NewTokens expected.NewTokens "new tokens"
            let expectedStop = match expected.Stop with GenerationCore.StopToken t -> Nullable t | GenerationCore.ReachedMaxNewTokens -> Nullable()
            Expect.equal actual.StopToken expectedStop "stop reason"

        test "Generate(text) decodes the continuation of the prompt as a document; hooks steer generation as in the core" {
            use model = LanguageModel.Load(stories260K (), cpu)
            use m = Transcoders.Models.Llama2c.load (stories260K ()) cpu
            let tokenizer = TextTokenizer.Llama2c(tok512 (), model.Config.VocabSize)
            let core = TokCore.llama2c (tok512 ()) m.Config.VocabSize
            let text = model.Generate("Once upon a time", tokenizer, GenerationSettings.Greedy 15)
            let expected = TokCore.decode core (GenerationCore.greedy m 15 (TokCore.encodeDocument core true false "Once upon a time"))
            Expect.equal text expected "text"
            Expect.stringStarts text "Once upon a time" "starts with the prompt"
            let steer (t: torch.Tensor) = t * 3.0
            let settings = GenerationSettings.Greedy 12
            settings.Hooks.[HookNamesCore.residPost 1] <- hookFn steer
            let steered = model.Generate([| 1 |], settings)
            let coreSteered = GenerationCore.generate m { GenerationCore.GenerateOptions.Greedy with MaxNewTokens = 12; Hooks = [ HookNamesCore.residPost 1, steer ] } [| 1 |]
            Expect.sequenceEqual steered.Tokens coreSteered.Tokens "steered tokens"
            let sampled = model.Generate([| 1 |], GenerationSettings.Sampling(12, 1.0, Nullable 5, Nullable 3L))
            let coreSampled = GenerationCore.generate m { GenerationCore.GenerateOptions.Greedy with MaxNewTokens = 12; Temperature = 1.0; TopK = Some 5; Seed = Some 3L } [| 1 |]
            Expect.sequenceEqual sampled.Tokens coreSampled.Tokens "sampled tokens"
        }

        test "Save and Load keep the weights and the tokenizer; Inspect = ModelFiles.inspect" {
            use model = LanguageModel.Load(stories260K (), cpu)
            Expect.isNull (box model.Tokenizer) "a llama2.c file carries no tokenizer"
            model.Tokenizer <- TextTokenizer.Llama2c(tok512 (), model.Config.VocabSize)
            use dir = new TempDir()
            model.Save dir.Path
            use loaded = LanguageModel.Load(dir.Path, cpu)
            Expect.equal loaded.Tokenizer.Name "llama2c(512)" "tokenizer kept"
            Expect.sequenceEqual (loaded.Tokenizer.Encode "Once upon a time") (model.Tokenizer.Encode "Once upon a time") "same encoding"
            Expect.equal (loaded.Config.ToCore()) (model.Config.ToCore()) "configuration"
            Expect.equal loaded.ParameterCount model.ParameterCount "parameter count"
            Expect.equal loaded.ParameterCount (TransformerCore.parameterCount model.Core) "the core's count"
            Expect.equal (loaded.Device.``type``) DeviceType.CPU "device"
            Expect.sequenceEqual loaded.HookNames (HookNamesCore.all model.Core.Config) "hook names"
            for a, b in Seq.zip model.NamedParameters loaded.NamedParameters do
                Expect.equal a.Key b.Key "parameter order"
                Expect.isTrue (identical a.Value b.Value) a.Key
            Expect.sequenceEqual (model.NamedParameters |> Seq.map (fun kv -> kv.Key)) (TransformerCore.parameters model.Core |> List.map fst) "the core's names"
            Expect.isTrue (obj.ReferenceEquals(model.Module, model.Core)) "the module is the core model"
            for path in [ stories260K (); dir.Path; fixture "hf-gpt2-tiny"; fixture "hf-llama-tiny" ] do
                let info = LanguageModel.Inspect path
                let expected = ModelFilesCore.inspect path
                Expect.equal (info.Config.ToCore()) expected.Config path
                Expect.equal info.ParameterCount expected.ParameterCount path
                Expect.equal info.Path expected.Path path
                let format, architecture =
                    match expected.Kind with
                    | ModelFilesCore.Native -> CheckpointFormat.Native, null
                    | ModelFilesCore.HuggingFace a -> CheckpointFormat.HuggingFace, a
                    | ModelFilesCore.Llama2c -> CheckpointFormat.Llama2c, null
                Expect.equal (info.Format, info.Architecture) (format, architecture) path
                Expect.equal (Option.ofObj info.TokenizerJson) (expected.Tokenizer |> Option.map (fun e -> e.GetRawText())) path
                Expect.equal (Option.ofObj info.TrainingJson) (expected.Training |> Option.map (fun e -> e.GetRawText())) path
        }

        test "a Hugging Face folder loads as ModelFiles.load loads it" {
            for name in [ "hf-gpt2-tiny"; "hf-llama-tiny" ] do
                use model = LanguageModel.Load(fixture name, cpu)
                let m, _ = ModelFilesCore.load (fixture name) cpu
                use m = m
                use tokens = randomTokens 3 m.Config.VocabSize 1 (min m.Config.NCtx 7)
                use a = model.Logits tokens
                use b = TransformerCore.forward m tokens
                Expect.isTrue (identical a b) name
        }

        testSequenced <| test "Create with a seed is reproducible (sequenced: it uses torch's global generator)" {
            let mc = ModelConfig.Llama()
            mc.NLayers <- 1
            Torch.Seed 5L
            use a = LanguageModel.Create(mc, Torch.Cpu)
            Torch.Seed 5L
            use b = LanguageModel.Create(mc)
            for x, y in Seq.zip a.NamedParameters b.NamedParameters do
                Expect.isTrue (identical x.Value y.Value) x.Key
            Expect.equal a.ParameterCount mc.ParameterCount "parameter count"
        }
    ]

// ---------------------------------------------------------------------------------------------- text

let private compactVocab =
    lazy (
        let dir = Path.Combine(Path.GetTempPath(), "transcoders-facade-" + Guid.NewGuid().ToString("N").[..7])
        Directory.CreateDirectory dir |> ignore
        try
            let file = Path.Combine(dir, "stories.txt")
            File.WriteAllText(file, String.Join("", TokenizerTests.tinyStories 40 |> Array.map (fun s -> s + "\n<|endoftext|>\n")))
            let facade = CompactVocabulary.Build(300, [ file ])
            let core = CorpusCore.buildCompactVocab (Gpt2Core.get ()) 300 [ file ]
            facade, core
        finally
            Directory.Delete(dir, true))

let private tokenizerPairs () =
    let compact, compactCore = compactVocab.Force()
    [ TextTokenizer.Gpt2(), TokCore.gpt2 ()
      TextTokenizer.Llama2c(tok512 (), 512), TokCore.llama2c (tok512 ()) 512
      compact.ToTokenizer(), TokCore.compact compactCore ]

let textTests =
    testList "Text" [
        testPropertyWithConfig (config 100) "TextTokenizer encodes and decodes as Tokenizer does (GPT-2, llama2.c, compact)"
        <| Prop.forAll (Arb.fromGen TokenizerTests.validText) (fun s ->
            for tok, core in tokenizerPairs () do
                let ids = tok.Encode s
                Expect.sequenceEqual ids (TokCore.encode core s) (tok.Name + " encode")
                Expect.sequenceEqual (tok.EncodeDocument s) (TokCore.encodeDocument core true false s) (tok.Name + " document")
                Expect.sequenceEqual (tok.EncodeDocument(s, false, true)) (TokCore.encodeDocument core false true s) (tok.Name + " document with EOS")
                Expect.equal (tok.Decode ids) (TokCore.decode core ids) (tok.Name + " decode")
                Expect.equal (tok.Decode(List<int>(ids))) (TokCore.decode core ids) (tok.Name + " decode of a list")
                for id in Array.truncate 5 ids do
                    Expect.equal (tok.TokenText id) (TokCore.tokenText core id) (tok.Name + " token text"))

        test "special ids, sizes, names and saved descriptions are the core's" {
            use dir = new TempDir()
            for tok, core in tokenizerPairs () do
                Expect.equal tok.VocabSize (TokCore.vocabSize core) "vocab size"
                Expect.equal (tok.Bos, tok.Eos, tok.Pad, tok.Unk)
                             (Option.toNullable (TokCore.bos core), Option.toNullable (TokCore.eos core),
                              Option.toNullable (TokCore.pad core), Option.toNullable (TokCore.unk core)) "specials"
                Expect.equal tok.Name (TokCore.describe core) "name"
                Expect.equal (tok.ToString()) tok.Name "ToString"
                Expect.equal (tok.ToJson()) ((TokCore.toJson core).ToJsonString()) "JSON"
                let path = dir.File(tok.Name + ".json")
                tok.Save path
                let back = TextTokenizer.Load path
                Expect.equal back.Name tok.Name "loaded name"
                Expect.sequenceEqual (back.Encode "Once upon a time, Tim saw a cat.") (tok.Encode "Once upon a time, Tim saw a cat.") "loaded encoding"
            Expect.isNull (box (TextTokenizer.Gpt2().CompactVocabulary)) "GPT-2 has no compact vocabulary"
        }

        test "CompactVocabulary is the core's vocabulary" {
            let v, core = compactVocab.Force()
            Expect.sequenceEqual v.BaseIds core.BaseIds "base ids"
            Expect.equal (v.Size, v.Begin, v.End, v.Pad, v.Unk, v.BaseName, v.BaseVocabSize)
                         (core.Size, core.Begin, core.End, core.Pad, core.Unk, core.Base, core.BaseVocabSize) "sizes and specials"
            Expect.equal (v.SpecialName v.Pad) "[PAD]" "special name"
            Expect.isNull (v.SpecialName 0) "an ordinary id has no special name"
            Expect.isTrue (v.IsSpecial v.Unk && not (v.IsSpecial 0)) "IsSpecial"
            let gpt2Ids = Gpt2Core.encode (Gpt2Core.get ()) "Once upon a time, a zebra named Quetzalcoatl flew."
            let compact = v.ToCompact gpt2Ids
            Expect.sequenceEqual compact (CompactCore.toCompact core gpt2Ids) "to compact"
            let ordinary = compact |> Array.filter (fun i -> not (v.IsSpecial i))
            Expect.sequenceEqual (v.ToBase ordinary) (CompactCore.toBase core ordinary) "to base"
            Expect.equal (v.Coverage compact) (CompactCore.coverage core compact) "coverage"
            Expect.sequenceEqual (v.ToTokenizer().CompactVocabulary.BaseIds) core.BaseIds "the tokenizer's vocabulary"
            use dir = new TempDir()
            v.Save(dir.File "v.json")
            Expect.sequenceEqual (CompactVocabulary.Load(dir.File "v.json")).BaseIds core.BaseIds "saved and loaded"
            let chosen = CompactVocabulary.FromGpt2Ids [| 464; 3797; 13 |]
            Expect.equal (chosen.Size, chosen.ToCompact [| 3797; 0 |]) (7, [| 1; 6 |]) "explicit ids, others [UNK]"
        }

        test "Corpus: stories, statistics and shards as the F# functions make them" {
            use dir = new TempDir()
            let stories = TokenizerTests.tinyStories 60
            let a, b = dir.File "a.txt", dir.File "b.txt"
            File.WriteAllText(a, String.Join("", stories[..44] |> Array.map (fun s -> s + "\n<|endoftext|>\n")))
            File.WriteAllText(b, String.Join("", stories[45..] |> Array.map (fun s -> s + "\n<|endoftext|>\n")))
            let files = [ a; b ]
            let triple (source: string, index: int, text: string) = source, index, text
            Expect.sequenceEqual (Corpus.ReadStories files |> Seq.map (fun s -> triple (s.Source, s.Index, s.Text)))
                                 (CorpusCore.readAllStories files |> Seq.map (fun s -> triple (s.Source, s.Index, s.Text))) "stories"
            Expect.sequenceEqual (Corpus.ReadStories a |> Seq.map (fun s -> s.Text)) stories[..44] "one file"
            for tok, core in tokenizerPairs () do
                let s = Corpus.Stats(tok, files)
                let e = CorpusCore.stats core files
                Expect.equal (s.Files, s.Stories, s.Characters, s.Tokens, s.DistinctTokens, Option.ofNullable s.Coverage)
                             (e.Files, e.Stories, e.Characters, e.Tokens, e.DistinctTokens, e.Coverage) (tok.Name + " statistics")
            let gpt2, gpt2Core = TextTokenizer.Gpt2(), TokCore.gpt2 ()
            Expect.sequenceEqual (Corpus.Tokenize(gpt2, stories, false, true)) (CorpusCore.tokenize gpt2Core false true stories) "tokenize"
            let rule = SplitRule.HeldOut(0.3, 5L)
            for s in CorpusCore.readAllStories files do
                let expected = if CorpusCore.assign (CorpusCore.HeldOut(0.3, 5L)) s = CorpusCore.Validation then CorpusSplit.Validation else CorpusSplit.Train
                Expect.equal (Corpus.SplitOf(rule, Story(s.Source, s.Index, s.Text))) expected "split of a story"
            Expect.equal rule.Description (CorpusCore.HeldOut(0.3, 5L)).Describe "rule description"
            let options = ShardOptions(Split = rule, AddEos = true, TokensPerShard = 2000L)
            let prepared = Corpus.PrepareShards(gpt2, files, dir.File "facade", options)
            let train, valid =
                ShardsCore.prepare gpt2Core files { Split = CorpusCore.HeldOut(0.3, 5L); AddBos = true; AddEos = true; TokensPerShard = 2000L } (dir.File "core")
            for split, info, meta in [ "train", prepared.Train, train; "validation", prepared.Validation, valid ] do
                let folder = dir.File("facade/" + split)
                Expect.sequenceEqual (TokenShards.ReadTokens folder) (ShardsCore.readTokens (dir.File("core/" + split))) (split + " tokens")
                let read = TokenShards.ReadInfo folder
                for i in [ info; read ] do
                    Expect.equal (i.Split, i.SplitRule, i.TokenizerName, i.TokenizerJson, i.VocabSize, i.DType, i.Bos, i.Eos, i.Documents, i.Tokens)
                                 (meta.Split, meta.SplitRule, meta.TokenizerName, meta.TokenizerJson, meta.VocabSize, meta.DType.Name, meta.Bos, meta.Eos, meta.Documents, meta.Tokens) split
                    Expect.sequenceEqual (i.Shards |> Seq.map (fun s -> s.File, s.Tokens)) (meta.Shards |> List.map (fun s -> s.File, s.Tokens)) (split + " shards")
                    Expect.sequenceEqual (i.Sources |> Seq.map (fun s -> s.Path, s.Bytes)) (meta.Sources |> List.map (fun s -> s.Path, s.Bytes)) (split + " sources")
                Expect.equal (TokenShards.ReadTokenizer(folder).Name) "gpt2" "recorded tokenizer"
            Expect.equal (prepared.Train.Documents + prepared.Validation.Documents) 60L "every story in one split"
            let defaults = ShardOptions()
            Expect.equal (defaults.AddBos, defaults.AddEos, defaults.TokensPerShard, defaults.Split.Description)
                         (ShardsCore.PrepareOptions.Default.AddBos, ShardsCore.PrepareOptions.Default.AddEos,
                          ShardsCore.PrepareOptions.Default.TokensPerShard, ShardsCore.PrepareOptions.Default.Split.Describe) "default options"
            let docs = [ [| 50256; 1; 2; 3 |]; [| 50256; 4 |] ]
            let written = TokenShards.Write(dir.File "written", gpt2, docs, split = "validation", sourceFiles = [ a ])
            Expect.sequenceEqual (TokenShards.ReadTokens(dir.File "written")) (Array.concat docs) "written tokens"
            Expect.equal (written.Split, written.Documents, written.Sources.[0].Path) ("validation", 2L, a) "written meta"
            Expect.sequenceEqual Corpus.ShippedFiles (CorpusCore.shippedFiles ()) "shipped files"
            Expect.equal Corpus.ShippedValidationFile CorpusCore.shippedValidationFile "validation file"
        }

        test "TokenBatches and PackedRows give the batches Batches gives" {
            let stream = Array.init 500 (fun i -> (i * 7919) % 97)
            let same (x: TokenBatch) (y: BatchesCore.Batch) what =
                Expect.isTrue (identical x.Inputs y.Inputs && identical x.Targets y.Targets) what
            use x = TokenBatches.RandomWindows(stream, 4, 8, 3L, 11L, cpu)
            use y = BatchesCore.randomWindows stream 4 8 3L 11L cpu
            same x y "random windows"
            Expect.sequenceEqual (TokenBatches.WindowStarts(500, 4, 8, 3L, 11L)) (BatchesCore.windowStarts 500 4 8 3L 11L) "window starts"
            let facade = List.ofSeq (TokenBatches.Sequential(stream, 6, 16, cpu))
            let core = List.ofSeq (BatchesCore.sequential stream 6 16 cpu)
            Expect.equal facade.Length core.Length "sequential batches"
            for f, c in List.zip facade core do
                same f c "sequential"
                f.Dispose()
                (c :> IDisposable).Dispose()
            Expect.equal (TokenBatches.SequentialTargets 500) (BatchesCore.sequentialTargets 500) "targets"
            let docs = TokenBatches.SplitDocuments(0, stream)
            Expect.sequenceEqual docs (BatchesCore.splitDocuments 0 stream) "documents"
            let rows = PackedRows(docs, 8, 5L, Nullable 1, Nullable())
            let coreRows = BatchesCore.PackedRows(docs, 8, 5L, bos = 1)
            Expect.equal (rows.EpochLength, rows.RowsPerEpoch, rows.Ctx, rows.EpochOf(9L, 4))
                         (coreRows.EpochLength, coreRows.RowsPerEpoch, coreRows.Ctx, coreRows.EpochOf(9L, 4)) "sizes"
            Expect.sequenceEqual (rows.Row 70L) (coreRows.Row 70L) "a row of the second epoch"
            Expect.sequenceEqual (rows.EpochStream 1L) (coreRows.EpochStream 1L) "an epoch"
            use p = rows.Batch(3L, 4, cpu)
            use q = coreRows.Batch(3L, 4, cpu)
            same p q "packed rows"
        }
    ]

// ---------------------------------------------------------------------------------------------- files, devices, errors

let fileTests =
    testList "Files and devices" [
        test "SafetensorsFile writes the bytes Safetensors writes and reads what it reads" {
            use dir = new TempDir()
            use g = new torch.Generator(5UL, cpu)
            let tensors = Dictionary<string, torch.Tensor>()
            tensors.["w"] <- torch.randn([| 3L; 4L |], generator = g)
            tensors.["ids"] <- torch.arange(10L)
            tensors.["half"] <- torch.randn([| 2L |], generator = g).to_type(torch.bfloat16)
            tensors.["mask"] <- torch.tensor([| true; false; true |])
            let metadata = dict [ "format", "pt"; "note", "facade" ]
            SafetensorsFile.Save(dir.File "facade.safetensors", tensors, metadata)
            SafetensorsCore.save (dir.File "core.safetensors") (Map.ofSeq (metadata |> Seq.map (fun kv -> kv.Key, kv.Value)))
                                 [ for kv in tensors -> kv.Key, kv.Value ]
            Expect.sequenceEqual (File.ReadAllBytes(dir.File "facade.safetensors")) (File.ReadAllBytes(dir.File "core.safetensors")) "same bytes"
            let loaded = SafetensorsFile.Load(dir.File "facade.safetensors")
            let core = SafetensorsCore.load (dir.File "facade.safetensors") cpu
            Expect.sequenceEqual loaded.Keys (core |> List.map fst) "names in header order"
            for name, t in core do
                Expect.isTrue (identical loaded.[name] t) name
                Expect.isTrue (identical loaded.[name] tensors.[name]) (name + " round trip")
                use one = SafetensorsFile.LoadTensor(dir.File "facade.safetensors", name, cpu)
                Expect.isTrue (identical one t) (name + " alone")
            Expect.sequenceEqual (SafetensorsFile.ReadMetadata(dir.File "facade.safetensors") |> Seq.sortBy (fun kv -> kv.Key) |> Seq.map (fun kv -> kv.Key, kv.Value))
                                 (metadata |> Seq.sortBy (fun kv -> kv.Key) |> Seq.map (fun kv -> kv.Key, kv.Value)) "metadata"
            use reader = SafetensorsCore.Reader.Open(dir.File "facade.safetensors")
            Expect.sequenceEqual (SafetensorsFile.ReadHeader(dir.File "facade.safetensors") |> Seq.map (fun e -> e.Name, e.DType, List.ofArray e.Shape, e.ByteLength))
                                 (reader.Entries |> List.map (fun e -> e.Name, e.DType.Name, List.ofArray e.Shape, e.ByteLength)) "header"
            SafetensorsFile.Save(dir.File "plain.safetensors", tensors)
            Expect.equal (SafetensorsFile.ReadMetadata(dir.File "plain.safetensors")).Count 0 "no metadata"
            for t in Seq.append loaded.Values tensors.Values do t.Dispose()
            for _, t in core do t.Dispose()
        }

        test "Torch names devices as Device does; Paths finds the shipped data" {
            Expect.equal (Torch.Device("cpu").``type``) DeviceType.CPU "cpu"
            Expect.equal (Torch.Device().``type``) (DeviceCore.resolve DeviceCore.Auto).``type`` "auto"
            Expect.equal Torch.CudaAvailable (torch.cuda.is_available ()) "CUDA availability"
            let expected = raised "core" (fun () -> DeviceCore.parse "gpu" |> ignore)
            let actual = raised "facade" (fun () -> Torch.Device "gpu" |> ignore)
            Expect.equal (actual.GetType(), actual.Message) (expected.GetType(), expected.Message) "same error"
            Expect.equal (Paths.Data "models") (Transcoders.Files.Paths.data "models") "data"
            Expect.equal Paths.DataDirectory (Transcoders.Files.Paths.dataDir ()) "data folder"
            Expect.equal Paths.CacheDirectory (Transcoders.Files.Paths.cacheDir ()) "cache folder"
            Expect.equal Paths.RepositoryRoot repoRoot "repository root"
        }

        test "errors from the core pass through unchanged" {
            use dir = new TempDir()
            File.WriteAllText(dir.File "bad.json", "{ \"kind\": \"gpt3\" }")
            File.WriteAllText(dir.File "bad.safetensors", "not a safetensors file")
            use m = Transcoders.Models.Llama2c.load (stories260K ()) cpu
            use model = LanguageModel.Load(stories260K (), cpu)
            let cases : (string * (unit -> unit) * (unit -> unit)) list =
                [ ("missing model",
                   (fun () -> LanguageModel.Load(dir.File "missing", cpu).Dispose()),
                   (fun () -> (fst (ModelFilesCore.load (dir.File "missing") cpu)).Dispose()))
                  ("bad tokenizer description",
                   (fun () -> TextTokenizer.Load(dir.File "bad.json") |> ignore),
                   (fun () -> TokCore.load (dir.File "bad.json") |> ignore))
                  ("llama2.c tokenizer of another size",
                   (fun () -> TextTokenizer.Llama2c(tok512 (), 600) |> ignore),
                   (fun () -> TokCore.llama2c (tok512 ()) 600 |> ignore))
                  ("bad safetensors file",
                   (fun () -> SafetensorsFile.Load(dir.File "bad.safetensors") |> ignore),
                   (fun () -> SafetensorsCore.load (dir.File "bad.safetensors") cpu |> ignore))
                  ("empty prompt",
                   (fun () -> model.Generate(Array.empty<int>) |> ignore),
                   (fun () -> GenerationCore.generate m GenerationCore.GenerateOptions.Greedy [||] |> ignore))
                  ("token out of range",
                   (fun () -> model.Logits([| 1; 9999 |]).Dispose()),
                   (fun () -> (TransformerCore.forward m (torch.tensor([| 1L; 9999L |]))).Dispose())) ]
            for what, facade, core in cases do
                let expected = raised (what + " (core)") core
                let actual = raised what facade
                Expect.equal (actual.GetType(), actual.Message) (expected.GetType(), expected.Message) what
                Expect.notEqual (actual.GetType()) typeof<Exception> (what + ": a specific exception")
        }
    ]

let tests = testList "C# facade" [ exampleTests; configTests; modelTests; textTests; fileTests; coderTests ]
