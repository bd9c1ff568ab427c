namespace Transcoders.CSharp;
