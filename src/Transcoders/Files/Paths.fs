/// Where the shipped data lives. The build copies `data/` next to the assemblies; a checkout also
/// finds it at the repository root. `TRANSCODERS_DATA` overrides both.
module Transcoders.Files.Paths

open System
open System.IO

/// The repository root (the folder holding Transcoders.sln), searched upwards from `start`.
let tryRepoRootFrom (start: string) =
    let rec up (d: DirectoryInfo) =
        if isNull d then None
        elif File.Exists(Path.Combine(d.FullName, "Transcoders.sln")) then Some d.FullName
        else up d.Parent
    up (DirectoryInfo start)

let tryRepoRoot () =
    tryRepoRootFrom AppContext.BaseDirectory
    |> Option.orElse (tryRepoRootFrom Environment.CurrentDirectory)

/// The folder of shipped data (TinyStories, tokenizer files, small pretrained models).
let dataDir () =
    match Environment.GetEnvironmentVariable "TRANSCODERS_DATA" with
    | null | "" ->
        let beside = Path.Combine(AppContext.BaseDirectory, "data")
        if Directory.Exists beside then beside
        else
            match tryRepoRoot () with
            | Some root -> Path.Combine(root, "data")
            | None -> failwithf "cannot find the data folder: not beside %s, no Transcoders.sln above it or the current folder; set TRANSCODERS_DATA" AppContext.BaseDirectory
    | d -> d

/// A file or folder inside the shipped data, e.g. `data "tinystories"`.
let data (relative: string) = Path.Combine(dataDir (), relative)

/// A cache folder for derived files (token shards, activations): `TRANSCODERS_CACHE`, else
/// `~/.cache/transcoders`.
let cacheDir () =
    let d =
        match Environment.GetEnvironmentVariable "TRANSCODERS_CACHE" with
        | null | "" -> Path.Combine(Environment.GetFolderPath Environment.SpecialFolder.UserProfile, ".cache", "transcoders")
        | d -> d
    Directory.CreateDirectory d |> ignore
    d
