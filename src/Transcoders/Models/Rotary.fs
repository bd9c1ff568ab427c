/// Rotary position embeddings (Su et al. 2021, "RoFormer"): pair i of a head's coordinates turns by the
/// angle p·θ^(−2i/e) at position p. Two layouts choose which coordinates form pair i.
module Transcoders.Models.Rotary

open TorchSharp

/// cos and sin of every (position, pair) angle, [nCtx, e/2] float32 on `device`. Angles are computed in
/// float64 so position p's rotation is exact to float32 rounding at any length.
let tables (nCtx: int) (dHead: int) (theta: float) (device: torch.Device) : torch.Tensor * torch.Tensor =
    let half = dHead / 2
    let angle p i = float p * System.Math.Pow(theta, -2.0 * float i / float dHead)
    let make f =
        let values = Array.init (nCtx * half) (fun k -> float32 (f (angle (k / half) (k % half))))
        torch.tensor(values, System.ReadOnlySpan<int64>([| int64 nCtx; int64 half |]), device = device)
    make cos, make sin

/// Rotates x [b, p, heads, e] whose positions start at `start`, using tables from `tables`. Tables narrower than
/// the head (partial rotary, GPT-NeoX's rotary_pct) turn its leading 2·(table width) coordinates; the rest pass as they are.
let rec apply (layout: RotaryLayout) (cosTable: torch.Tensor) (sinTable: torch.Tensor) (start: int) (x: torch.Tensor) : torch.Tensor =
    let n = x.shape.[1]
    let e = x.shape.[3]
    let r = 2L * cosTable.shape.[1]
    if r < e then
        let rotated = apply layout cosTable sinTable start (x.narrow(3, 0L, r))
        torch.cat([| rotated; x.narrow(3, r, e - r) |], 3L)
    else
        let cos = cosTable.narrow(0, int64 start, n).unsqueeze(0).unsqueeze(2) // [1, p, 1, e/2]
        let sin = sinTable.narrow(0, int64 start, n).unsqueeze(0).unsqueeze(2)
        match layout with
        | HalfSplit ->
            let x1 = x.narrow(3, 0L, e / 2L)
            let x2 = x.narrow(3, e / 2L, e / 2L)
            torch.cat([| x1 * cos - x2 * sin; x2 * cos + x1 * sin |], 3L)
        | Interleaved ->
            let pairs = x.reshape(x.shape.[0], n, x.shape.[2], e / 2L, 2L)
            let x0 = pairs.select(4, 0L)
            let x1 = pairs.select(4, 1L)
            torch.stack([| x0 * cos - x1 * sin; x0 * sin + x1 * cos |], 4L).reshape(x.shape)
