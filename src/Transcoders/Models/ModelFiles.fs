/// Any model checkpoint by path: our folders, Hugging Face folders, llama2.c `.bin` files. Detects the
/// kind, loads it, or describes it without reading the weights (for the `inspect` command).
module Transcoders.Models.ModelFiles

open System.IO
open System.Text.Json
open TorchSharp

/// The kinds of checkpoint this library reads.
type CheckpointKind =
    /// Our folder format (see `Checkpoint`).
    | Native
    /// A Hugging Face folder, with the architecture named in its config.json.
    | HuggingFace of architecture: string
    /// A llama2.c legacy `.bin` file.
    | Llama2c

/// What a checkpoint holds, read from its configuration or header only.
type Inspection =
    { Path: string
      Kind: CheckpointKind
      Config: TransformerConfig
      /// Parameters of the model (tied matrices counted once).
      ParameterCount: int64
      /// Our format's opaque metadata (None for other kinds).
      Tokenizer: JsonElement option
      Training: JsonElement option }

/// The kind of checkpoint at `path` (a folder or a file), or a clear error saying why it is none.
let detect (path: string) : CheckpointKind =
    if Directory.Exists path then
        let config = Path.Combine(path, "config.json")
        if not (File.Exists config) then raise (CheckpointError(path, "a model folder needs a config.json (our format or Hugging Face)"))
        if Checkpoint.isCheckpoint path then Native
        else
            let _, name, _ = HuggingFace.readConfig path
            HuggingFace name
    elif File.Exists path then
        if Path.GetFileName path = "config.json" then
            raise (CheckpointError(path, "give the folder that holds config.json, not the file"))
        // readHeader validates the header and the size
        Llama2c.readHeader path |> ignore
        Llama2c
    else raise (CheckpointError(path, "no such file or folder"))

/// Describes a checkpoint from its config.json or header (the weights are not read).
let inspect (path: string) : Inspection =
    let kind = detect path
    let config, meta =
        match kind with
        | Native -> Checkpoint.readConfig path
        | HuggingFace _ -> (let _, _, c = HuggingFace.readConfig path in c), Checkpoint.Metadata.Empty
        | Llama2c -> Llama2c.config (Llama2c.readHeader path), Checkpoint.Metadata.Empty
    { Path = path; Kind = kind; Config = config; ParameterCount = TransformerConfig.parameterCount config
      Tokenizer = meta.Tokenizer; Training = meta.Training }

/// Loads any supported checkpoint onto `device`, with our format's metadata when there is some. Weights holding
/// NaN or ±∞ are refused unless `options` allows them.
let loadWith (options: LoadOptions) (path: string) (device: torch.Device) : Transformer * Checkpoint.Metadata =
    match detect path with
    | Native -> Checkpoint.loadWith options path device
    | HuggingFace _ -> HuggingFace.loadWith options path device, Checkpoint.Metadata.Empty
    | Llama2c -> Llama2c.loadWith options path device, Checkpoint.Metadata.Empty

/// `loadWith LoadOptions.Default`: finite weights only.
let load (path: string) (device: torch.Device) : Transformer * Checkpoint.Metadata = loadWith LoadOptions.Default path device
