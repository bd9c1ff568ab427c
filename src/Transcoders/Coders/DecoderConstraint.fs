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
        use sq = w.pow(sc 2.0)
        use s = sq.sum([| 1L; 2L |], keepdim = true)
        use n = s.sqrt()
        use n' = n.clamp_min(1e-12)
        w.div_ n' |> ignore

/// Replaces each decoder gradient g_i by g_i − (g_i·w_i / ‖w_i‖²)·w_i (in place), so that a step moves the decoder
/// tangentially to the unit sphere. Parameters without a gradient are skipped.
let removeParallelGradient (c: Coder) =
    use _ = torch.no_grad ()
    for w in c.WDec do
        let g = w.grad
        if not (isNull g) then
            use g = g
            use gw = g.mul w
            use dot = gw.sum([| 1L; 2L |], keepdim = true)
            use ww = w.mul w
            use nsq = ww.sum([| 1L; 2L |], keepdim = true)
            use nsq' = nsq.clamp_min(1e-24)
            use coef = dot.div nsq'
            use par = w.mul coef
            g.sub_ par |> ignore
