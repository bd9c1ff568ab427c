#!/usr/bin/env bash
# The NuGet packages as a user takes them: packs Transcoders and Transcoders.CSharp into a local feed, then, outside the
# solution (a temporary folder with its own nuget.config: the local feed plus the machine's usual sources), builds and
# runs a fresh C# console project that references the packages and the Linux CPU backend, and a fresh F# script with
# `#r "nuget: Transcoders, <version>"`. Both load the package's stories260K and print the top next token of a prompt;
# the two must agree. Reuses ~/.nuget/packages (libtorch is not downloaded again); the packed version is removed from
# it afterwards so that the next run consumes a fresh pack. Run after a Release build (.ci/run builds first).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
version="${TRANSCODERS_PACKAGE_VERSION:-0.1.0}"
work="$(mktemp -d -t transcoders-package-XXXXXX)"
packages="${NUGET_PACKAGES:-$HOME/.nuget/packages}"
cleanup() {
    rm -rf "$work" "$packages/transcoders/$version" "$packages/transcoders.csharp/$version"
}
trap cleanup EXIT
cleanup; mkdir -p "$work"

feed="$work/feed"
for p in src/Transcoders src/Transcoders.CSharp; do
    dotnet pack "$root/$p" -c Release --no-build -o "$feed" -p:Version="$version" -nologo -v quiet
done
ls "$feed"

cat > "$work/nuget.config" <<XML
<?xml version="1.0" encoding="utf-8"?>
<configuration>
  <packageSources>
    <add key="local" value="$feed" />
  </packageSources>
</configuration>
XML

# A fresh C# console project: the facade's package and one backend package.
mkdir -p "$work/console"
cat > "$work/console/Console.csproj" <<XML
<Project Sdk="Microsoft.NET.Sdk">
  <PropertyGroup>
    <OutputType>Exe</OutputType>
    <TargetFramework>net10.0</TargetFramework>
    <ImplicitUsings>enable</ImplicitUsings>
    <Nullable>enable</Nullable>
    <NoWarn>NU1603</NoWarn>
  </PropertyGroup>
  <ItemGroup>
    <PackageReference Include="Transcoders.CSharp" Version="$version" />
    <PackageReference Include="libtorch-cpu-linux-x64" Version="2.10.0" />
  </ItemGroup>
</Project>
XML
cat > "$work/console/Program.cs" <<'CS'
using Transcoders;

Torch.Init();
var device = Torch.Device("cpu");
using var model = LanguageModel.Load(Paths.Data("models/stories260K/stories260K.bin"), device);
var tokenizer = TextTokenizer.Llama2c(Paths.Data("models/stories260K/tok512.bin"), model.Config.VocabSize);
var prompt = tokenizer.EncodeDocument("Once upon a time, there was a little");
var next = model.Generate(prompt, GenerationSettings.Greedy(1)).NewTokens[0];
Console.WriteLine($"next token: {next} '{tokenizer.Decode([next])}'");
CS
(cd "$work/console" && dotnet run -c Release --configfile "$work/nuget.config" 2>&1 | tee "$work/console.out")

# A fresh F# script from the same feed (the backend as a second reference).
mkdir -p "$work/script"
cat > "$work/script/trace.fsx" <<FSX
#r "nuget: Transcoders, $version"
#r "nuget: libtorch-cpu-linux-x64, 2.10.0"
FSX
cat >> "$work/script/trace.fsx" <<'FSX'
open Transcoders.Models
open Transcoders.Text
Transcoders.Tensors.Device.init ()
// contentFiles are not copied for scripts: the data sits in the package folder
let data = System.IO.Path.Combine(fsi.CommandLineArgs[1], "contentFiles", "any", "any", "data", "models", "stories260K")
let model, _ = ModelFiles.load (System.IO.Path.Combine(data, "stories260K.bin")) TorchSharp.torch.CPU
let tokenizer = ModelTokenizer.find (System.IO.Path.Combine(data, "stories260K.bin"))
let prompt = Tokenizer.encodeDocument tokenizer true false "Once upon a time, there was a little"
let story = Generation.generate model { Generation.GenerateOptions.Greedy with MaxNewTokens = 1 } prompt
let next = story.Tokens[story.Tokens.Length - 1]
printfn "next token: %d '%s'" next (Tokenizer.decode tokenizer [| next |])
FSX
cp "$work/nuget.config" "$work/script/nuget.config"
(cd "$work/script" && dotnet fsi trace.fsx "$packages/transcoders/$version" 2>&1 | tee "$work/script.out")

c="$(grep '^next token:' "$work/console.out" || true)"
s="$(grep '^next token:' "$work/script.out" || true)"
if [ -z "$c" ] || [ "$c" != "$s" ]; then
    echo "package test FAILED: the console printed '$c', the script '$s'" >&2
    exit 1
fi
echo "package test passed: C# console and F# script from the local feed agree ($c)"
