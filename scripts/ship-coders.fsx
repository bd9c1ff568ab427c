#load "load.fsx"
// Copies trained coders into a shipped folder with their weights stored as float16 (half the bytes; loading converts
// back to float32), with the run's metrics table beside them. Used by scripts/make-default-model.sh.
//
//   dotnet fsi scripts/ship-coders.fsx SOURCE DESTINATION [NAME...]
//
// SOURCE is a `train-coder` output folder (one sub-folder per coder); NAME filters coders (default: all).

open System.IO
open Transcoders.Coders

let args = fsi.CommandLineArgs |> Array.tail
if args.Length < 2 then failwith "usage: dotnet fsi scripts/ship-coders.fsx SOURCE DESTINATION [NAME...]"
let source, destination, names = args[0], args[1], args[2..] |> Set.ofArray
Directory.CreateDirectory destination |> ignore
for dir in Directory.GetDirectories source |> Array.sort do
    let name = Path.GetFileName dir
    if File.Exists(Path.Combine(dir, "coder.json")) && (names.IsEmpty || names.Contains name) then
        use coder = CoderFile.load dir TorchSharp.torch.CPU
        let target = Path.Combine(destination, name)
        Directory.CreateDirectory target |> ignore
        CoderFile.saveAs TorchSharp.torch.ScalarType.Float16 target coder
        for extra in [ "eval.json"; "metrics.json" ] do
            let p = Path.Combine(dir, extra)
            if File.Exists p then File.Copy(p, Path.Combine(target, extra), true)
        printfn "%s → %s (%.1f MB)" name target (float (FileInfo(Path.Combine(target, "coder.safetensors")).Length) / 1e6)
for table in [ "metrics.md"; "metrics.csv"; "eval-1m.md" ] do
    let p = Path.Combine(source, table)
    if File.Exists p then File.Copy(p, Path.Combine(destination, table), true)
