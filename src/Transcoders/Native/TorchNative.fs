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
let private loadFolders () =
    let asm = typeof<TorchSharp.torch.Tensor>.Assembly.Location
    if System.String.IsNullOrEmpty asm then []
    else
        let dir = Path.GetDirectoryName asm
        [ dir; Path.Combine(dir, "cpu"); Path.Combine(dir, "runtimes", "linux-x64", "native") ]
        |> List.filter Directory.Exists

/// The NuGet cache's own copy of the glue (…/torchsharp/<v>/runtimes/linux-x64/native beside lib/<tfm>/), which
/// TorchSharp copies into lib/<tfm>/cpu when a script host loads it from the cache: patched there, the copy it makes
/// on a fresh machine's first run is patched too.
let private cacheFolder () =
    let asm = typeof<TorchSharp.torch.Tensor>.Assembly.Location
    if System.String.IsNullOrEmpty asm then []
    else
        [ Path.GetFullPath(Path.Combine(Path.GetDirectoryName asm, "..", "..", "runtimes", "linux-x64", "native")) ]
        |> List.filter Directory.Exists

/// A script host loading TorchSharp from the NuGet cache (`dotnet fsi` with `#r "nuget: …"`) finds no native glue
/// beside TorchSharp.dll, so TorchSharp consolidates the libtorch package's natives and its glue into lib/<tfm>/cpu
/// and loads from there; on a fresh machine that first load fails even with the glue patched, while later runs (which
/// find the folder) load it. So the consolidation is done here first, from the libtorch-cpu package in the same
/// cache (the newest version there), and the patched glue is loaded from it by full path, as on a later run.
let private consolidateForScriptHost () =
    let asm = typeof<TorchSharp.torch.Tensor>.Assembly.Location
    if not (System.String.IsNullOrEmpty asm) then
        let dir = Path.GetDirectoryName asm
        let target = Path.Combine(dir, "cpu")
        let glue = cacheFolder () |> List.map (fun d -> Path.Combine(d, "libLibTorchSharp.so")) |> List.filter File.Exists
        // …/torchsharp/<v>/lib/<tfm> → the packages folder
        let packages = Path.GetFullPath(Path.Combine(dir, "..", "..", "..", ".."))
        let libtorch = Path.Combine(packages, "libtorch-cpu-linux-x64")
        if not (File.Exists(Path.Combine(dir, "libLibTorchSharp.so"))) && not (Directory.Exists target)
           && not glue.IsEmpty && Directory.Exists libtorch then
            let natives =
                Directory.GetDirectories libtorch
                |> Array.map (fun v -> Path.Combine(v, "runtimes", "linux-x64", "native"))
                |> Array.filter Directory.Exists
                |> Array.sortBy (fun d -> System.Version.TryParse(Path.GetFileName(Path.GetDirectoryName(Path.GetDirectoryName(Path.GetDirectoryName d)))) |> function | true, v -> v | _ -> System.Version())
                |> Array.tryLast
            match natives with
            | Some natives ->
                try
                    let staging = target + ".tmp-" + string System.Environment.ProcessId
                    Directory.CreateDirectory staging |> ignore
                    for f in Directory.GetFiles natives do File.Copy(f, Path.Combine(staging, Path.GetFileName f), true)
                    File.Copy(glue.Head, Path.Combine(staging, "libLibTorchSharp.so"), true)
                    Directory.Move(staging, target)
                with :? IOException | :? System.UnauthorizedAccessException -> ()
            | None -> ()

/// Weakens the GLIBCXX_3.4.32 requirement in the glue TorchSharp will load, when the system needs it, and loads the
/// patched copy. Idempotent, cheap after the first call, and thread-safe (the first caller works, others wait).
let private patchAndLoad () =
    if System.OperatingSystem.IsLinux() && ElfVerneed.systemNeedsPatch () then
        for dir in loadFolders () @ cacheFolder () do
            for f in Directory.EnumerateFiles(dir, "libLibTorchSharp.so", SearchOption.TopDirectoryOnly) do
                try ElfVerneed.weaken f ElfVerneed.TorchSharpLibrary ElfVerneed.TorchSharpVersion |> ignore
                with :? System.UnauthorizedAccessException | :? IOException -> ()
    if System.OperatingSystem.IsLinux() then consolidateForScriptHost ()
    // Hosts without a deps.json (dotnet fsi) miss runtimes/linux-x64/native and fall back to copying the
    // glue from the NuGet cache. Loading the patched copy first by full path makes TorchSharp's
    // later load by name resolve to it (same soname).
    if System.OperatingSystem.IsLinux() then
        loadFolders ()
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
