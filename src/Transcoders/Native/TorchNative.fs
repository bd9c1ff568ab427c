/// Makes TorchSharp's native glue loadable before the first tensor is made.
///
/// The build already patches every output folder (build/TorchSharpNative.targets). This covers the
/// rest: a script or program that loads TorchSharp from a folder the build never saw (for example
/// `dotnet fsi` with `#r "nuget: TorchSharp"`). Call `ensureLoadable ()` before touching `torch`.
module Transcoders.Native.TorchNative

open System.IO
open System.Runtime.InteropServices

let mutable private checkedOnce = false
let private gate = obj ()

/// Folders where TorchSharp may look for libLibTorchSharp.so: next to TorchSharp.dll and its
/// runtimes/linux-x64/native and cpu/ subfolders.
let private candidateFolders () =
    let asm = typeof<TorchSharp.torch.Tensor>.Assembly.Location
    if System.String.IsNullOrEmpty asm then []
    else
        let dir = Path.GetDirectoryName asm
        [ dir; Path.Combine(dir, "cpu"); Path.Combine(dir, "runtimes", "linux-x64", "native") ]
        |> List.filter Directory.Exists

/// Weakens the GLIBCXX_3.4.32 requirement in the glue TorchSharp will load, when the system needs it, and loads the
/// patched copy. Idempotent, cheap after the first call, and thread-safe (the first caller works, others wait).
let private patchAndLoad () =
    if System.OperatingSystem.IsLinux() && ElfVerneed.systemNeedsPatch () then
        for dir in candidateFolders () do
            for f in Directory.EnumerateFiles(dir, "libLibTorchSharp.so", SearchOption.TopDirectoryOnly) do
                try ElfVerneed.weaken f ElfVerneed.TorchSharpLibrary ElfVerneed.TorchSharpVersion |> ignore
                with :? System.UnauthorizedAccessException | :? IOException -> ()
    // Hosts without a deps.json (dotnet fsi) miss runtimes/linux-x64/native and fall back to copying the
    // unpatched glue from the NuGet cache. Loading the patched copy first by full path makes TorchSharp's
    // later load by name resolve to it (same soname).
    if System.OperatingSystem.IsLinux() then
        candidateFolders ()
        |> List.map (fun d -> Path.Combine(d, "libLibTorchSharp.so"))
        |> List.filter File.Exists
        |> List.rev // runtimes/linux-x64/native first: the build's patched copy with libtorch beside it
        |> List.tryPick (fun f ->
            match NativeLibrary.TryLoad f with
            | true, h -> Some h
            | _ -> None)
        |> ignore

let ensureLoadable () =
    if not (System.Threading.Volatile.Read &checkedOnce) then
        lock gate (fun () ->
            if not checkedOnce then
                patchAndLoad ()
                // TorchSharp loads its native backend lazily, on the first tensor, without a lock: threads that
                // make their first tensors at the same time load it concurrently (a rare segmentation fault in the
                // parallel test suite). Load it here, once, while every other caller waits.
                TorchSharp.torch.InitializeDeviceType TorchSharp.DeviceType.CPU
                TorchSharp.torch.cuda.is_available () |> ignore
                System.Threading.Volatile.Write(&checkedOnce, true))
