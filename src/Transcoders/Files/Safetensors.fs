/// safetensors read and write (https://github.com/huggingface/safetensors format): u64 LE header
/// length, JSON header, raw little-endian data. Headers are validated; data is memory-mapped so a
/// large file is never held twice in memory.
module Transcoders.Files.Safetensors

open TorchSharp

/// Element types of the format. Names as in the header ("F32", "BF16", ...).
type DType =
    | F64 | F32 | F16 | BF16 | I64 | I32 | I16 | I8 | U8 | Bool

/// One tensor's header entry. `Start`/`End` are byte offsets into the data section.
type Entry = { Name: string; DType: DType; Shape: int64[]; Start: int64; End: int64 }

/// A clear error naming the file and what is wrong with it.
exception SafetensorsError of path: string * problem: string with
    override this.Message = sprintf "%s: %s" this.path this.problem

/// An open safetensors file (validated header, memory-mapped data). Dispose to unmap.
type Reader =
    interface System.IDisposable with
        member _.Dispose() = failwith "TODO(safetensors)"
    static member Open(path: string) : Reader = failwith "TODO(safetensors)"
    member _.Path : string = failwith "TODO(safetensors)"
    member _.Entries : Entry list = failwith "TODO(safetensors)"
    member _.Metadata : Map<string, string> = failwith "TODO(safetensors)"
    member _.Contains(name: string) : bool = failwith "TODO(safetensors)"
    /// A new tensor (the caller owns it) with the entry's dtype and shape, on `device` (default CPU).
    member _.Tensor(name: string, ?device: torch.Device) : torch.Tensor = failwith "TODO(safetensors)"

/// Every tensor of a file, in header order, on `device`.
let load (path: string) (device: torch.Device) : (string * torch.Tensor) list = failwith "TODO(safetensors)"

/// Writes tensors (any of the supported dtypes, any device) and string metadata, atomically.
let save (path: string) (metadata: Map<string, string>) (tensors: (string * torch.Tensor) seq) : unit =
    failwith "TODO(safetensors)"
