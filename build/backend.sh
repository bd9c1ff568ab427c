#!/usr/bin/env bash
# Switches TorchSharp's native backend: `bash build/backend.sh cuda` (TorchSharp-cuda-linux, for Linux machines
# with an NVIDIA GPU) or `bash build/backend.sh cpu` (libtorch-cpu-linux-x64, the default). It rewrites the
# backend line of paket.dependencies and the paket.references files, then re-resolves with Paket.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  cuda) from='libtorch-cpu-linux-x64'; to='TorchSharp-cuda-linux'; dep='nuget TorchSharp-cuda-linux 0.107.0' ;;
  cpu)  from='TorchSharp-cuda-linux'; to='libtorch-cpu-linux-x64'; dep='nuget libtorch-cpu-linux-x64 2.10.0' ;;
  *) echo "usage: bash build/backend.sh cpu|cuda" >&2; exit 2 ;;
esac
sed -i -E "s/^nuget (libtorch-cpu-linux-x64|TorchSharp-cuda-linux) .*/$dep/" paket.dependencies
find . -name paket.references -not -path './.git/*' -print0 | xargs -0 sed -i "s/^$from\$/$to/"
dotnet tool restore >/dev/null
dotnet paket install
echo "backend: $1"
