/// The name a model goes by: recorded in coder configs and used for default output folders.
module Transcoders.Models.ModelName

open System.IO

/// The name of the checkpoint at `path`: a file's name without its extension (`stories260K.bin` → `stories260K`),
/// a folder's name as it is (`runs/model.v2` → `model.v2`: a dot in a folder's name is no extension).
let ofPath (path: string) : string =
    let full = Path.GetFullPath(path).TrimEnd(Path.DirectorySeparatorChar, Path.AltDirectorySeparatorChar)
    if File.Exists full then Path.GetFileNameWithoutExtension full else Path.GetFileName full
