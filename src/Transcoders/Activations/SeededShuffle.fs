/// Seeded random permutations computed on the host. The generator is fully specified here (SplitMix64,
/// Lemire's unbiased bounded draw, Fisher–Yates), so a seed gives the same order on every device, every
/// .NET version and every platform: a buffer on CUDA serves the same batches as one on the CPU.
module Transcoders.Activations.SeededShuffle

open System

/// SplitMix64's output function (Steele, Lea & Flood 2014): a bijective 64-bit mixer.
let private mix (z: uint64) =
    let z = (z ^^^ (z >>> 30)) * 0xBF58476D1CE4E5B9UL
    let z = (z ^^^ (z >>> 27)) * 0x94D049BB133111EBUL
    z ^^^ (z >>> 31)

let private golden = 0x9E3779B97F4A7C15UL

/// The SplitMix64 generator. It passes BigCrush and is what xoshiro's authors recommend for seeding.
[<Sealed>]
type SplitMix64(state: uint64) =
    let mutable s = state

    /// The next 64 random bits.
    member _.Next() =
        s <- s + golden
        mix s

    /// Uniform in [0, n) without modulo bias (Lemire 2019, "Fast random integer generation in an interval").
    member r.Below(n: uint64) =
        if n = 0UL then invalidArg "n" "the range [0, 0) is empty"
        let mutable low = 0UL
        let mutable high = Math.BigMul(r.Next(), n, &low)
        if low < n then
            let threshold = (0UL - n) % n
            while low < threshold do
                high <- Math.BigMul(r.Next(), n, &low)
        high

    /// A generator for one named stream of one seed: independent draws for (seed, stream, index) triples,
    /// e.g. (buffer seed, "cycle", cycle number), without any shared mutable state.
    static member For(seed: int64, stream: string, index: int64) =
        let mutable h = mix (uint64 seed + golden)
        for c in stream do h <- mix (h ^^^ uint64 c)
        SplitMix64(mix (h ^^^ mix (uint64 index + golden)))

/// A uniformly random permutation of 0 .. n-1 drawn from `rng` (Fisher–Yates).
let permutationFrom (rng: SplitMix64) (n: int) : int[] =
    if n < 0 then invalidArg "n" (sprintf "a permutation needs n >= 0, got %d" n)
    let p = Array.init n id
    for i in n - 1 .. -1 .. 1 do
        let j = int (rng.Below(uint64 (i + 1)))
        let t = p[i]
        p[i] <- p[j]
        p[j] <- t
    p

/// The permutation of 0 .. n-1 for (seed, stream, index).
let permutation (seed: int64) (stream: string) (index: int64) (n: int) : int[] =
    permutationFrom (SplitMix64.For(seed, stream, index)) n
