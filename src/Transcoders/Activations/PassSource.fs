namespace Transcoders.Activations

open System
open TorchSharp

/// One model pass over a batch of token rows: hook name -> activation [B, P, ...] (trailing dimensions are
/// flattened into d, so hook_z [B, P, H, d_head] gives rows of H·d_head), plus optional masks [B, P]
/// (bool, or integers where nonzero means true).
type Pass =
    { Activations: Map<string, torch.Tensor>
      /// Positions holding real tokens (false on padding); None when every position is valid.
      Valid: torch.Tensor option
      /// Positions holding a BOS token, for `BosFilter.DropMarked`.
      Bos: torch.Tensor option }

/// Functions over `Pass`.
module Pass =
    /// A pass with every position valid and no BOS marks: what a model's run-with-cache returns.
    let ofMap (activations: Map<string, torch.Tensor>) = { Activations = activations; Valid = None; Bos = None }

    /// Disposes the activations and masks.
    let dispose (p: Pass) =
        for t in p.Activations.Values do t.Dispose()
        p.Valid |> Option.iter (fun t -> t.Dispose())
        p.Bos |> Option.iter (fun t -> t.Dispose())

/// What to do with BOS positions. Their activations are outliers (attention sinks, huge residual norms)
/// that dominate a reconstruction loss and carry no information about the text, so coders usually skip them.
type BosFilter =
    /// Train on every position.
    | KeepBos
    /// Drop position 0 of every row: rows packed as in TransformerLens / SAELens, where each row starts with BOS.
    | DropFirstPosition
    /// Drop the positions `Pass.Bos` marks: packings that put a BOS before every document, mid-row too.
    | DropMarked

/// Turning a pass into aligned rows.
module PassRows =
    let private mask (name: string) (B: int64) (P: int64) (device: torch.Device) (m: torch.Tensor) =
        if m.shape <> [| B; P |] then
            invalidArg name (sprintf "pass %s mask has shape %s, expected [B, P] = [%d, %d]" name (Rows.showShape m.shape) B P)
        let onDevice = m.``to``(device)
        match m.dtype with
        | torch.ScalarType.Bool -> onDevice
        | torch.ScalarType.Byte | torch.ScalarType.Int8 | torch.ScalarType.Int16 | torch.ScalarType.Int32
        | torch.ScalarType.Int64 -> onDevice.ne(torch.tensor(0L, device = device))
        | t -> invalidArg name (sprintf "pass %s mask has dtype %A; use bool (or integers, nonzero = true)" name t)

    /// The rows of `hooks` in `pass`: each [B, P, ...] becomes [n, d], keeping positions that are valid and
    /// not BOS (per `bos`), in row-major (batch row, position) order; the same positions for every hook,
    /// so rows stay aligned. Pure: `pass` is left as it was; the caller owns the result.
    let flatten (hooks: string list) (bos: BosFilter) (pass: Pass) : Rows =
        if hooks.IsEmpty then invalidArg "hooks" "no hooks to flatten"
        let find h =
            match pass.Activations.TryFind h with
            | Some t -> t
            | None ->
                invalidArg "pass" (sprintf "the pass has no hook '%s' (has: %s)" h (String.Join(", ", pass.Activations.Keys)))
        let first = find hooks.Head
        if first.dim() < 3L then
            invalidArg "pass" (sprintf "hook '%s' has shape %s, expected [B, P, d...]" hooks.Head (Rows.showShape first.shape))
        let B, P = first.shape[0], first.shape[1]
        for h in hooks do
            let t = find h
            if t.dim() < 3L || t.shape[0] <> B || t.shape[1] <> P then
                invalidArg "pass"
                    (sprintf "hook '%s' has shape %s but hook '%s' has %s: every hook must be [B, P, d...] with the same B and P"
                        h (Rows.showShape t.shape) hooks.Head (Rows.showShape first.shape))
        use _ = torch.NewDisposeScope()
        let device = first.device
        let valid = pass.Valid |> Option.map (mask "Valid" B P device)
        let notBos =
            match bos with
            | KeepBos -> None
            | DropFirstPosition ->
                let m = torch.ones([| B; P |], dtype = torch.ScalarType.Bool, device = device)
                if P > 0L then m.narrow(1L, 0L, 1L).fill_(false) |> ignore
                Some m
            | DropMarked ->
                match pass.Bos with
                | Some b -> Some((mask "Bos" B P device b).logical_not())
                | None -> invalidArg "pass" "BosFilter.DropMarked needs the pass's Bos mask, and the pass has none"
        let keep =
            match valid, notBos with
            | Some v, Some b -> Some(v.logical_and b)
            | Some m, None | None, Some m -> Some m
            | None, None -> None
        let index = keep |> Option.map (fun k -> k.reshape(B * P).nonzero().reshape(-1L))
        let rows =
            hooks
            |> List.map (fun h ->
                let t = find h
                let d = t.shape[2..] |> Array.fold (*) 1L
                let flat = t.reshape(B * P, d)
                let r =
                    match index with
                    | Some i -> flat.index_select(0L, (if i.device = t.device then i else i.``to``(t.device)))
                    | None -> flat.alias()
                h, r.MoveToOuterDisposeScope())
        Map.ofList rows

/// Rows from a model: calls `next` for one pass at a time (None = no more text), flattens it with
/// `PassRows.flatten`, and serves its rows in order. The source takes ownership of each pass and disposes
/// its tensors once flattened.
///
/// Resuming: a source created at `start` = {Chunk = k; Row = r} expects `next` to produce pass k first
/// (the caller positions its token stream there; token batches are cheap to regenerate) and skips that
/// pass's first r rows. Passes whose every position is masked count as finished chunks.
[<Sealed>]
type PassSource(hooks: string list, bos: BosFilter, next: unit -> Pass option, ?start: Position) =
    let start = defaultArg start Position.Start
    do
        if hooks.IsEmpty then invalidArg "hooks" "a pass source needs at least one hook"
        if List.distinct hooks <> hooks then invalidArg "hooks" "a pass source lists a hook twice"
        if start.Epoch < 0L || start.Chunk < 0L || start.Row < 0L then
            invalidArg "start" (sprintf "position (%O) has a negative field" start)
    let mutable chunk = start.Chunk
    let mutable skip = start.Row
    let mutable current: Rows option = None
    let mutable count = 0L
    let mutable offset = 0L
    let mutable exhausted = false
    let mutable disposed = false

    let release () =
        current |> Option.iter Rows.dispose
        current <- None
        offset <- 0L

    /// Loads the next pass with at least one row, or marks the source exhausted.
    let rec load () =
        match next () with
        | None -> exhausted <- true
        | Some pass ->
            let rows =
                try PassRows.flatten hooks bos pass
                finally Pass.dispose pass
            // Held across calls: out of any scope the caller has open.
            for t in rows.Values do t.DetachFromDisposeScope() |> ignore
            let n = Rows.count rows
            let first = skip
            skip <- 0L
            if first > 0L && first >= n then
                Rows.dispose rows
                invalidArg "start"
                    (sprintf "resuming at (%O): pass %d has only %d rows; the producer is not positioned at that pass" start chunk n)
            if n = 0L then
                chunk <- chunk + 1L
                load ()
            else
                current <- Some rows
                count <- n
                offset <- first

    /// A source of the hooks `spec`'s coders use (validated), from passes produced by `next`.
    static member ForSpec(spec: ActivationSpec, bos: BosFilter, next: unit -> Pass option, ?start: Position) =
        spec.Validate()
        new PassSource(spec.Hooks, bos, next, ?start = start)

    /// A source over a model that never runs out of text: `run ()` returns hook -> [B, P, d] for the next batch.
    static member OfModel(hooks: string list, bos: BosFilter, run: unit -> Map<string, torch.Tensor>, ?start: Position) =
        new PassSource(hooks, bos, (fun () -> Some(Pass.ofMap (run ()))), ?start = start)

    interface IRowSource with
        member _.Hooks = hooks

        member s.Read(maxRows) =
            ObjectDisposedException.ThrowIf(disposed, s)
            if maxRows < 1L then invalidArg "maxRows" (sprintf "read at least 1 row, not %d" maxRows)
            if current.IsNone && not exhausted then load ()
            match current with
            | None -> None
            | Some rows ->
                let take = min maxRows (count - offset)
                let out = rows |> Map.map (fun _ t -> t.narrow(0L, offset, take))
                offset <- offset + take
                if offset = count then
                    release ()
                    chunk <- chunk + 1L
                Some out

        member _.Position = { Epoch = start.Epoch; Chunk = chunk; Row = (if current.IsSome then offset else skip) }

    interface IDisposable with
        member _.Dispose() =
            if not disposed then
                disposed <- true
                release ()
