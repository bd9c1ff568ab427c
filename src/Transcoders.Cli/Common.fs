/// The options every command shares. They are declared once, as inherited cases of the top-level command
/// (`Program.Command`), so `transcoders <command> ... --device cpu --threads 2` works for every command and the
/// commands do not repeat them.
module Transcoders.Cli.Common

open Transcoders.Tensors

/// Usage text of the shared options.
let deviceUsage = "cpu, cuda, cuda:N or auto (default auto)"
let threadsUsage = "torch CPU threads (default: all cores)"

/// The shared options' values.
type Options =
    { /// "cpu", "cuda", "cuda:N" or "auto".
      Device: string
      /// Torch CPU threads; 0: all cores.
      Threads: int }

    static member Default = { Device = "auto"; Threads = 0 }

/// The torch device the options name (resolved when a command needs it, so that commands without tensors never
/// touch CUDA).
let device (o: Options) = Device.resolve (Device.parse o.Device)
