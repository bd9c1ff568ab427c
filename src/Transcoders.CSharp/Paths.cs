using PathsCore = Transcoders.Files.Paths;

namespace Transcoders;

/// <summary>
/// Where the shipped data lives (TinyStories sample, tokenizer files, small pretrained models) and where
/// derived files are cached. The <c>TRANSCODERS_DATA</c> and <c>TRANSCODERS_CACHE</c> environment variables
/// override the defaults.
/// </summary>
public static class Paths
{
    /// <summary>A file or folder inside the shipped data, e.g. <c>Paths.Data("models/stories260K/stories260K.bin")</c>.</summary>
    /// <param name="relative">Path relative to the data folder.</param>
    public static string Data(string relative) => PathsCore.data(relative);

    /// <summary>The folder of shipped data: beside the assemblies, else <c>data/</c> at the repository root.</summary>
    public static string DataDirectory => PathsCore.dataDir();

    /// <summary>The cache folder for derived files (token shards, activations): <c>~/.cache/transcoders</c> by default.</summary>
    public static string CacheDirectory => PathsCore.cacheDir();

    /// <summary>The repository root (the folder holding Transcoders.sln) above the program or the current folder, or null.</summary>
    public static string? RepositoryRoot => Interop.OrNull(PathsCore.tryRepoRoot());
}
