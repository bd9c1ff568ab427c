// Loads the Transcoders library into `dotnet fsi`. Build once first:
//   dotnet build src/Transcoders -c Release
// then `#load "load.fsx"` at the top of a script (paths are relative to this file).
#I "../src/Transcoders/bin/Release/net10.0"
#r "TorchSharp.dll"
#r "Microsoft.ML.Tokenizers.dll"
#r "Spectre.Console.dll"
#r "XPlot.Plotly.dll"
#r "Transcoders.dll"

Transcoders.Tensors.Device.init ()
