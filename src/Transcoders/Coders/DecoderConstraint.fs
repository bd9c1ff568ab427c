/// The unit-norm decoder constraint: remove the gradient component parallel to each feature's decoder vector before
/// the optimiser step, renormalise after it (the transcoder paper; OpenAI's TopK SAEs). For a cross-layer transcoder a
/// feature's decoder vector is the concatenation of its decoders to every later layer.
module Transcoders.Coders.DecoderConstraint

open TorchSharp
open Transcoders.Coders.Scalars

/// Divides each feature's decoder vector by its norm (in place, no gradient).
let renormalise (c: Coder) =
    use _ = torch.no_grad ()
    for w in c.WDec do
        // not linalg.vector_norm: see Optim.gradNorm (a temporary Scalar TorchSharp does not keep alive)
        use sq = w.square()
        use s = sq.sum([| 1L; 2L |], keepdim = true)
        use n = s.sqrt()
        n.clamp_min_(1e-12) |> ignore
        w.div_ n |> ignore

/// Replaces each decoder gradient g_i by g_i − (g_i·w_i / ‖w_i‖²)·w_i (in place), so that a step moves the decoder
/// tangentially to the unit sphere. Parameters without a gradient are skipped.
let removeParallelGradient (c: Coder) =
    use _ = torch.no_grad ()
    for w in c.WDec do
        let g = w.grad
        if not (isNull g) then
            use g = g
            // per-feature dot products as a batched [1, n]·[n, 1] product: no [d_sae, …] temporaries
            let f = w.shape[0]
            use w2 = w.reshape(f, 1L, -1L)
            use g2 = g.reshape(f, 1L, -1L)
            use wt = w.reshape(f, -1L, 1L)
            use dot = torch.bmm(g2, wt)
            use nsq = torch.bmm(w2, wt)
            nsq.clamp_min_(1e-24) |> ignore
            use coef = dot.div_ nsq
            use coef3 = coef.reshape(f, 1L, 1L)
            g.addcmul_(w, coef3, sc -1.0) |> ignore
