/// Writing files so that a crash never leaves a half-written one: write beside, flush, rename.
module Transcoders.Files.AtomicFile

open System.IO

/// Calls `write` on a temporary file next to `path`, flushes it to disk, then renames it over `path`.
/// On failure the temporary file is removed and `path` is untouched.
let write (path: string) (write: Stream -> unit) =
    let full = Path.GetFullPath path
    let dir = Path.GetDirectoryName full
    if not (System.String.IsNullOrEmpty dir) then Directory.CreateDirectory dir |> ignore
    let tmp = Path.Combine(dir, "." + Path.GetFileName full + "." + string (System.Guid.NewGuid().ToString "N").[..7] + ".tmp")
    try
        using (new FileStream(tmp, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1 <<< 20)) (fun fs ->
            write fs
            fs.Flush true)
        File.Move(tmp, full, true)
    with _ ->
        (try File.Delete tmp with _ -> ())
        reraise ()

let writeAllText (path: string) (text: string) =
    write path (fun s ->
        use w = new StreamWriter(s, System.Text.UTF8Encoding false, leaveOpen = true)
        w.Write text)

let writeAllBytes (path: string) (bytes: byte[]) = write path (fun s -> s.Write(bytes, 0, bytes.Length))
