using System;
using System.Collections.Generic;
using System.Linq;
using TorchSharp;
using SafetensorsCore = Transcoders.Files.Safetensors;

namespace Transcoders;

/// <summary>One tensor's header entry in a safetensors file.</summary>
/// <param name="Name">The tensor's name.</param>
/// <param name="DType">The element type as the header writes it ("F32", "BF16", "I64", "BOOL", ...).</param>
/// <param name="Shape">The tensor's shape.</param>
/// <param name="ByteLength">Bytes of data.</param>
public sealed record SafetensorsEntry(string Name, string DType, long[] Shape, long ByteLength);

/// <summary>
/// Reading and writing safetensors files (Hugging Face's format). Headers are validated; reading is
/// memory-mapped; writing is atomic and byte-identical to Hugging Face's writer. Bad files raise
/// <c>SafetensorsError</c> naming the file and the problem.
/// </summary>
public static class SafetensorsFile
{
    /// <summary>Every tensor of a file, in header order, on <paramref name="device"/> (default CPU). The caller owns (disposes) them.</summary>
    /// <param name="path">The file.</param>
    /// <param name="device">Where to put the tensors; null for the CPU.</param>
    public static IReadOnlyDictionary<string, torch.Tensor> Load(string path, torch.Device? device = null)
    {
        var result = new Dictionary<string, torch.Tensor>();
        foreach (var (name, tensor) in SafetensorsCore.load(path, device ?? torch.CPU)) result.Add(name, tensor);
        return result;
    }

    /// <summary>One tensor of a file, on <paramref name="device"/> (default CPU); the caller owns it.</summary>
    /// <param name="path">The file.</param>
    /// <param name="name">The tensor's name.</param>
    /// <param name="device">Where to put the tensor; null for the CPU.</param>
    public static torch.Tensor LoadTensor(string path, string name, torch.Device? device = null)
    {
        using var reader = SafetensorsCore.Reader.Open(path);
        return reader.Tensor(name, device ?? torch.CPU);
    }

    /// <summary>The header's entries (names, dtypes, shapes), in header order, without reading the data.</summary>
    /// <param name="path">The file.</param>
    public static IReadOnlyList<SafetensorsEntry> ReadHeader(string path)
    {
        using var reader = SafetensorsCore.Reader.Open(path);
        return reader.Entries.Select(e => new SafetensorsEntry(e.Name, e.DType.Name, e.Shape, e.ByteLength)).ToList();
    }

    /// <summary>The header's string metadata ("__metadata__"; empty when absent).</summary>
    /// <param name="path">The file.</param>
    public static IReadOnlyDictionary<string, string> ReadMetadata(string path)
    {
        using var reader = SafetensorsCore.Reader.Open(path);
        return reader.Metadata.ToDictionary(kv => kv.Key, kv => kv.Value);
    }

    /// <summary>
    /// Writes tensors (any supported dtype, any device) and optional string metadata to <paramref name="path"/>,
    /// atomically. The tensors stay the caller's.
    /// </summary>
    /// <param name="path">The file to write.</param>
    /// <param name="tensors">Tensors by name (a dictionary, or any sequence of pairs).</param>
    /// <param name="metadata">String metadata stored under "__metadata__"; null for none.</param>
    public static void Save(string path, IEnumerable<KeyValuePair<string, torch.Tensor>> tensors,
                            IEnumerable<KeyValuePair<string, string>>? metadata = null)
    {
        ArgumentNullException.ThrowIfNull(tensors);
        SafetensorsCore.save(path, Interop.Map(metadata ?? []),
                             tensors.Select(kv => Tuple.Create(kv.Key, kv.Value)).ToList());
    }
}
