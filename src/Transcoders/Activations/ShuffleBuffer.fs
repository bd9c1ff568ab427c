namespace Transcoders.Activations

open System
open System.Collections.Generic
open System.IO
open System.Text.Json
open TorchSharp
open Transcoders.Files

/// Settings of a `ShuffleBuffer`.
type ShuffleBufferConfig =
    { /// Capacity N in rows (the pool one cycle shuffles); a multiple of `BatchSize`.
      Rows: int64
      /// Rows per served batch.
      BatchSize: int64
      /// Fraction of each cycle's pool kept for the next cycle, in [0, 1): 0.5 as in the transcoder paper and
      /// SAELens; 0 serves each pool whole (a block shuffle) and makes the resume state a few numbers.
      Mix: float
      /// Seed of the permutations; the same seed and source give the same batches on every device.
      Seed: int64
      /// Drop the last, partial batch of a finite source (otherwise it is served, smaller than `BatchSize`).
      DropLast: bool
      /// Where the pool lives: the CPU holds a larger pool than an accelerator can spare (SAELens PR #159).
      Device: torch.Device
      /// Element type of the pool: Float32, or BFloat16 / Float16 for half the memory.
      StorageDType: torch.ScalarType
      /// Where batches are served (the training device).
      ServeDevice: torch.Device
      /// Element type of served batches.
      ServeDType: torch.ScalarType }

    /// The transcoder paper's buffer (262,144 rows, batches of 4,096, half mixed), on the CPU, in float32.
    static member Default =
        { Rows = 262_144L; BatchSize = 4096L; Mix = 0.5; Seed = 42L; DropLast = false
          Device = torch.CPU; StorageDType = torch.ScalarType.Float32
          ServeDevice = torch.CPU; ServeDType = torch.ScalarType.Float32 }

    /// Fails with a message naming the field at fault.
    member c.Validate() =
        if c.BatchSize < 1L then invalidArg "BatchSize" (sprintf "BatchSize must be at least 1, got %d" c.BatchSize)
        if c.Rows < c.BatchSize || c.Rows % c.BatchSize <> 0L then
            invalidArg "Rows" (sprintf "Rows (%d) must be a positive multiple of BatchSize (%d)" c.Rows c.BatchSize)
        if c.Rows > int64 Int32.MaxValue then invalidArg "Rows" (sprintf "Rows (%d) must be below 2^31" c.Rows)
        if not (c.Mix >= 0.0 && c.Mix < 1.0) then invalidArg "Mix" (sprintf "Mix must be in [0, 1), got %g" c.Mix)
        let floating = [ torch.ScalarType.Float32; torch.ScalarType.BFloat16; torch.ScalarType.Float16; torch.ScalarType.Float64 ]
        if not (List.contains c.StorageDType floating) then
            invalidArg "StorageDType" (sprintf "StorageDType must be a floating type, got %A" c.StorageDType)
        if not (List.contains c.ServeDType floating) then
            invalidArg "ServeDType" (sprintf "ServeDType must be a floating type, got %A" c.ServeDType)

/// Where a buffer stands, enough to resume it exactly (see `ShuffleBuffer`). Plain data, saved as JSON.
type ShuffleBufferState =
    { Seed: int64
      Rows: int64
      BatchSize: int64
      Mix: float
      DropLast: bool
      /// The pool's element type: rows are rounded to it, so resuming with another would change them.
      StorageDType: torch.ScalarType
      /// The cycle being served (0 first).
      Cycle: int64
      /// Batches of this cycle already served.
      BatchInCycle: int64
      BatchesServed: int64
      RowsServed: int64
      /// The source's position when this cycle began filling.
      SourceAtCycleStart: Position
      /// Rows this cycle's pool carried over from the previous cycle (their values are in the state file).
      CarriedIn: int64 }

    /// The state as JSON text.
    member s.ToJson() =
        JsonFields.render (fun w ->
            w.WriteStartObject()
            w.WriteString("format", "transcoders.shuffle-buffer-state")
            w.WriteNumber("version", 1)
            w.WriteNumber("seed", s.Seed)
            w.WriteNumber("rows", s.Rows)
            w.WriteNumber("batch_size", s.BatchSize)
            w.WriteNumber("mix", s.Mix)
            w.WriteBoolean("drop_last", s.DropLast)
            w.WriteString("storage_dtype", string s.StorageDType)
            w.WriteNumber("cycle", s.Cycle)
            w.WriteNumber("batch_in_cycle", s.BatchInCycle)
            w.WriteNumber("batches_served", s.BatchesServed)
            w.WriteNumber("rows_served", s.RowsServed)
            JsonFields.writePosition w "source_at_cycle_start" s.SourceAtCycleStart
            w.WriteNumber("carried_in", s.CarriedIn)
            w.WriteEndObject())

    /// Parses `ToJson`'s text; `path` names the file in errors.
    static member OfJson(path: string, text: string) =
        use doc = JsonFields.parse path text
        let o = doc.RootElement
        let where = "buffer state"
        let format = JsonFields.text path where "format" o
        if format <> "transcoders.shuffle-buffer-state" then
            JsonFields.fail path (sprintf "format is '%s', not a shuffle buffer state" format)
        let version = JsonFields.integer path where "version" o
        if version <> 1L then JsonFields.fail path (sprintf "buffer state version %d is not supported (this library reads 1)" version)
        { Seed = JsonFields.integer path where "seed" o
          Rows = JsonFields.natural path where "rows" o
          BatchSize = JsonFields.natural path where "batch_size" o
          Mix = JsonFields.number path where "mix" o
          DropLast = JsonFields.boolean path where "drop_last" o
          StorageDType =
            let name = JsonFields.text path where "storage_dtype" o
            match Enum.TryParse<torch.ScalarType> name with
            | true, t when Enum.IsDefined t -> t
            | _ -> JsonFields.fail path (sprintf "storage_dtype '%s' is not a torch element type" name)
          Cycle = JsonFields.natural path where "cycle" o
          BatchInCycle = JsonFields.natural path where "batch_in_cycle" o
          BatchesServed = JsonFields.natural path where "batches_served" o
          RowsServed = JsonFields.natural path where "rows_served" o
          SourceAtCycleStart = JsonFields.position path where "source_at_cycle_start" o
          CarriedIn = JsonFields.natural path where "carried_in" o }

/// A mixing buffer between a row source and coder training, storing every hook's rows together so that
/// input and target rows stay paired.
///
/// Each cycle tops the pool up to N rows from the source, draws a seeded permutation of the pool, serves
/// its first ⌊N·(1−Mix)/B⌋·B rows as batches of B, and carries the rest, in permutation order, to the next
/// cycle (the scheme of the transcoder paper and SAELens' mixing buffer). Why it mixes contexts well: one
/// model pass yields B_lm·P rows from a few documents, strongly correlated; a batch is a uniform sample
/// of a pool drawn from N/(B_lm·P) passes, so any one pass supplies only B·B_lm·P/N of its rows on
/// average (64 of 4,096 with the paper's sizes), and a carried row survives each further cycle with
/// probability Mix, so consecutive fills blend instead of meeting at a hard boundary. When the source
/// runs out, the last pool is served whole: a finite source has every row served exactly once (the last
/// batch may be short, or dropped with `DropLast`).
///
/// The pool is a preallocated [N, d] tensor per hook owned by the buffer; rows are written into free slots
/// and batches gathered by index, so a cycle moves each row once in and once out and no pool-sized
/// temporary is made. Memory: N·Σd·sizeof(StorageDType), plus one batch. Permutations come from
/// `SeededShuffle` on the host: the same on every device.
///
/// Exact resume: the batches that follow depend only on the seed, the cycle, the source from the cycle's
/// starting position on, the rows carried into the cycle, and how many of its batches were served —
/// which is `State`. `SaveState` writes it with the carried rows (none when Mix = 0, or in the first
/// cycle); `ShuffleBuffer.Resume` with a source created at `State.SourceAtCycleStart` refills the cycle,
/// redraws its permutation and skips the batches already served, so the subsequent batches are
/// bit-identical. (A source that cannot be positioned can be replayed from its start instead, serving
/// and discarding `BatchesServed` batches.)
///
/// The buffer owns its source and disposes it. Served batches belong to the caller.
[<Sealed>]
type ShuffleBuffer private (config: ShuffleBufferConfig, source: IRowSource, resume: (ShuffleBufferState * Rows) option) =
    do config.Validate()
    let N = int config.Rows
    let B = int config.BatchSize
    let hooks = source.Hooks
    do
        if hooks.IsEmpty then invalidArg "source" "the source serves no hooks"
    let storage = Dictionary<string, torch.Tensor>()
    /// Logical pool order -> storage slot. The permutation is drawn over logical indices.
    let pool = Array.zeroCreate<int> N
    let mutable poolCount = 0
    let free = Stack<int>(N)
    do for s in N - 1 .. -1 .. 0 do free.Push s
    let mutable pendingResume = resume
    let mutable started = false
    let mutable cycle = 0L
    let mutable perm: int[] = [||]
    let mutable nServe = 0
    let mutable batchesInCycle = 0L
    let mutable served = 0L
    let mutable batchesServed = 0L
    let mutable rowsServed = 0L
    let mutable exhausted = false
    let mutable finished = false
    let mutable sourceAtCycleStart = source.Position
    let mutable carriedIn = 0
    let mutable disposed = false

    let ensureStorage (rows: Rows) =
        if storage.Count = 0 then
            for h in hooks do
                let t = torch.empty([| int64 N; rows[h].shape[1] |], dtype = config.StorageDType, device = config.Device)
                t.DetachFromDisposeScope() |> ignore
                storage[h] <- t
        else
            for h in hooks do
                if rows[h].shape[1] <> storage[h].shape[1] then
                    invalidArg "rows"
                        (sprintf "hook '%s' rows have d = %d, but earlier rows had d = %d" h rows[h].shape[1] storage[h].shape[1])

    let indexOf (slots: int seq) =
        torch.tensor(slots |> Seq.map int64 |> Array.ofSeq, device = config.Device)

    /// Writes rows (already validated, at most the free slots) into free slots at the end of the pool.
    let append (rows: Rows) =
        use _ = torch.NewDisposeScope()
        let n = int (Rows.count rows)
        ensureStorage rows
        let slots = Array.init n (fun _ -> free.Pop())
        let idx = indexOf slots
        for h in hooks do
            let r = rows[h].to_type(config.StorageDType).``to``(config.Device)
            storage[h].index_copy_(0L, idx, r) |> ignore
        Array.blit slots 0 pool poolCount n
        poolCount <- poolCount + n

    let fill () =
        while poolCount < N && not exhausted do
            use _ = torch.NewDisposeScope()
            let want = N - poolCount
            match source.Read(int64 want) with
            | None -> exhausted <- true
            | Some rows ->
                let n = Rows.validate "row source" hooks rows
                if n < 1L || n > int64 want then
                    invalidArg "source" (sprintf "the row source returned %d rows when asked for 1 to %d" n want)
                append rows

    let beginServing () =
        if poolCount = 0 then finished <- true
        else
            perm <- SeededShuffle.permutation config.Seed "shuffle-buffer" cycle poolCount
            nServe <-
                if exhausted then (if config.DropLast then poolCount / B * B else poolCount)
                else min poolCount (max B (int (floor (float poolCount * (1.0 - config.Mix) / float B)) * B))
            batchesInCycle <- int64 ((nServe + B - 1) / B)
            served <- 0L
            if batchesInCycle = 0L then finished <- true

    let startCycle () =
        if started then
            for i in 0 .. nServe - 1 do free.Push pool[perm[i]]
            let carried = Array.init (poolCount - nServe) (fun i -> pool[perm[nServe + i]])
            Array.blit carried 0 pool 0 carried.Length
            poolCount <- carried.Length
            cycle <- cycle + 1L
        started <- true
        sourceAtCycleStart <- source.Position
        carriedIn <- poolCount
        fill ()
        beginServing ()

    /// Checks, before anything is read, that `state` can be resumed with this config and source.
    let checkResume (state: ShuffleBufferState) (carried: Rows) =
        let expect name (a: 'a) (b: 'a) =
            if a <> b then
                invalidArg "state" (sprintf "the saved state has %s = %A but the buffer's config has %A" name a b)
        expect "Seed" state.Seed config.Seed
        expect "Rows" state.Rows config.Rows
        expect "BatchSize" state.BatchSize config.BatchSize
        expect "Mix" state.Mix config.Mix
        expect "DropLast" state.DropLast config.DropLast
        expect "StorageDType" state.StorageDType config.StorageDType
        if source.Position <> state.SourceAtCycleStart then
            invalidArg "source"
                (sprintf "the source is at (%O) but the state's cycle began at (%O): create the source at that position"
                    source.Position state.SourceAtCycleStart)
        if state.CarriedIn > int64 N then
            invalidArg "state" (sprintf "the state carries %d rows, more than the capacity %d" state.CarriedIn N)
        if state.CarriedIn > 0L then
            let n = Rows.validate "saved buffer state" hooks carried
            if n <> state.CarriedIn then
                invalidArg "state" (sprintf "the state carries %d rows but %d were given" state.CarriedIn n)

    do resume |> Option.iter (fun (state, carried) -> checkResume state carried)

    /// Refills the saved cycle and skips the batches it had served.
    let restore (state: ShuffleBufferState) (carried: Rows) =
        started <- true
        cycle <- state.Cycle
        sourceAtCycleStart <- state.SourceAtCycleStart
        if state.CarriedIn > 0L then append carried
        carriedIn <- poolCount
        fill ()
        beginServing ()
        if state.BatchInCycle > batchesInCycle then
            invalidArg "state"
                (sprintf "the state has served %d batches of cycle %d, but the refilled cycle has only %d: the source differs from the one saved"
                    state.BatchInCycle state.Cycle batchesInCycle)
        served <- state.BatchInCycle
        batchesServed <- state.BatchesServed
        rowsServed <- state.RowsServed

    /// A buffer over `source` (which it owns from now on).
    new(config: ShuffleBufferConfig, source: IRowSource) = new ShuffleBuffer(config, source, None)

    /// Resumes from `state` and the rows its cycle carried in (`LoadState` reads both from a file; the buffer
    /// takes ownership of them); `source` must be at `state.SourceAtCycleStart`.
    static member Resume(config: ShuffleBufferConfig, source: IRowSource, state: ShuffleBufferState, carried: Rows) =
        // Held until the first batch: out of any scope the caller has open.
        for t in carried.Values do t.DetachFromDisposeScope() |> ignore
        try new ShuffleBuffer(config, source, Some(state, carried))
        with _ ->
            Rows.dispose carried
            reraise ()

    /// Resumes from `state` when it carries no rows (Mix = 0, or the first cycle); `source` must be at
    /// `state.SourceAtCycleStart`. Otherwise use the file written by `SaveState`.
    static member Resume(config: ShuffleBufferConfig, source: IRowSource, state: ShuffleBufferState) =
        if state.CarriedIn > 0L then
            invalidArg "state"
                (sprintf "the state's cycle carried %d rows from the previous one: resume from the file SaveState wrote" state.CarriedIn)
        ShuffleBuffer.Resume(config, source, state, Map.empty)

    /// Resumes from a file written by `SaveState`; `source` must be at the state's `SourceAtCycleStart`.
    static member Resume(config: ShuffleBufferConfig, source: IRowSource, path: string) =
        let state, carried = ShuffleBuffer.LoadState(path, config.Device)
        ShuffleBuffer.Resume(config, source, state, carried)

    /// Reads a state file: the state and the carried rows (on `device`, the caller owns them).
    static member LoadState(path: string, device: torch.Device) : ShuffleBufferState * Rows =
        use r = Safetensors.Reader.Open path
        let text =
            match r.Metadata.TryFind "state" with
            | Some t -> t
            | None -> JsonFields.fail path "no 'state' in the metadata: not a shuffle buffer state file"
        let state = ShuffleBufferState.OfJson(path, text)
        let carried =
            r.Entries
            |> List.map (fun e ->
                if e.Shape.Length <> 2 || e.Shape[0] <> state.CarriedIn then
                    JsonFields.fail path
                        (sprintf "tensor '%s' has shape %s, expected [%d, d] (carried rows)" e.Name (Rows.showShape e.Shape) state.CarriedIn)
                e.Name, r.Tensor(e.Name, device))
            |> Map.ofList
        state, carried

    /// The hooks each batch carries.
    member _.Hooks = hooks

    /// Bytes the pool takes (0 until the first rows arrive).
    member _.MemoryBytes = storage.Values |> Seq.sumBy (fun t -> t.NumberOfElements * t.ElementSize)

    /// Where the buffer stands (see the type's comment).
    member _.State =
        match pendingResume with
        | Some(state, _) -> state
        | None ->
            { Seed = config.Seed; Rows = config.Rows; BatchSize = config.BatchSize; Mix = config.Mix
              DropLast = config.DropLast; StorageDType = config.StorageDType; Cycle = cycle; BatchInCycle = served; BatchesServed = batchesServed
              RowsServed = rowsServed; SourceAtCycleStart = sourceAtCycleStart; CarriedIn = int64 carriedIn }

    /// Writes `State` and the rows carried into the current cycle (in StorageDType) to `path`, atomically,
    /// as safetensors: the state JSON under the metadata key "state", one [CarriedIn, d] tensor per hook.
    member b.SaveState(path: string) =
        ObjectDisposedException.ThrowIf(disposed, b)
        let state = b.State
        let metadata = Map.ofList [ "format", "transcoders.shuffle-buffer-state"; "state", state.ToJson() ]
        match pendingResume with
        | Some(_, carried) -> Safetensors.save path metadata (Map.toList carried)
        | None ->
            use _ = torch.NewDisposeScope()
            let tensors =
                if storage.Count = 0 then []
                else
                    let idx = indexOf pool[0 .. carriedIn - 1]
                    [ for h in hooks -> h, storage[h].index_select(0L, idx) ]
            Safetensors.save path metadata tensors

    /// The next batch (hook -> [B, d] in ServeDType on ServeDevice), or None once a finite source is spent.
    member b.Next() : Batch option =
        ObjectDisposedException.ThrowIf(disposed, b)
        match pendingResume with
        | Some(state, carried) ->
            pendingResume <- None
            try restore state carried
            finally Rows.dispose carried
        | None -> ()
        if not finished && (not started || served = batchesInCycle) then startCycle ()
        if finished then None
        else
            let first = int served * B
            let count = min B (nServe - first)
            use _ = torch.NewDisposeScope()
            let idx = indexOf (Seq.init count (fun i -> pool[perm[first + i]]))
            let batch =
                hooks
                |> List.map (fun h ->
                    // Moved in the storage dtype (half the bytes when it is bf16), converted on the training device.
                    let rows = storage[h].index_select(0L, idx).``to``(config.ServeDevice).to_type(config.ServeDType)
                    h, rows.MoveToOuterDisposeScope())
                |> Map.ofList
            served <- served + 1L
            batchesServed <- batchesServed + 1L
            rowsServed <- rowsServed + int64 count
            Some batch

    /// The remaining batches, lazily.
    member b.Batches() : Batch seq =
        Seq.unfold (fun () -> b.Next() |> Option.map (fun batch -> batch, ())) ()

    interface IDisposable with
        member _.Dispose() =
            if not disposed then
                disposed <- true
                for t in storage.Values do t.Dispose()
                storage.Clear()
                pendingResume |> Option.iter (snd >> Rows.dispose)
                source.Dispose()
