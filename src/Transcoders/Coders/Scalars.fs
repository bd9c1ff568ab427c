/// TorchSharp overloads take `Scalar` or `Tensor`; F# cannot pick one from a float literal, so scalars are made explicit.
module internal Transcoders.Coders.Scalars

open TorchSharp

/// A float as a TorchSharp scalar.
let inline sc (x: float) : Scalar = Scalar.op_Implicit x
/// An int64 as a TorchSharp scalar.
let inline scl (x: int64) : Scalar = Scalar.op_Implicit x
