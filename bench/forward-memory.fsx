// Peak resident memory of one forward pass over a long prompt, on a model shaped like the graph bench's fixture
// (4 layers, d_model 128, 4 heads, d_mlp 512, vocabulary 4,096; random weights), under torch.no_grad:
//   - plain: `Transformer.forward` (fused attention, nothing cached);
//   - clean run: `Transformer.run` caching what `LocalReplacement.create` caches (queries, keys, patterns, MLP inputs
//     and outputs, normalisation scales), which makes the attention compute its [heads, p, p] scores explicitly.
// Build first (dotnet build src/Transcoders -c Release), then:
//   dotnet fsi bench/forward-memory.fsx [tokens ...]        (default 1024 4096)
#load "../scripts/load.fsx"

open System
open System.IO
open TorchSharp
open Transcoders.Models

let lengths =
    match fsi.CommandLineArgs |> Array.skip 1 |> Array.map int |> List.ofArray with
    | [] -> [ 1024; 4096 ]
    | ls -> ls

let mib (field: string) =
    File.ReadLines "/proc/self/status"
    |> Seq.find (fun l -> l.StartsWith(field + ":"))
    |> fun l -> float (l.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1]) / 1024.0

let settle () =
    GC.Collect()
    GC.WaitForPendingFinalizers()
    GC.Collect()
    Transcoders.Native.Malloc.trim () |> ignore

/// Peak resident memory above the settled baseline while `f` runs (VmHWM reset at the baseline), in MiB.
let peakAbove (f: unit -> unit) =
    settle ()
    let baseline = mib "VmRSS"
    File.WriteAllText("/proc/self/clear_refs", "5")
    f ()
    mib "VmHWM" - baseline

Transcoders.Tensors.Device.seed 0L
let config =
    { TransformerConfig.gpt2 with
        DModel = 128; NLayers = 4; NHeads = 4; NKvHeads = 4; DMlp = 512; NCtx = List.max lengths; VocabSize = 4096; Dropout = 0.0 }
let model = Transformer.create config torch.CPU
model.eval ()
let c = config
let cleanRunNames =
    [ yield HookNames.residPre 0
      for l in 0 .. c.NLayers - 1 do
          yield! [ HookNames.attnQ l; HookNames.attnK l; HookNames.pattern l; HookNames.mlpIn l; HookNames.mlpOut l
                   HookNames.ln1Scale l; HookNames.ln2Scale l ]
      yield HookNames.lnFinalScale ]

printfn "forward pass peak above the settled baseline (MiB), %d layers, d_model %d, %d heads, d_mlp %d, vocab %d"
    c.NLayers c.DModel c.NHeads c.DMlp c.VocabSize
for n in lengths do
    let rng = Random(n)
    let tokens = torch.tensor(Array.init n (fun _ -> int64 (rng.Next c.VocabSize))).unsqueeze 0
    let plain () =
        use _ = torch.no_grad ()
        use scope = torch.NewDisposeScope()
        Transformer.forward model tokens |> ignore
    let clean () =
        use _ = torch.no_grad ()
        use r = Transformer.run model { RunOptions.Default with Cache = Set.ofList cleanRunNames } tokens
        ()
    plain ()   // warm-up: code paths and thread pools
    let p = peakAbove plain
    let k = peakAbove clean
    let scoreMiB = float (int64 c.NHeads * int64 n * int64 n * 4L) / 1048576.0
    printfn "  %5d tokens: plain %7.0f MiB, clean run %7.0f MiB (one [heads, p, p] float32 tensor: %.0f MiB)" n p k scoreMiB
    tokens.Dispose()
