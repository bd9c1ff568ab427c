namespace Transcoders.Circuits

open TorchSharp
open Transcoders.Coders.Scalars

/// The adjacency as tensor blocks on a device, and the influence computations over it (shared by the builder's
/// feature ranking and by pruning). Influence is circuit-tracer's: with Â = |A| normalised so that each row's
/// incoming weights add up to 1, the total influence of the logits (weights w) on every node is
/// w·(Â + Â² + …), computed by repeated products until they vanish (the graph is acyclic).
module Adjacency =

    /// One block on a device: row ids [B] and column ids [C] (int64) and weights [B, C] (float32).
    type DeviceBlock =
        { Rows: torch.Tensor
          Cols: torch.Tensor
          Values: torch.Tensor }

    /// The graph's blocks as tensors on `device` (the caller disposes them).
    let toDevice (device: torch.Device) (g: Graph) : DeviceBlock[] =
        g.Blocks |> Array.map (fun b ->
            use scope = torch.NewDisposeScope()
            { Rows = torch.tensor(b.Targets |> Array.map int64, device = device).MoveToOuterDisposeScope()
              Cols = torch.tensor(b.Sources |> Array.map int64, device = device).MoveToOuterDisposeScope()
              Values = torch.tensor(b.Weights, device = device).reshape(int64 b.Targets.Length, int64 b.Sources.Length).MoveToOuterDisposeScope() })

    let dispose (blocks: DeviceBlock seq) =
        for b in blocks do
            b.Rows.Dispose()
            b.Cols.Dispose()
            b.Values.Dispose()

    /// Row-normalised |A| of a block, restricted to the nodes of `mask` (bool [n]) when given: each row's absolute
    /// weights divided by their sum (rows summing to 0 stay 0). A copy of the block.
    let normalised (mask: torch.Tensor option) (b: DeviceBlock) : torch.Tensor =
        use scope = torch.NewDisposeScope()
        let a = b.Values.abs()
        match mask with
        | Some m ->
            a.mul_(m.index_select(0L, b.Rows).unsqueeze(1)).mul_(m.index_select(0L, b.Cols).unsqueeze(0)) |> ignore
        | None -> ()
        a.div_(a.sum(1L, true).clamp_min(sc 1e-10)).MoveToOuterDisposeScope()

    /// As `normalised`, written over `target` (a tensor of the block's shape, reused: no allocation of its size).
    let normaliseInto (target: torch.Tensor) (mask: torch.Tensor option) (b: DeviceBlock) =
        use scope = torch.NewDisposeScope()
        target.copy_(b.Values).abs_() |> ignore
        match mask with
        | Some m ->
            target.mul_(m.index_select(0L, b.Rows).unsqueeze(1)).mul_(m.index_select(0L, b.Cols).unsqueeze(0)) |> ignore
        | None -> ()
        target.div_(target.sum(1L, true).clamp_min(sc 1e-10)) |> ignore

    /// Σ_{k≥1} w·Â^k over the nodes [n] (float64), from weights `w` [n], with Â given block by block (`norms`, each
    /// the row-normalised |A| of the block with the same index).
    let influenceOver (nNodes: int) (blocks: DeviceBlock[]) (norms: torch.Tensor[]) (w: torch.Tensor) : torch.Tensor =
        use scope = torch.NewDisposeScope()
        let device = w.device
        let total = torch.zeros([| int64 nNodes |], dtype = torch.float64, device = device)
        let mutable prod = w.to_type(torch.float64)
        let mutable iterations = 0
        let mutable go = true
        while go do
            use step = torch.NewDisposeScope()
            let next = torch.zeros([| int64 nNodes |], dtype = torch.float64, device = device)
            for i in 0 .. blocks.Length - 1 do
                let b = blocks[i]
                let x = prod.index_select(0L, b.Rows)
                if x.ne(sc 0.0).any().item<bool> () then
                    next.index_add_(0L, b.Cols, x.to_type(torch.float32).unsqueeze(0).matmul(norms[i]).squeeze(0).to_type(torch.float64), sc 1.0) |> ignore
            if not (next.ne(sc 0.0).any().item<bool> ()) then go <- false
            else
                total.add_(next) |> ignore
                prod.Dispose()
                prod <- next.DetachFromDisposeScope()
                iterations <- iterations + 1
                if iterations > 4 * nNodes + 16 then
                    invalidOp "influence did not converge: the adjacency has a cycle (an edge from a node to an earlier one)"
        prod.Dispose()
        total.MoveToOuterDisposeScope()

    /// Σ_{k≥1} w·Â^k over the nodes [n] (float64), from weights `w` [n], with Â the row-normalised |A| of the blocks
    /// (restricted to the nodes of `mask` when given). Holds one normalised copy of the adjacency while it runs.
    let influence (nNodes: int) (blocks: DeviceBlock seq) (mask: torch.Tensor option) (w: torch.Tensor) : torch.Tensor =
        let blocks = Array.ofSeq blocks
        let norms = blocks |> Array.map (normalised mask)
        try influenceOver nNodes blocks norms w
        finally for t in norms do t.Dispose()
