/// The options every command shares. They are declared once, as inherited cases of the top-level command
/// (`Program.Command`), so `transcoders <command> ... --device cpu --threads 2` works for every command and the
/// commands do not repeat them.
module Transcoders.Cli.Common

open Transcoders.Tensors

/// Usage text of the shared options.
let deviceUsage = "cpu, cuda, cuda:N or auto (default auto)"
let threadsUsage = "torch CPU threads (default: all cores)"
let tlProcessingUsage = "load models with TransformerLens' weight processing (LayerNorms folded, writing weights and unembedding centred), as the transcoder paper's GPT-2 transcoders expect"

/// The shared options' values.
type Options =
    { /// "cpu", "cuda", "cuda:N" or "auto".
      Device: string
      /// Torch CPU threads; 0: all cores.
      Threads: int
      /// Load models with TransformerLens' weight processing (`--tl-processing`).
      TlProcessing: bool }

    static member Default = { Device = "auto"; Threads = 0; TlProcessing = false }

/// The torch device the options name (resolved when a command needs it, so that commands without tensors never
/// touch CUDA).
let device (o: Options) = Device.resolve (Device.parse o.Device)

/// How the options say models are loaded.
let loadOptions (o: Options) : Transcoders.Models.LoadOptions =
    { Transcoders.Models.LoadOptions.Default with
        Processing = if o.TlProcessing then Transcoders.Models.TransformerLens else Transcoders.Models.AsStored }
