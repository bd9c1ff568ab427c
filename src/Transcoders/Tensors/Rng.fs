/// Seeded random draws that stay reproducible when several runs share a process.
///
/// torch's global generator is one per process: two runs seeding it and drawing at the same time (two coders trained
/// on two threads, tests in parallel) interleave their draws, and neither is reproducible any more. `seed` gives the
/// calling flow of work (the thread and the async work it starts; an `AsyncLocal`) its own generators, one per device,
/// each started from the seed; the library draws from `generator device` (init, resampling, dropout), which is the
/// global generator when no flow has been seeded, as before. `seed` also seeds the global generator, so code that
/// draws directly from torch after `Device.seed` sees the same stream as before.
module Transcoders.Tensors.Rng

open System.Collections.Generic
open System.Threading
open TorchSharp

/// One seeded flow's generators, created on first use per device, each started from the flow's seed.
[<AllowNullLiteral>]
type private Streams(seed: int64) =
    let generators = Dictionary<string, torch.Generator>()
    member _.Seed = seed
    member _.For(device: torch.Device) : torch.Generator =
        lock generators (fun () ->
            let key = string device.``type`` + ":" + string device.index
            match generators.TryGetValue key with
            | true, g -> g
            | _ ->
                let g = new torch.Generator(uint64 seed, device)
                generators[key] <- g
                g)

let private current = AsyncLocal<Streams>()

/// Gives the calling flow of work its own generators started from `s` (and seeds torch's global generators too).
let seed (s: int64) =
    torch.manual_seed s |> ignore
    if torch.cuda.is_available () then torch.cuda.manual_seed_all s
    current.Value <- Streams s

/// The seed of the calling flow's generators, if `seed` was called in it.
let currentSeed () : int64 option =
    match current.Value with
    | null -> None
    | s -> Some s.Seed

/// The generator the library draws from on `device`: the calling flow's own when it was seeded, else null (torch's
/// global generator).
let generator (device: torch.Device) : torch.Generator =
    match current.Value with
    | null -> null
    | s -> s.For device

/// Drops the calling flow's generators: later draws use torch's global generator again.
let reset () = current.Value <- null
