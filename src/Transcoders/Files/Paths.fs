/// Where the shipped data lives. The build copies `data/` next to the assemblies; a checkout also
/// finds it at the repository root. `TRANSCODERS_DATA` overrides both.
module Transcoders.Files.Paths

open System
open System.IO

/// A type of this assembly, to find where the assembly was loaded from.
type private PathsMarker = class end

/// The repository root (the folder holding Transcoders.sln), searched upwards from `start`.
let tryRepoRootFrom (start: string) =
    let rec up (d: DirectoryInfo) =
        if isNull d then None
        elif File.Exists(Path.Combine(d.FullName, "Transcoders.sln")) then Some d.FullName
        else up d.Parent
    up (DirectoryInfo start)

/// The folder holding this library's assembly. Under `dotnet fsi` (or any host that loads the library from its
/// build folder) it differs from `AppContext.BaseDirectory`, which is then the host's folder.
let libraryDir () =
    let location = typeof<PathsMarker>.Assembly.Location
    if String.IsNullOrEmpty location then None else Some(Path.GetDirectoryName location)

let tryRepoRoot () =
    tryRepoRootFrom AppContext.BaseDirectory
    |> Option.orElse (libraryDir () |> Option.bind tryRepoRootFrom)
    |> Option.orElse (tryRepoRootFrom Environment.CurrentDirectory)

/// The data folder found from these places, first match wins: `data/` beside the host (`baseDir`), beside the
/// library assembly (`libraryDir`; the build copies it there), then under the repository root above `baseDir`,
/// `libraryDir` or `currentDir`.
let locateData (baseDir: string) (libraryDir: string option) (currentDir: string) : string option =
    let beside (d: string) = Path.Combine(d, "data")
    [ yield beside baseDir
      match libraryDir with Some d -> yield beside d | None -> () ]
    |> List.tryFind Directory.Exists
    |> Option.orElse (
        [ Some baseDir; libraryDir; Some currentDir ]
        |> List.choose id
        |> List.tryPick tryRepoRootFrom
        |> Option.map beside)

/// The folder of shipped data (TinyStories, tokenizer files, small pretrained models).
let dataDir () =
    match Environment.GetEnvironmentVariable "TRANSCODERS_DATA" with
    | null | "" ->
        match locateData AppContext.BaseDirectory (libraryDir ()) Environment.CurrentDirectory with
        | Some d -> d
        | None ->
            failwithf "cannot find the data folder: not beside %s%s, no Transcoders.sln above it or the current folder; set TRANSCODERS_DATA"
                AppContext.BaseDirectory (match libraryDir () with Some d when d <> AppContext.BaseDirectory.TrimEnd('/', '\\') -> " or " + d | _ -> "")
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
