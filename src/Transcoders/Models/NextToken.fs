/// The next-token distribution at the end of a prompt: probabilities and the most likely tokens.
module Transcoders.Models.NextToken

open TorchSharp

/// The next-token probabilities (softmax in float64) at the last position of logits [1, p, vocab] (or [p, vocab]).
let probabilities (logits: torch.Tensor) : float[] =
    use _ = torch.no_grad ()
    use scope = torch.NewDisposeScope()
    let last = logits.reshape(-1L, logits.shape[logits.shape.Length - 1]).select(0, -1L).to_type(torch.float64)
    last.softmax(0L).cpu().data<float>().ToArray()

/// The `k` most likely tokens with their probabilities, most likely first.
let top (k: int) (probabilities: float[]) : (int * float) list =
    probabilities |> Array.mapi (fun i p -> i, p) |> Array.sortByDescending snd |> Array.truncate k |> List.ofArray
