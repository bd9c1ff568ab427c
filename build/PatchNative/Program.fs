/// Build step: weakens TorchSharp's GLIBCXX_3.4.32 requirement in the libLibTorchSharp.so copies
/// under the given folders, where the system's libstdc++ lacks that version (Debian 12).
/// Usage: PatchNative FOLDER [FOLDER ...]
module PatchNative.Program

open Transcoders.Native

[<EntryPoint>]
let main argv =
    if argv.Length = 0 then
        eprintfn "usage: PatchNative FOLDER [FOLDER ...]"
        2
    else
        for folder in argv do
            for file, outcome in ElfVerneed.patchFolder folder do
                match outcome with
                | ElfVerneed.Weakened -> printfn "PatchNative: weakened %s in %s" ElfVerneed.TorchSharpVersion file
                | _ -> ()
        0
