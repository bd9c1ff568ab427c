/// `dotnet run --project bench/Transcoders.Bench -c Release -- lm [options]` (run from the repository root).
module Transcoders.Bench.Program

open System
open Transcoders.Bench

let usage =
    """usage: Transcoders.Bench <lm | memory | coder | coder-memory | coder-profile | graph | graph-fixture> [options]
  lm            LM training tokens/s, ours vs PyTorch (bench/pytorch/lm_step.py), interleaved rounds
  memory        resident memory after N steps vs after the first 200 (must stay within 10%)
  coder         transcoder training step, ours vs PyTorch (bench/pytorch/coder_step.py), interleaved rounds
  coder-memory  resident memory of coder training after N steps vs after the first 200
  coder-profile our coder step split into phases (median ms per phase; --steps steps per case)
  graph         attribution-graph build time vs prompt length, ours vs PyTorch (bench/pytorch/graph_build.py)
  graph-long    long prompts, our side only: memory estimate, build time and peak memory, pruning (--lengths)
  graph-memory  resident memory over repeated builds of one prompt (--length N, --builds N)
  graph-fixture DIR   only write the seeded random model + transcoders the graph bench uses into DIR
coder options (coder, coder-memory):
  --cases LIST        comma-separated relu | topk | groupmax, with +sparse for sparse decoding (relu,topk,topk+sparse)
  --d-model N (256)   --width N[,N..] (8192)   --k N (32)   --batch N (4096)   --lambda X (1e-3, ReLU's L1)
  --dtype fp32|bf16|fp16 (fp32)   --fwd-bwd (also time forward+backward alone)   --matmul-n N (1024)
  --default-malloc    leave glibc's mmap-per-large-block default (else both sides keep freed blocks for reuse)
  --no-trim           coder-memory: sample the working set without malloc_trim first
  --rounds N (5)  --steps N (3; coder-memory: total, 5000)  --warmup N (2)  --threads N (2)  --device D
  --python PATH   --script PATH (bench/pytorch/coder_step.py)
lm/memory options:
  --rounds N          interleaved rounds (5)          --steps N     steps per round (5); for memory: total (2000)
  --warmup N          warmup steps per side (2)       --threads N   torch threads on both sides (2)
  --device D          cpu | cuda | cuda:N (cpu)
  --model M           library (Transcoders.Models.Transformer, default) | bench (Gpt.fs, same architecture)
  --no-block-scope    bench model: one dispose scope per step only (default: also one per block)
  --batch N  --layers N  --d-model N  --heads N  --context N  --vocab N
  --python PATH       (/usr/bin/python3)              --script PATH (bench/pytorch/lm_step.py)
options (graph):
  --model DIR         our checkpoint folder (default: make a seeded random one, see --layers ...)
  --coders P1 P2 ...  transcoder files/folders for it (with --model; one per layer or a cross-layer transcoder)
  --lengths 16,64,256 prompt lengths              --rounds N    timed builds per length and side (3)
  --warmup N          untimed builds per length and side (1)
  --batch-size N      targets per backward pass (GraphConfig.Default: 64)
  --max-features N    influence-ordered cap on feature nodes (GraphConfig.Default: 7500; 0: all active features)
  --no-causal-cone    every backward pass over the whole prompt and model, as circuit-tracer (both sides)
  --no-prune          skip pruning (default: each graph is also pruned, 0.8/0.98, timed separately)
  --no-zero           keep position 0 (default: coder activations and errors zeroed there on both sides)
  --no-agreement      skip the per-length agreement check   --no-bf16   skip the bf16 error line
  --gpt2-small        fixture of GPT-2 small's shape: 12 layers, d 768, 12 heads, vocab 50,257, context 1,024,
                      ReLU transcoders of 24,576 features with ~32 active per token (random weights)
  --length N  --builds N   (graph-memory: prompt length, default 256; builds, default 10)
  --threads N  --device D  --python PATH  --script PATH (bench/pytorch/graph_build.py)  --work DIR
  fixture: --layers 4 --d-model 128 --heads 4 --context 256 --vocab 4096 --d-sae 1024 --k 16 (0: ReLU)
           --active N (ReLU: calibrate biases to ~N active features per token) --seed 0"""

[<EntryPoint>]
let main argv =
    // before libtorch loads: OpenMP threads sleep instead of spinning between parallel regions (both sides)
    Stats.setNativeEnvDefault "OMP_WAIT_POLICY" "PASSIVE"
    Transcoders.Tensors.Device.init ()
    let rec parse (o: LmBench.Options) steps args =
        match args with
        | [] -> o, steps
        | "--rounds" :: v :: rest -> parse { o with Rounds = int v } steps rest
        | "--steps" :: v :: rest -> parse { o with StepsPerRound = int v } (Some(int v)) rest
        | "--warmup" :: v :: rest -> parse { o with WarmupSteps = int v } steps rest
        | "--threads" :: v :: rest -> parse { o with Threads = int v } steps rest
        | "--device" :: v :: rest -> parse { o with Device = v } steps rest
        | "--no-block-scope" :: rest -> parse { o with BlockScope = false } steps rest
        | "--model" :: "library" :: rest -> parse { o with Library = true } steps rest
        | "--model" :: "bench" :: rest -> parse { o with Library = false } steps rest
        | "--batch" :: v :: rest -> parse { o with Batch = int v } steps rest
        | "--layers" :: v :: rest -> parse { o with Model.Layers = int v } steps rest
        | "--d-model" :: v :: rest -> parse { o with Model.DModel = int v } steps rest
        | "--heads" :: v :: rest -> parse { o with Model.Heads = int v } steps rest
        | "--context" :: v :: rest -> parse { o with Model.Context = int v } steps rest
        | "--vocab" :: v :: rest -> parse { o with Model.Vocab = int v } steps rest
        | "--python" :: v :: rest -> parse { o with Python = v } steps rest
        | "--script" :: v :: rest -> parse { o with Script = v } steps rest
        | a :: _ -> failwithf "unknown argument '%s'\n%s" a usage
    let rec parseCoder (o: CoderBench.Options) steps args =
        match args with
        | [] -> o, steps
        | "--cases" :: v :: rest -> parseCoder { o with Cases = [ for c in v.Split(',') -> CoderBench.Case.Parse c ] } steps rest
        | "--d-model" :: v :: rest -> parseCoder { o with DModel = int v } steps rest
        | "--width" :: v :: rest -> parseCoder { o with Widths = [ for w in v.Split(',') -> int w ] } steps rest
        | "--k" :: v :: rest -> parseCoder { o with K = int v } steps rest
        | "--batch" :: v :: rest -> parseCoder { o with Batch = int v } steps rest
        | "--lambda" :: v :: rest -> parseCoder { o with Lambda = float v } steps rest
        | "--dtype" :: v :: rest -> CoderBench.scalarType v |> ignore; parseCoder { o with Dtype = v } steps rest
        | "--fwd-bwd" :: rest -> parseCoder { o with ForwardBackward = true } steps rest
        | "--matmul-n" :: v :: rest -> parseCoder { o with MatmulN = int v } steps rest
        | "--default-malloc" :: rest -> parseCoder { o with RetainMemory = false } steps rest
        | "--no-trim" :: rest -> parseCoder { o with TrimBeforeSample = false } steps rest
        | "--rounds" :: v :: rest -> parseCoder { o with Rounds = int v } steps rest
        | "--steps" :: v :: rest -> parseCoder { o with StepsPerRound = int v } (Some(int v)) rest
        | "--warmup" :: v :: rest -> parseCoder { o with WarmupSteps = int v } steps rest
        | "--threads" :: v :: rest -> parseCoder { o with Threads = int v } steps rest
        | "--device" :: v :: rest -> parseCoder { o with Device = v } steps rest
        | "--python" :: v :: rest -> parseCoder { o with Python = v } steps rest
        | "--script" :: v :: rest -> parseCoder { o with Script = v } steps rest
        | a :: _ -> failwithf "unknown argument '%s'\n%s" a usage
    let rec parseGraph (o: GraphBench.Options) args =
        let ints (v: string) = v.Split(',', StringSplitOptions.RemoveEmptyEntries) |> Array.map int |> List.ofArray
        match args with
        | [] -> o
        | "--model" :: v :: rest -> parseGraph { o with Model = Some v } rest
        | "--coders" :: rest ->
            let paths = rest |> List.takeWhile (fun a -> not (a.StartsWith "--"))
            parseGraph { o with Coders = paths } (List.skip paths.Length rest)
        | "--no-prune" :: rest -> parseGraph { o with Prune = false } rest
        | "--no-causal-cone" :: rest -> parseGraph { o with CausalCone = false } rest
        | "--no-zero" :: rest -> parseGraph { o with ZeroFirst = false } rest
        | "--no-agreement" :: rest -> parseGraph { o with Agreement = false } rest
        | "--no-bf16" :: rest -> parseGraph { o with Bf16 = false } rest
        | "--gpt2-small" :: rest -> parseGraph { o with Fixture = GraphBench.FixtureConfig.Gpt2Small } rest
        | "--active" :: v :: rest -> parseGraph { o with Fixture.Active = int v } rest
        | ("--length" | "--builds") :: _ :: rest -> parseGraph o rest
        | "--lengths" :: v :: rest -> parseGraph { o with Lengths = ints v } rest
        | "--rounds" :: v :: rest -> parseGraph { o with Rounds = int v } rest
        | "--warmup" :: v :: rest -> parseGraph { o with Warmup = int v } rest
        | "--batch-size" :: v :: rest -> parseGraph { o with BatchSize = int v } rest
        | "--max-features" :: v :: rest -> parseGraph { o with MaxFeatureNodes = (if int v > 0 then Some(int v) else None) } rest
        | "--threads" :: v :: rest -> parseGraph { o with Threads = int v } rest
        | "--device" :: v :: rest -> parseGraph { o with Device = v } rest
        | "--python" :: v :: rest -> parseGraph { o with Python = v } rest
        | "--script" :: v :: rest -> parseGraph { o with Script = v } rest
        | "--work" :: v :: rest -> parseGraph { o with WorkDir = Some v } rest
        | "--layers" :: v :: rest -> parseGraph { o with Fixture.Layers = int v } rest
        | "--d-model" :: v :: rest -> parseGraph { o with Fixture.DModel = int v } rest
        | "--heads" :: v :: rest -> parseGraph { o with Fixture.Heads = int v } rest
        | "--context" :: v :: rest -> parseGraph { o with Fixture.Context = int v } rest
        | "--vocab" :: v :: rest -> parseGraph { o with Fixture.Vocab = int v } rest
        | "--d-sae" :: v :: rest -> parseGraph { o with Fixture.DSae = int v } rest
        | "--k" :: v :: rest -> parseGraph { o with Fixture.K = int v } rest
        | "--seed" :: v :: rest -> parseGraph { o with Fixture.Seed = int64 v } rest
        | a :: _ -> failwithf "unknown argument '%s'\n%s" a usage
    match List.ofArray argv with
    | "coder" :: rest ->
        let o, _ = parseCoder CoderBench.Options.Default None rest
        CoderBench.run o
        0
    | "coder-profile" :: rest ->
        let o, _ = parseCoder CoderBench.Options.Default None rest
        CoderBench.profile o
        0
    | "coder-memory" :: rest ->
        let defaults =
            { CoderBench.Options.Default with
                DModel = 128; Widths = [ 1024 ]; Batch = 512; Cases = [ CoderBench.Case.Parse "relu" ]; RetainMemory = false }
        let o, steps = parseCoder defaults None rest
        CoderBench.memoryCheck o o.Widths.Head o.Cases.Head (defaultArg steps 5000) 200 250
    | "graph" :: rest ->
        GraphBench.run (parseGraph GraphBench.Options.Default rest)
    | "graph-long" :: rest ->
        GraphBench.long (parseGraph { GraphBench.Options.Default with Lengths = [ 64; 256; 1024; 4096 ]; Fixture.Context = 4096 } rest)
    | "graph-memory" :: rest ->
        let rec find name dflt = function
            | n :: v :: _ when n = name -> int v
            | _ :: tail -> find name dflt tail
            | [] -> dflt
        GraphBench.memory (parseGraph GraphBench.Options.Default rest) (find "--length" 256 rest) (find "--builds" 10 rest)
    | "graph-fixture" :: dir :: rest ->
        let o = parseGraph GraphBench.Options.Default rest
        let model, coders = GraphBench.makeFixture dir o.Fixture
        printfn "model: %s\ncoders: %s" model (String.concat " " coders)
        0
    | "lm" :: rest ->
        let o, _ = parse LmBench.Options.Default None rest
        LmBench.run o
        0
    | "memory" :: rest ->
        let o, steps = parse LmBench.Options.Default None rest
        LmBench.memoryCheck o (defaultArg steps 2000) 200 100
    | _ ->
        eprintfn "%s" usage
        2
