/// Where tests find their fixtures (tests/fixtures) and scratch space.
module Transcoders.Tests.TestPaths

open System.IO
open Transcoders.Files

let repoRoot =
    match Paths.tryRepoRoot () with
    | Some r -> r
    | None -> failwith "tests must run inside the repository (no Transcoders.sln found above the test binary)"

/// A file under tests/fixtures.
let fixture (relative: string) = Path.Combine(repoRoot, "tests", "fixtures", relative)

/// A fresh temporary folder, removed when disposed.
type TempDir() =
    let path = Path.Combine(Path.GetTempPath(), "transcoders-tests-" + System.Guid.NewGuid().ToString("N").[..11])
    do Directory.CreateDirectory path |> ignore
    member _.Path = path
    member _.File(name: string) = Path.Combine(path, name)
    interface System.IDisposable with
        member _.Dispose() = try Directory.Delete(path, true) with _ -> ()
