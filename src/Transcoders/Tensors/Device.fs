/// The one device a run uses, chosen once; seeds; thread count.
module Transcoders.Tensors.Device

open TorchSharp
open Transcoders.Native

/// Which device to run on. `Auto` picks CUDA when available.
type DeviceChoice =
    | Cpu
    | Cuda of index: int
    | Auto

/// Parses "cpu", "cuda", "cuda:1" or "auto".
let parse (s: string) =
    match s.Trim().ToLowerInvariant() with
    | "cpu" -> Cpu
    | "auto" | "" -> Auto
    | "cuda" -> Cuda 0
    | c when c.StartsWith "cuda:" ->
        match System.Int32.TryParse(c.Substring 5) with
        | true, i when i >= 0 -> Cuda i
        | _ -> invalidArg "device" (sprintf "unknown device '%s': expected cpu, cuda, cuda:N or auto" s)
    | _ -> invalidArg "device" (sprintf "unknown device '%s': expected cpu, cuda, cuda:N or auto" s)

/// Makes sure TorchSharp's native library loads (Debian 12 fix at run time, see TorchNative).
let init () = TorchNative.ensureLoadable ()

/// Resolves a choice to a torch device, failing clearly when CUDA is asked for and absent.
let resolve (choice: DeviceChoice) : torch.Device =
    init ()
    match choice with
    | Cpu -> torch.CPU
    | Auto -> if torch.cuda.is_available () then torch.CUDA else torch.CPU
    | Cuda i ->
        if not (torch.cuda.is_available ()) then
            failwith "CUDA was requested but is not available: install the TorchSharp-cuda-linux backend (README, GPU) or use --device cpu"
        torch.device ("cuda:" + string i)

/// Seeds torch's generators (CPU and CUDA) and the calling flow's own (`Rng`), so runs are reproducible on the CPU
/// even when other runs in the same process draw at the same time.
let seed (s: int64) =
    init ()
    Rng.seed s

/// Sets torch's intra-op thread count (0 leaves the default, the core count).
let setThreads (n: int) =
    init ()
    if n > 0 then torch.set_num_threads n
