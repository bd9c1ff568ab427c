/// Small helpers for measuring: medians, the process's memory, environment for native libraries.
module Transcoders.Bench.Stats

open System
open System.Diagnostics
open System.Runtime.InteropServices

let median (xs: float seq) =
    let a = Array.ofSeq xs |> Array.sort
    if a.Length = 0 then nan
    elif a.Length % 2 = 1 then a[a.Length / 2]
    else (a[a.Length / 2 - 1] + a[a.Length / 2]) / 2.0

/// Resident memory of this process now, in MiB (refreshed).
let workingSetMiB () =
    use p = Process.GetCurrentProcess()
    p.Refresh()
    float p.WorkingSet64 / 1048576.0

/// Peak resident memory of this process so far, in MiB.
let peakWorkingSetMiB () =
    use p = Process.GetCurrentProcess()
    p.Refresh()
    float p.PeakWorkingSet64 / 1048576.0

[<DllImport("libc", SetLastError = true)>]
extern int private setenv(string name, string value, int overwrite)

/// Sets an environment variable in the native environment too (.NET's Environment.SetEnvironmentVariable
/// does not reach native libraries on Linux), unless it is already set. Call before libtorch loads.
let setNativeEnvDefault (name: string) (value: string) =
    match Environment.GetEnvironmentVariable name with
    | null | "" ->
        if RuntimeInformation.IsOSPlatform OSPlatform.Linux || RuntimeInformation.IsOSPlatform OSPlatform.OSX then
            setenv (name, value, 0) |> ignore
        Environment.SetEnvironmentVariable(name, value)
    | _ -> ()
