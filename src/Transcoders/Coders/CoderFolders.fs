/// Finding saved coders on disk: coder folders, or folders holding them (e.g. `runs/quickstart/coders`), loaded in
/// layer order; and the name a coder's path goes by in tables.
module Transcoders.Coders.CoderFolders

open System.IO
open TorchSharp

/// Whether `dir` is a coder folder (holds `coder.json`).
let isCoder (dir: string) = File.Exists(Path.Combine(dir, "coder.json"))

/// The coder paths under `folders`: a coder file or folder as it is, a folder of coder folders as its coder
/// sub-folders (sorted). A folder holding no coder, and a path that does not exist, fail with a message naming it.
let find (folders: string list) : string list =
    [ for f in folders do
          if File.Exists f || isCoder f then yield f
          elif Directory.Exists f then
              let subs = Directory.GetDirectories f |> Array.filter isCoder |> Array.sort
              if subs.Length = 0 then failwithf "%s holds no coder (no coder.json in it or in its sub-folders)" f
              yield! subs
          else failwithf "%s: no such coder folder or file" f ]

/// Every coder under `folders` (see `find`), loaded onto `device`, ordered by (first) layer.
let load (folders: string list) (device: torch.Device) : Coder list =
    find folders
    |> List.map (fun d -> CoderFile.load d device)
    |> List.sortBy (fun c -> c.Config.Layers[0])

/// The name of a coder path: a folder's name, or a file's name without its extension.
let name (path: string) : string =
    if Directory.Exists path then Path.GetFileName(Path.GetFullPath(path).TrimEnd(Path.DirectorySeparatorChar, Path.AltDirectorySeparatorChar))
    else Path.GetFileNameWithoutExtension path
