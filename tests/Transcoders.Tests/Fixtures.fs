/// What the tests share: paths and scratch folders, tensor comparisons, small random models and coders. Compiled first;
/// test files open it and never each other.
namespace Transcoders.Tests

open System
open System.IO
open Expecto
open TorchSharp
open Transcoders.Files
open Transcoders.Models
open Transcoders.Coders

[<AutoOpen>]
module Fixtures =

    // ---- paths and scratch space

    let repoRoot =
        match Paths.tryRepoRoot () with
        | Some r -> r
        | None -> failwith "tests must run inside the repository (no Transcoders.sln found above the test binary)"

    /// A file under tests/fixtures.
    let fixture (relative: string) = Path.Combine(repoRoot, "tests", "fixtures", relative)

    /// A fresh temporary folder, removed when disposed.
    type TempDir() =
        let path = Path.Combine(Path.GetTempPath(), "transcoders-tests-" + System.Guid.NewGuid().ToString("N").[..11])
        do Directory.CreateDirectory path |> ignore
        member _.Path = path
        member _.File(name: string) = Path.Combine(path, name)
        interface System.IDisposable with
            member _.Dispose() = try Directory.Delete(path, true) with _ -> ()

    // ---- tensors

    type Tensor = torch.Tensor

    let cpu = torch.CPU

    /// A float as a torch scalar.
    let sc (x: float) : Scalar = Scalar.op_Implicit x

    /// A tensor's values as float64, row-major.
    let values (t: torch.Tensor) : float[] =
        use c = t.detach().cpu().to_type(torch.float64).contiguous()
        c.data<float>().ToArray()

    let maxAbsDiff (a: float[]) (b: float[]) =
        if a.Length <> b.Length then infinity else Array.fold2 (fun m x y -> max m (abs (x - y))) 0.0 a b

    let expectClose (tol: float) (actual: torch.Tensor) (expected: torch.Tensor) (what: string) =
        Expect.sequenceEqual actual.shape expected.shape (what + ": shape")
        let a, e = values actual, values expected
        let scale = max 1.0 (e |> Array.fold (fun m v -> max m (abs v)) 0.0)
        let d = maxAbsDiff a e
        Expect.isLessThanOrEqual d (tol * scale) (sprintf "%s: max |difference| %g (tolerance %g)" what d (tol * scale))

    /// max |a − b| (shapes must agree).
    let maxDiff (a: torch.Tensor) (b: torch.Tensor) =
        Expect.sequenceEqual a.shape b.shape "shapes agree"
        use d = (a - b).abs().max()
        float (d.item<float32> ())

    /// max |a − b| relative to the size of b's values (for logits of random models, which can be large).
    let relDiff (a: torch.Tensor) (b: torch.Tensor) =
        use m = b.abs().max()
        maxDiff a b / max 1.0 (float (m.item<float32> ()))

    let identical (a: torch.Tensor) (b: torch.Tensor) =
        a.shape = b.shape && a.dtype = b.dtype && (use e = a.eq(b).all() in e.item<bool> ())

    // ---- small random models

    /// Model kinds the properties draw from.
    type Kind =
        | GptLike
        | LlamaLike
        | TinyLike

    let kinds = [ GptLike; LlamaLike; TinyLike ]

    /// A small random configuration of one kind (GPT-2-like with various MLPs, Llama-like with grouped-query
    /// attention and either rotary layout, tinymodel-like without normalisation), sometimes with a head size
    /// that does not divide d_model.
    let randomConfig (seed: int) (kind: Kind) : TransformerConfig =
        let rng = Random seed
        let pick (xs: 'a list) = xs.[rng.Next xs.Length]
        let dHead = pick [ 2; 4; 6; 8 ]
        let heads = pick [ 1; 2; 4 ]
        let kv = match kind with LlamaLike -> pick [ for k in 1 .. heads do if heads % k = 0 then k ] | _ -> heads
        let explicitHead = rng.Next 4 = 0
        let dModel = if explicitHead then max 3 (heads * dHead + pick [ -1; 1; 3 ]) else heads * dHead
        let preset = match kind with GptLike -> TransformerConfig.gpt2 | LlamaLike -> TransformerConfig.llama | TinyLike -> TransformerConfig.tinymodel
        { preset with
            DModel = dModel; NLayers = rng.Next(1, 4); NHeads = heads; NKvHeads = kv
            DHead = (if explicitHead then Some dHead else None)
            DMlp = rng.Next(3, 25); NCtx = rng.Next(8, 17); VocabSize = rng.Next(5, 40)
            Positions = (match kind with LlamaLike -> Rotary (pick [ HalfSplit; Interleaved ], pick [ 10000.0; 500.0 ]) | _ -> Learned)
            Mlp = (match kind with GptLike -> pick [ Plain GeluNew; Plain Gelu; Plain Relu; Gated Silu ] | _ -> preset.Mlp)
            TiedUnembed = (match kind with TinyLike -> false | _ -> rng.Next 2 = 0)
            Biases = (match kind with GptLike -> { preset.Biases with Unembed = rng.Next 2 = 0 } | _ -> preset.Biases)
            InitRange = 0.3
            Dropout = pick [ 0.0; 0.1 ] }

    /// A model of `config` whose every parameter is drawn from a private generator seeded by `seed` (so
    /// tests running in parallel stay reproducible): N(0, 0.3) for matrices and biases, 1 + N(0, 0.2) for
    /// norm weights, so that no term of the forward pass hides behind a 0 or a 1. In eval mode (no dropout).
    let randomModel (seed: int) (config: TransformerConfig) =
        let m = Transformer.create config cpu
        m.eval ()
        use g = new torch.Generator(uint64 (int64 seed + 1000000L), cpu)
        use _ = torch.no_grad ()
        for name, p in Transformer.parameters m do
            use noise = torch.randn(p.shape, generator = g)
            let isNormWeight = name.EndsWith "ln1.weight" || name.EndsWith "ln2.weight" || name = "ln_final.weight"
            (if isNormWeight then p.copy_(noise * 0.2 + 1.0) else p.copy_(noise * 0.3)) |> ignore
        m

    let randomTokens (seed: int) (vocab: int) (batch: int) (positions: int) =
        use g = new torch.Generator(uint64 seed, cpu)
        torch.randint(int64 vocab, [| int64 batch; int64 positions |], generator = g)

    /// llama2.c's pretrained stories260K, shipped in data/models.
    let stories260K = Paths.data "models/stories260K/stories260K.bin"

    // ---- small random coders

    /// Fills every parameter with random values (biases included) so that tests exercise every term.
    let randomise (c: Coder) (seed: int64) =
        torch.manual_seed seed |> ignore
        use _ = torch.no_grad ()
        for n, p in c.NamedParameters do
            match n with
            | "log_threshold" -> p.uniform_(-2.0, -0.5) |> ignore
            | _ -> p.normal_(0.0, 0.4) |> ignore

    /// A config of the given kind with small random dimensions.
    let smallConfig (rng: Random) (kind: CoderKind) (activation: int -> CoderActivation) (inputBias: bool) =
        let dIn = rng.Next(3, 9)
        let dOut = if kind = Sae then dIn else rng.Next(3, 9)
        let dSae = rng.Next(6, 17)
        let nL = if kind = CrossLayerTranscoder then rng.Next(2, 4) else 1
        let layers = if kind = CrossLayerTranscoder then Array.init nL id else [| rng.Next(0, 4) |]
        let hookIn = layers |> Array.map (fun l -> if kind = Sae then sprintf "blocks.%d.hook_resid_pre" l else CoderConfig.mlpInHook l)
        let hookOut = if kind = Sae then hookIn else layers |> Array.map CoderConfig.mlpOutHook
        { Kind = kind; Layers = layers; HookIn = hookIn; HookOut = hookOut; DIn = dIn; DOut = dOut; DSae = dSae
          Activation = activation dSae; InputBias = inputBias; Decoder = UnitNorm; Scale = ActivationScale.Ones nL
          FoldedScale = None; Model = "test-model" }
        |> CoderConfig.validate

    /// A random user-layout batch for a config: [B, d] or [B, L, d].
    let batchFor (c: CoderConfig) (b: int) (d: int) =
        if c.Kind = CrossLayerTranscoder then torch.randn([| int64 b; int64 c.NLayers; int64 d |])
        else torch.randn([| int64 b; int64 d |])

    /// A coder with every parameter drawn from a private generator (torch's global one is left alone): N(0, 0.4),
    /// thresholds θ = exp(N(−1.5, 0.3)); a BatchTopK coder gets no threshold yet.
    let randomCoder (seed: int) (cfg: CoderConfig) : Coder =
        use g = new torch.Generator(uint64 (int64 seed + 5000000L), cpu)
        use _ = torch.no_grad ()
        use scope = torch.NewDisposeScope()
        Coder.ofTensors cfg cpu
            [ for n, shape in Coder.ParameterShapes cfg do
                  if n <> "batchtopk_threshold" then
                      let noise = torch.randn(shape, generator = g)
                      yield n, (if n = "log_threshold" then noise * 0.3 - 1.5 else noise * 0.4) ]

    /// A coder config of `kind` over `layers` of a model with this configuration: random width, activation (ReLU,
    /// JumpReLU, TopK), input bias and activation scales (so that every term of the splice is exercised).
    let coderConfig (rng: Random) (c: TransformerConfig) (kind: CoderKind) (layers: int[]) : CoderConfig =
        let d, dSae = c.DModel, rng.Next(4, 13)
        let cfg =
            match kind with
            | Transcoder -> CoderConfig.transcoder "test" layers[0] d dSae
            | SkipTranscoder -> CoderConfig.skipTranscoder "test" layers[0] d dSae
            | CrossLayerTranscoder -> CoderConfig.crossLayer "test" layers d dSae
            | Sae -> CoderConfig.sae "test" (HookNames.attnOut layers[0]) layers[0] d dSae
        let act =
            match rng.Next 3 with
            | 0 -> ReLU
            | 1 -> JumpReLU JumpReLUSpec.Default
            | _ -> TopK(rng.Next(1, dSae + 1))
        let scales () = Array.init layers.Length (fun _ -> 0.5 + 1.5 * rng.NextDouble())
        let sIn = scales ()
        let scale = { In = sIn; Out = (if kind = Sae then sIn else scales ()) }
        CoderConfig.validate { cfg with Activation = act; InputBias = (rng.Next 2 = 0); Scale = scale }

    /// A transcoder that is exactly a plain MLP with biases: W_enc = W_inᵀ, b_enc = b_in, W_dec = W_outᵀ, b_dec = b_out
    /// (with ReLU this reproduces a ReLU MLP, as tinymodel's).
    let exactTranscoder (m: Transformer) (layer: int) : Coder =
        let ps = Transformer.parameters m |> dict
        let p name = ps[sprintf "blocks.%d.mlp.%s" layer name] :> Tensor
        let c = m.Config
        let cfg = { CoderConfig.transcoder "exact" layer c.DModel c.DMlp with InputBias = false; Decoder = Free }
        use _ = torch.no_grad ()
        Coder.ofTensors cfg cpu
            [ "W_enc", p("fc_in.weight").t().unsqueeze(0)
              "b_enc", p("fc_in.bias").unsqueeze(0)
              "W_dec_0", p("fc_out.weight").t().unsqueeze(1)
              "b_dec", p("fc_out.bias").unsqueeze(0) ]

    // ---- threads and planted dictionaries

    /// Runs `f` with torch using `n` CPU threads, then restores the count.
    let withThreads (n: int) (f: unit -> 'a) =
        let before = torch.get_num_threads ()
        torch.set_num_threads n
        try f () finally torch.set_num_threads before

    /// Sparse non-negative codes over `nTrue` features, ~`active` per sample, magnitudes in [0.5, 1.5].
    let sparseCodes (gen: torch.Generator) (b: int) (nTrue: int) (active: float) =
        let mask = torch.rand([| int64 b; int64 nTrue |], generator = gen).lt(sc (active / float nTrue))
        let mags = torch.rand([| int64 b; int64 nTrue |], generator = gen).add(sc 0.5)
        mags * mask

    let unitRows (gen: torch.Generator) (n: int) (d: int) =
        let r = torch.randn([| int64 n; int64 d |], generator = gen)
        r / r.norm(1, true)

    /// Mean over true directions of the best cosine with any learned row.
    let recovery (truth: torch.Tensor) (learned: torch.Tensor) =
        use _ = torch.no_grad ()
        let l = learned / learned.norm(1, true).clamp_min(sc 1e-12)
        let cos = truth.matmul(l.t())
        cos.amax([| 1L |]).mean().item<float32> () |> float

    // ---- child processes

    /// The `dotnet` host running the tests (DOTNET_HOST_PATH when set).
    let dotnetHost () =
        match Environment.GetEnvironmentVariable "DOTNET_HOST_PATH" with
        | null | "" -> "dotnet"
        | p -> p

    /// Runs `dotnet <args>` in `workingDirectory` with extra environment variables; (exit code, stdout, stderr). A run
    /// longer than `timeout` is killed and fails the test.
    let runDotnet (args: string list) (workingDirectory: string) (environment: (string * string) list) (timeout: TimeSpan) =
        let psi = Diagnostics.ProcessStartInfo(dotnetHost (), UseShellExecute = false, RedirectStandardOutput = true,
                                               RedirectStandardError = true, WorkingDirectory = workingDirectory)
        for a in args do psi.ArgumentList.Add a
        for name, value in environment do psi.Environment[name] <- value
        use p = Diagnostics.Process.Start psi
        let out = p.StandardOutput.ReadToEndAsync()
        let err = p.StandardError.ReadToEndAsync()
        if not (p.WaitForExit timeout) then
            p.Kill true
            failtestf "dotnet %s did not finish within %O" (String.Join(" ", args)) timeout
        p.WaitForExit()
        p.ExitCode, out.Result, err.Result

    /// The output folder of a project built next to this test binary's configuration (bin/<Configuration>/<tfm>),
    /// e.g. `builtAssembly "src/Transcoders.Cli" "Transcoders.Cli.dll"`.
    let builtAssembly (project: string) (file: string) =
        let here = DirectoryInfo(Path.TrimEndingDirectorySeparator AppContext.BaseDirectory)
        let tfm, configuration = here.Name, here.Parent.Name
        let path = Path.Combine(repoRoot, project, "bin", configuration, tfm, file)
        if not (File.Exists path) then failtestf "%s is not built (looked for %s); building tests/Transcoders.Tests builds it" file path
        path

/// The old name of the paths part of `Fixtures`, for test files that still open it.
[<Obsolete "open Transcoders.Tests.Fixtures">]
module TestPaths =
    let repoRoot = Fixtures.repoRoot
    let fixture (relative: string) = Fixtures.fixture relative
    type TempDir = Fixtures.TempDir
