using TorchSharp;
using DeviceCore = Transcoders.Tensors.Device;

namespace Transcoders;

/// <summary>
/// Process-wide torch setup: loading the native library, choosing the device, seeding, threads.
/// Call <see cref="Init"/> once before the first tensor operation of a program.
/// </summary>
public static class Torch
{
    /// <summary>Makes sure TorchSharp's native library loads (including the Debian 12 fix). Idempotent.</summary>
    public static void Init() => DeviceCore.init();

    /// <summary>
    /// The torch device named <paramref name="name"/>: "cpu", "cuda", "cuda:N" or "auto" (CUDA when available,
    /// else the CPU). Fails clearly for an unknown name or when CUDA is asked for and absent.
    /// </summary>
    /// <param name="name">"cpu", "cuda", "cuda:N" or "auto".</param>
    public static torch.Device Device(string name = "auto") => DeviceCore.resolve(DeviceCore.parse(name));

    /// <summary>The CPU device.</summary>
    public static torch.Device Cpu
    {
        get
        {
            DeviceCore.init();
            return torch.CPU;
        }
    }

    /// <summary>Whether a CUDA device is available.</summary>
    public static bool CudaAvailable
    {
        get
        {
            DeviceCore.init();
            return torch.cuda.is_available();
        }
    }

    /// <summary>Seeds torch's global generators (CPU and CUDA), so CPU runs are reproducible.</summary>
    /// <param name="seed">The seed.</param>
    public static void Seed(long seed) => DeviceCore.seed(seed);

    /// <summary>Sets torch's intra-op thread count; 0 leaves the default (the core count).</summary>
    /// <param name="threads">Number of threads, or 0.</param>
    public static void SetThreads(int threads) => DeviceCore.setThreads(threads);
}
