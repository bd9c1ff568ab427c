/// A seeded fuzz test of every file loader: valid artefacts (a GPT-2 and a Llama Hugging Face folder, our own model
/// folders, llama2.c files, coder files, graph files, training checkpoints) are damaged in many ways (header bytes,
/// the header length, offsets, dtypes, shapes, truncation, tensors dropped, added, resized or re-encoded,
/// non-finite weights, config values from 0 to 2^31 and beyond) and loaded. Each case must either load exactly
/// what the undamaged artefact holds, or raise one of the library's errors naming the damaged file; never a
/// native or runtime exception, a hang, or an allocation far beyond the files' size.
module Transcoders.Tests.FuzzTests

open System
open System.Buffers.Binary
open System.Diagnostics
open System.IO
open System.Text
open System.Text.Encodings.Web
open System.Text.Json
open System.Text.Json.Nodes
open System.Threading.Tasks
open Expecto
open TorchSharp
open Transcoders.Files
open Transcoders.Models
open Transcoders.Coders
open Transcoders.Circuits
open Transcoders.Training
open Transcoders.Tests.Fixtures

// ------------------------------------------------------------------------------------------- cases and verdicts

/// What a case must do: load (a re-encoding that keeps every value), be refused, or either.
type private Expectation =
    | Either
    | MustLoad
    | MustRefuse

/// One damaged artefact: `File` (relative to the artefact's folder) is replaced by `Mutate` of its bytes
/// (None deletes it).
type private Mutation =
    { Name: string
      File: string
      Expect: Expectation
      Mutate: byte[] -> byte[] option }

/// The library's error types: anything else escaping a loader is a defect.
let private isLibraryError (e: exn) =
    match e with
    | :? CheckpointError | :? Safetensors.SafetensorsError | :? CoderFile.CoderFileError | :? CoderConfigError
    | :? GraphFileError | :? Checkpointing.CheckpointError -> true
    | _ -> false

/// Counts of one family's cases.
type private Tally =
    { Family: string
      mutable Cases: int
      mutable LoadedEqual: int
      mutable Refused: int
      /// The slowest case (seconds, name): reported, not asserted.
      mutable Slowest: float * string
      Failures: ResizeArray<string> }

/// A generous bound on one case: a hang check, not a timing assertion (a case takes milliseconds).
let private caseTimeout = TimeSpan.FromSeconds 20.0

/// Runs `load` on a worker, failing the whole test (naming the case) if it does not finish in time.
let private withinTime (case: string) (load: unit -> 'T) : Choice<'T, exn> =
    let task = Task.Run(Func<Choice<'T, exn>>(fun () -> try Choice1Of2(load ()) with e -> Choice2Of2 e))
    if task.Wait caseTimeout then task.Result
    else failwithf "case %s did not finish within %.0f s: a hang" case caseTimeout.TotalSeconds

/// Loads one damaged artefact and records the verdict.
let private judge (tally: Tally) (case: string) (expect: Expectation) (dir: string) (damaged: string)
                  (load: unit -> 'T) (compare: 'T -> string option) (dispose: 'T -> unit) =
    tally.Cases <- tally.Cases + 1
    let sw = Stopwatch.StartNew()
    let result = withinTime case load
    if sw.Elapsed.TotalSeconds > fst tally.Slowest then tally.Slowest <- sw.Elapsed.TotalSeconds, case
    match result with
    | Choice1Of2 value ->
        try
            match compare value, expect with
            | Some difference, _ -> tally.Failures.Add(sprintf "%s: loaded, but %s" case difference)
            | None, MustRefuse -> tally.Failures.Add(sprintf "%s: loaded, but the damage must be refused" case)
            | None, _ -> tally.LoadedEqual <- tally.LoadedEqual + 1
        finally dispose value
    | Choice2Of2 e ->
        let e = match e with :? AggregateException as a when a.InnerExceptions.Count = 1 -> a.InnerException | e -> e
        let names = e.Message.Contains damaged || (e.Message.Contains dir && e.Message.Contains(Path.GetFileName damaged))
        if not (isLibraryError e) then
            tally.Failures.Add(sprintf "%s: %s, not a library error: %s" case (e.GetType().FullName) e.Message)
        elif not names then tally.Failures.Add(sprintf "%s: the error does not name %s: %s" case damaged e.Message)
        elif expect = MustLoad then tally.Failures.Add(sprintf "%s: refused, but it must load: %s" case e.Message)
        else tally.Refused <- tally.Refused + 1

// ------------------------------------------------------------------------------------------- memory

/// Resident memory now and its peak since the last reset, in bytes (Linux: /proc/self/status; elsewhere the
/// working set for both).
let private residentAndPeak () =
    let fallback () =
        use p = Process.GetCurrentProcess()
        p.WorkingSet64, p.WorkingSet64
    try
        let lines = File.ReadAllLines "/proc/self/status"
        let kb (key: string) =
            lines |> Array.tryFind (fun l -> l.StartsWith key) |> Option.map (fun l -> 1024L * int64 (l.Substring(key.Length).Trim().Split(' ').[0]))
        match kb "VmRSS:", kb "VmHWM:" with
        | Some rss, Some hwm -> rss, hwm
        | _ -> fallback ()
    with _ -> fallback ()

/// Resets the peak (Linux: writing 5 to /proc/self/clear_refs); false where that is not possible.
let private resetPeak () =
    try File.WriteAllText("/proc/self/clear_refs", "5"); true with _ -> false

/// Runs `body` and fails when the process grew (its peak, where measurable) by more than `allowance` bytes.
let private boundedMemory (family: string) (allowance: int64) (body: unit -> unit) =
    GC.Collect()
    GC.WaitForPendingFinalizers()
    let peakKnown = resetPeak ()
    let before, _ = residentAndPeak ()
    body ()
    GC.Collect()
    let after, peak = residentAndPeak ()
    let grown = (if peakKnown then max peak after else after) - before
    printfn "fuzz %-26s memory: %d MB before, %s%d MB after" family (before >>> 20) (if peakKnown then sprintf "peak %d MB, " (peak >>> 20) else "") (after >>> 20)
    if grown > allowance then
        failtestf "%s: the process grew by %d MB (peak), more than the %d MB these tiny files could justify" family (grown >>> 20) (allowance >>> 20)

// ------------------------------------------------------------------------------------------- safetensors bytes

/// One tensor of a safetensors file, as raw little-endian bytes.
type private Raw = { Name: string; DType: string; Shape: int64[]; Data: byte[] }

let private jsonOptions = JsonSerializerOptions(Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping)

/// The header (as JSON) and the data section of safetensors bytes.
let private splitSt (bytes: byte[]) =
    let n = int (BinaryPrimitives.ReadUInt64LittleEndian(ReadOnlySpan(bytes, 0, 8)))
    JsonNode.Parse(Encoding.UTF8.GetString(bytes, 8, n)).AsObject(), bytes[8 + n ..]

/// Safetensors bytes from a header and a data section (the header padded with spaces to a multiple of 8).
let private joinSt (header: JsonObject) (data: byte[]) =
    let text = Encoding.UTF8.GetBytes(header.ToJsonString jsonOptions)
    let padded = Array.append text (Array.create ((8 - text.Length % 8) % 8) (byte ' '))
    let prefix = Array.zeroCreate<byte> 8
    BinaryPrimitives.WriteUInt64LittleEndian(Span prefix, uint64 padded.Length)
    Array.concat [ prefix; padded; data ]

/// The metadata and tensors (in data order) of valid safetensors bytes.
let private readSt (bytes: byte[]) : (string * string) list * Raw list =
    let header, data = splitSt bytes
    let metadata =
        match (header["__metadata__"]) with
        | :? JsonObject as m -> [ for kv in m -> kv.Key, kv.Value.GetValue<string>() ]
        | _ -> []
    let tensors =
        [ for kv in header do
            if kv.Key <> "__metadata__" then
                let o = kv.Value.AsObject()
                let offsets = o["data_offsets"].AsArray() |> Seq.map (fun v -> v.GetValue<int64>()) |> Array.ofSeq
                yield { Name = kv.Key; DType = o["dtype"].GetValue<string>()
                        Shape = o["shape"].AsArray() |> Seq.map (fun v -> v.GetValue<int64>()) |> Array.ofSeq
                        Data = data[int offsets[0] .. int offsets[1] - 1] }, offsets[0] ]
        |> List.sortBy snd |> List.map fst
    metadata, tensors

/// Valid safetensors bytes of these tensors (in this order) and metadata.
let private writeSt (metadata: (string * string) list) (tensors: Raw list) =
    let header = JsonObject()
    if not metadata.IsEmpty then
        let m = JsonObject()
        for k, v in metadata do m[k] <- JsonValue.Create v
        header["__metadata__"] <- m
    let mutable offset = 0L
    for t in tensors do
        let o = JsonObject()
        o["dtype"] <- JsonValue.Create t.DType
        o["shape"] <- JsonArray([| for d in t.Shape -> JsonValue.Create d :> JsonNode |])
        o["data_offsets"] <- JsonArray(JsonValue.Create offset, JsonValue.Create(offset + int64 t.Data.Length))
        offset <- offset + int64 t.Data.Length
        header[t.Name] <- o
    joinSt header (Array.concat [ for t in tensors -> t.Data ])

let private floatsOf (t: Raw) =
    match t.DType with
    | "F32" -> Runtime.InteropServices.MemoryMarshal.Cast<byte, float32>(ReadOnlySpan t.Data).ToArray() |> Array.map float
    | "I64" -> Runtime.InteropServices.MemoryMarshal.Cast<byte, int64>(ReadOnlySpan t.Data).ToArray() |> Array.map float
    | d -> failwithf "fuzz: no conversion from %s" d

let private bytesOf (dtype: string) (values: float[]) : byte[] =
    let cast (xs: 'T[]) = Runtime.InteropServices.MemoryMarshal.AsBytes(ReadOnlySpan<'T> xs).ToArray()
    match dtype with
    | "F64" -> cast values
    | "F32" -> cast (values |> Array.map float32)
    | "F16" -> cast (values |> Array.map Half.op_Explicit)
    | "I64" -> cast (values |> Array.map int64)
    | "I32" -> cast (values |> Array.map int32)
    | "I16" -> cast (values |> Array.map int16)
    | "I8" -> values |> Array.map (fun v -> byte (sbyte v))
    | "U8" -> values |> Array.map (fun v -> byte (max 0.0 (min 255.0 v)))
    | "BOOL" -> values |> Array.map (fun v -> if v > 0.0 then 1uy else 0uy)
    | d -> failwithf "fuzz: no conversion to %s" d

let private sizeOf (dtype: string) =
    match dtype with
    | "F64" | "I64" -> 8 | "F32" | "I32" -> 4 | "F16" | "BF16" | "I16" -> 2 | _ -> 1

// ------------------------------------------------------------------------------------------- mutations

let private some (b: byte[]) = Some b

/// Bytes the random header edits write: JSON punctuation, digits, letters, controls, non-ASCII.
let private interesting =
    Encoding.ASCII.GetBytes "{}[]\":,0123456789-.eE+ \t\nFIUBfalsetrunul\\_x" |> Array.append [| 0uy; 0x7Fuy; 0x80uy; 0xC3uy; 0xFFuy |]

/// Damage to the container of a safetensors file: the length prefix, header bytes (outside `protect`, a byte
/// range), header fields (dtype, shape, data_offsets, names, metadata), truncation and appended bytes.
let private containerMutations (rng: Random) (file: string) (bytes: byte[]) (protect: int * int) (count: int) : Mutation list =
    let headerLength = int (BinaryPrimitives.ReadUInt64LittleEndian(ReadOnlySpan(bytes, 0, 8)))
    let _, raws = readSt bytes
    let pick () = raws[rng.Next raws.Length]
    let withPrefix (n: uint64) = fun (b: byte[]) -> (let c = Array.copy b in BinaryPrimitives.WriteUInt64LittleEndian(Span c, n); some c)
    let editHeader (edit: JsonObject -> unit) = fun (b: byte[]) -> (let h, d = splitSt b in edit h; some (joinSt h d))
    let tensorField (name: string) (field: string) (value: JsonNode) = editHeader (fun h -> h[name].AsObject()[field] <- value)
    let node (text: string) = JsonNode.Parse text
    let lo, hi = protect
    [ // the length prefix
      for i in 1 .. count / 8 do
          let at, v = rng.Next 8, byte (rng.Next 256)
          yield { Name = sprintf "prefix byte %d = %d" at v; File = file; Expect = (if bytes[at] = v then Either else MustRefuse)
                  Mutate = fun b -> (let c = Array.copy b in c[at] <- v; some c) }
      for n in [ 0UL; 1UL; 7UL; uint64 headerLength - 1UL; uint64 headerLength + 1UL; uint64 headerLength + 8UL; uint64 bytes.Length
                 uint64 bytes.Length - 8UL; 1UL <<< 31; 1UL <<< 40; UInt64.MaxValue; 100_000_001UL ] do
          yield { Name = sprintf "header length %d" n; File = file; Expect = MustRefuse; Mutate = withPrefix n }
      // random header bytes
      for _ in 1 .. count do
          let mutable at = 8 + rng.Next headerLength
          while at >= lo && at < hi do at <- 8 + rng.Next headerLength
          let v = interesting[rng.Next interesting.Length]
          yield { Name = sprintf "header byte %d = %A" at (char v); File = file; Expect = Either
                  Mutate = fun b -> (let c = Array.copy b in c[at] <- v; some c) }
      // dtypes relabelled (same bytes): a float read as an integer, an integer as a float, sizes that disagree
      for _ in 1 .. count / 4 do
          let t = pick ()
          let dtype = [| "F32"; "F16"; "BF16"; "F64"; "I64"; "I32"; "I16"; "I8"; "U8"; "BOOL"; "F8_E4M3"; "f32"; ""; "C64" |][rng.Next 14]
          yield { Name = sprintf "'%s' labelled %s" t.Name dtype; File = file; Expect = (if dtype = t.DType then Either else MustRefuse)
                  Mutate = tensorField t.Name "dtype" (JsonValue.Create dtype) }
      // shapes in the header (data unchanged)
      for _ in 1 .. count / 4 do
          let t = pick ()
          let n = Array.fold (*) 1L t.Shape
          let shape, label =
              match rng.Next 8 with
              | 0 -> Array.rev t.Shape, "reversed"
              | 1 -> [| n |], "flattened"
              | 2 -> Array.append [| 1L |] t.Shape, "with a leading 1"
              | 3 -> (if t.Shape.Length = 0 then [| 2L |] else Array.mapi (fun i d -> if i = 0 then d + 1L else d) t.Shape), "one longer"
              | 4 -> [| 1L <<< 40; 1L <<< 40 |], "2^40 x 2^40"
              | 5 -> [| Int64.MaxValue |], "2^63-1"
              | 6 -> [| 0L |], "empty"
              | _ -> [| n; 0L |], "n x 0"
          yield { Name = sprintf "'%s' shape %s" t.Name label; File = file; Expect = (if shape = t.Shape then Either else MustRefuse)
                  Mutate = tensorField t.Name "shape" (JsonArray([| for d in shape -> JsonValue.Create d :> JsonNode |])) }
      for text in [ "[-1]"; "[1.5]"; "\"4\""; "null"; "[[2]]"; "{}"; "[18446744073709551616]" ] do
          let t = pick ()
          yield { Name = sprintf "'%s' shape %s" t.Name text; File = file; Expect = MustRefuse; Mutate = tensorField t.Name "shape" (node text) }
      // data offsets
      for _ in 1 .. count / 4 do
          let t = pick ()
          let h, _ = splitSt bytes
          let offs = (h[t.Name]["data_offsets"]).AsArray() |> Seq.map (fun v -> v.GetValue<int64>()) |> Array.ofSeq
          let b, e = offs[0], offs[1]
          let shifted, label =
              match rng.Next 7 with
              | 0 -> [| b + 4L; e + 4L |], "shifted by 4"
              | 1 -> [| b; e - 1L |], "one byte short"
              | 2 -> [| b; e + 1L |], "one byte long"
              | 3 -> [| e; b |], "swapped"
              | 4 -> [| b; Int64.MaxValue |], "ending at 2^63-1"
              | 5 -> [| b - 1L; e - 1L |], "shifted back by 1"
              | _ -> [| 0L; 0L |], "empty"
          let expect = if shifted = offs || (label = "swapped" && b = e) then Either else MustRefuse
          yield { Name = sprintf "'%s' data_offsets %s" t.Name label; File = file; Expect = expect
                  Mutate = tensorField t.Name "data_offsets" (JsonArray([| for d in shifted -> JsonValue.Create d :> JsonNode |])) }
      for text in [ "[0]"; "[0, 1, 2]"; "[-8, 0]"; "\"0,4\""; "[0.5, 4]"; "[18446744073709551615, 0]" ] do
          let t = pick ()
          yield { Name = sprintf "'%s' data_offsets %s" t.Name text; File = file; Expect = MustRefuse; Mutate = tensorField t.Name "data_offsets" (node text) }
      // names and entries
      let t = pick ()
      yield { Name = sprintf "'%s' renamed" t.Name; File = file; Expect = MustRefuse
              Mutate = editHeader (fun h -> (let v = h[t.Name] in h.Remove t.Name |> ignore; h[t.Name + "_x"] <- v.DeepClone())) }
      yield { Name = sprintf "'%s' removed from the header" t.Name; File = file; Expect = MustRefuse; Mutate = editHeader (fun h -> h.Remove t.Name |> ignore) }
      yield { Name = sprintf "'%s' without dtype" t.Name; File = file; Expect = MustRefuse; Mutate = editHeader (fun h -> h[t.Name].AsObject().Remove "dtype" |> ignore) }
      yield { Name = sprintf "'%s' is a number" t.Name; File = file; Expect = MustRefuse; Mutate = editHeader (fun h -> h[t.Name] <- JsonValue.Create 3) }
      yield { Name = "a duplicate key"; File = file; Expect = MustRefuse
              Mutate = fun b ->
                  let h, d = splitSt b
                  let text = h.ToJsonString jsonOptions
                  let entry = sprintf "\"%s\":%s" t.Name (h[t.Name].ToJsonString jsonOptions)
                  let dup = Encoding.UTF8.GetBytes(text.Substring(0, text.Length - 1) + "," + entry + "}")
                  let prefix = Array.zeroCreate<byte> 8
                  BinaryPrimitives.WriteUInt64LittleEndian(Span prefix, uint64 dup.Length)
                  some (Array.concat [ prefix; dup; d ]) }
      yield { Name = "__metadata__ holds a number"; File = file; Expect = MustRefuse; Mutate = editHeader (fun h -> h["__metadata__"] <- JsonObject([ Collections.Generic.KeyValuePair("format", JsonValue.Create 1 :> JsonNode) ])) }
      yield { Name = "the header is an array"; File = file; Expect = MustRefuse
              Mutate = fun b -> (let _, d = splitSt b in some (Array.concat [ BitConverter.GetBytes 8UL; Encoding.ASCII.GetBytes "[1,2,3] "; d ])) }
      yield { Name = "the header is not UTF-8"; File = file; Expect = MustRefuse
              Mutate = fun b -> (let c = Array.copy b in c[9] <- 0xC3uy; c[10] <- 0x28uy; some c) }
      // truncated, extended, emptied, deleted
      for n in [ 0; 4; 8; 9; 8 + headerLength - 1; 8 + headerLength; 8 + headerLength + 1; bytes.Length - 1 ] @ [ for _ in 1 .. 4 -> 8 + headerLength + rng.Next(max 1 (bytes.Length - 8 - headerLength)) ] do
          if n < bytes.Length then
              yield { Name = sprintf "truncated to %d bytes" n; File = file; Expect = MustRefuse; Mutate = fun b -> some b[.. n - 1] }
      for n in [ 1; 8; 100 ] do
          yield { Name = sprintf "%d bytes appended" n; File = file; Expect = MustRefuse; Mutate = fun b -> some (Array.append b (Array.create n 7uy)) }
      yield { Name = "deleted"; File = file; Expect = MustRefuse; Mutate = fun _ -> None } ]

/// What a family accepts when a tensor is rewritten validly: F64 holds every F32 value (`f64Loads`), extra
/// tensors may be ignored (`extraIgnored`), non-finite values must be refused (`nanRefused`; None: not tested).
type private RewritePolicy =
    { F64Loads: bool
      ExtraIgnored: bool
      NanRefused: bool option
      /// Tensors where NaN is a legitimate value (then only infinities must be refused).
      NanAllowedIn: string list }

/// Valid safetensors files holding the wrong tensors: dropped, added, resized, transposed, re-encoded, non-finite.
let private rewriteMutations (rng: Random) (file: string) (bytes: byte[]) (policy: RewritePolicy) (count: int) : Mutation list =
    let metadata, raws = readSt bytes
    let replace (name: string) (f: Raw -> Raw list) = fun (_: byte[]) -> some (writeSt metadata (raws |> List.collect (fun r -> if r.Name = name then f r else [ r ])))
    let pick () = raws[rng.Next raws.Length]
    let floats = raws |> List.filter (fun r -> r.DType = "F32")
    [ for r in raws |> List.truncate (count / 2) do
          yield { Name = sprintf "'%s' dropped" r.Name; File = file; Expect = MustRefuse; Mutate = replace r.Name (fun _ -> []) }
      yield { Name = "an extra tensor"; File = file; Expect = (if policy.ExtraIgnored then Either else MustRefuse)
              Mutate = fun _ -> some (writeSt metadata (raws @ [ { Name = "extra.weight"; DType = "F32"; Shape = [| 2L |]; Data = Array.zeroCreate 8 } ])) }
      for _ in 1 .. count do
          let r = pick ()
          let n = r.Data.Length / sizeOf r.DType
          let first = if r.Shape.Length = 0 then 1L else r.Shape[0]
          match rng.Next 4 with
          | 0 ->
              // one more row (or element), filled with small values
              let extra = int (int64 n / max 1L first) * sizeOf r.DType
              let shape = if r.Shape.Length = 0 then [| 2L |] else Array.mapi (fun i d -> if i = 0 then d + 1L else d) r.Shape
              yield { Name = sprintf "'%s' one row longer" r.Name; File = file; Expect = MustRefuse
                      Mutate = replace r.Name (fun r -> [ { r with Shape = shape; Data = Array.append r.Data (Array.zeroCreate (max extra (sizeOf r.DType))) } ]) }
          | 1 when first > 1L ->
              let rowBytes = r.Data.Length / int first
              yield { Name = sprintf "'%s' one row shorter" r.Name; File = file; Expect = MustRefuse
                      Mutate = replace r.Name (fun r -> [ { r with Shape = Array.mapi (fun i d -> if i = 0 then d - 1L else d) r.Shape; Data = r.Data[.. r.Data.Length - rowBytes - 1] } ]) }
          | 2 when r.Shape.Length = 2 && r.Shape[0] <> r.Shape[1] ->
              yield { Name = sprintf "'%s' transposed" r.Name; File = file; Expect = MustRefuse
                      Mutate = replace r.Name (fun r -> [ { r with Shape = Array.rev r.Shape } ]) }
          | _ ->
              yield { Name = sprintf "'%s' flattened with a trailing 1" r.Name; File = file; Expect = MustRefuse
                      Mutate = replace r.Name (fun r -> [ { r with Shape = [| int64 n; 1L |] } ]) }
      // re-encoded: integers and booleans cannot hold a weight; F64 holds every F32 value exactly
      for _ in 1 .. count / 2 do
          let r = if floats.IsEmpty then pick () else floats[rng.Next floats.Length]
          let dtype = [| "I32"; "I64"; "U8"; "BOOL"; "I16"; "I8"; "F64"; "F64" |][rng.Next 8]
          let expect =
              if dtype = "F64" && r.DType = "F32" then (if policy.F64Loads then MustLoad else MustRefuse)
              elif dtype = r.DType then Either
              else MustRefuse
          yield { Name = sprintf "'%s' stored as %s" r.Name dtype; File = file; Expect = expect
                  Mutate = replace r.Name (fun r -> [ { r with DType = dtype; Data = bytesOf dtype (floatsOf r) } ]) }
      // non-finite values
      match policy.NanRefused with
      | Some refused when not floats.IsEmpty ->
          for _ in 1 .. count / 2 do
              let r = floats[rng.Next floats.Length]
              let n = r.Data.Length / 4
              if n > 0 then
                  let at = rng.Next n
                  let v = [| nanf; infinityf; -infinityf |][rng.Next 3]
                  let expect = if refused && not (Single.IsNaN v && List.contains r.Name policy.NanAllowedIn) then MustRefuse else Either
                  yield { Name = sprintf "'%s'[%d] = %g" r.Name at v; File = file; Expect = expect
                          Mutate = replace r.Name (fun r -> (let c = Array.copy r.Data in BinaryPrimitives.WriteSingleLittleEndian(Span(c, 4 * at, 4), v); [ { r with Data = c } ])) }
      | _ -> () ]

/// JSON values a config field is set to: around the original (`orig`), zero, negative, huge, beyond int32,
/// fractional, of the wrong kind, null, and the field removed (None).
let private numberValues (orig: int64) : (string * JsonNode option) list =
    let v (x: int64) = Some (JsonValue.Create x :> JsonNode)
    [ "0", v 0L; "-1", v -1L; "orig-1", v (orig - 1L); "orig+1", v (orig + 1L); "2*orig", v (2L * orig)
      "1e6", v 1_000_000L; "1e8", v 100_000_000L; "2^31-1", v (int64 Int32.MaxValue); "2^31", v (1L <<< 31); "2^62", v (1L <<< 62)
      "1e300", Some (JsonValue.Create 1e300 :> JsonNode); "1.5", Some (JsonValue.Create 1.5 :> JsonNode)
      "\"8\"", Some (JsonValue.Create "8" :> JsonNode); "true", Some (JsonValue.Create true :> JsonNode); "[]", Some (JsonArray() :> JsonNode)
      "null", Some null; "removed", None ]

/// Sets (or removes) the field at `path` (object keys, or array indices as numbers) of a JSON file.
let private setJson (path: string list) (value: JsonNode option) (bytes: byte[]) =
    let root = JsonNode.Parse(bytes: byte[])
    let rec go (node: JsonNode) (path: string list) =
        match path with
        | [ last ] ->
            match node with
            | :? JsonArray as a -> (match value with Some v -> a[int last] <- (if isNull v then null else v.DeepClone()) | None -> a.RemoveAt(int last))
            | _ ->
                let o = node.AsObject()
                match value with
                | Some v -> o[last] <- (if isNull v then null else v.DeepClone())
                | None -> o.Remove last |> ignore
        | key :: rest ->
            match node with
            | :? JsonArray as a -> go a[int key] rest
            | _ -> go node[key] rest
        | [] -> ()
    go root path
    some (Encoding.UTF8.GetBytes(root.ToJsonString jsonOptions))

/// Damage to a JSON config: numeric fields (`bounded`: fixed by the tensors, so any other value must be refused)
/// set to every value of `numberValues`, other fields to odd values, random bytes, truncation, deletion.
let private jsonMutations (rng: Random) (file: string) (bytes: byte[]) (bounded: string list list) (loose: string list list) (count: int) : Mutation list =
    let root = JsonNode.Parse(bytes: byte[])
    let valueAt (path: string list) = path |> List.fold (fun (n: JsonNode) k -> match n with :? JsonArray as a -> a[int k] | _ -> n[k]) root
    let origOf path =
        let n = valueAt path
        let mutable v = 0L
        if not (isNull n) && n.GetValueKind() = JsonValueKind.Number && n.AsValue().TryGetValue<int64>(&v) then v else 4L
    [ for path in bounded do
          let orig = origOf path
          for label, value in numberValues orig do
              let same = match value with Some v when not (isNull v) -> v.GetValueKind() = JsonValueKind.Number && (let mutable x = 0L in v.AsValue().TryGetValue<int64>(&x) && x = orig) | _ -> false
              yield { Name = sprintf "%s = %s" (String.Join(".", path)) label; File = file; Expect = (if same then Either else MustRefuse); Mutate = setJson path value }
      for path in loose do
          let orig = origOf path
          for label, value in numberValues orig |> List.filter (fun _ -> rng.Next 2 = 0) do
              yield { Name = sprintf "%s = %s" (String.Join(".", path)) label; File = file; Expect = Either; Mutate = setJson path value }
      for _ in 1 .. count do
          let at = rng.Next bytes.Length
          let v = interesting[rng.Next interesting.Length]
          yield { Name = sprintf "byte %d = %A" at (char v); File = file; Expect = Either; Mutate = fun b -> (let c = Array.copy b in c[at] <- v; some c) }
      for n in [ 0; 1; bytes.Length / 2; bytes.Length - 2 ] do
          yield { Name = sprintf "truncated to %d bytes" n; File = file; Expect = MustRefuse; Mutate = fun b -> some b[.. n - 1] }
      yield { Name = "an array"; File = file; Expect = MustRefuse; Mutate = fun _ -> some (Encoding.UTF8.GetBytes "[1, 2]") }
      yield { Name = "not UTF-8 JSON"; File = file; Expect = MustRefuse; Mutate = fun b -> some (Array.append [| 0xFFuy; 0xFEuy |] b) }
      yield { Name = "deleted"; File = file; Expect = MustRefuse; Mutate = fun _ -> None } ]

// ------------------------------------------------------------------------------------------- running a family

/// Writes the artefact with one mutation applied into a fresh folder under `root`, loads it and judges the result.
let private runCases (tally: Tally) (root: string) (artefact: (string * byte[]) list) (mutations: Mutation list)
                     (load: string -> 'T) (compare: 'T -> string option) (dispose: 'T -> unit) =
    mutations |> List.iteri (fun i m ->
        let dir = Path.Combine(root, sprintf "case%04d" i)
        Directory.CreateDirectory dir |> ignore
        try
            for name, bytes in artefact do
                let target = Path.Combine(dir, name)
                if name = m.File then
                    match m.Mutate bytes with
                    | Some b -> File.WriteAllBytes(target, b)
                    | None -> ()
                else File.WriteAllBytes(target, bytes)
            let case = sprintf "%s #%d (%s: %s)" tally.Family i m.File m.Name
            judge tally case m.Expect dir (Path.Combine(dir, m.File)) (fun () -> load dir) compare dispose
        finally
            try Directory.Delete(dir, true) with _ -> ())

let private report (tally: Tally) (minimum: int) =
    printfn "fuzz %-26s %5d cases: %4d loaded what the undamaged files hold, %4d refused with an error naming the file"
        tally.Family tally.Cases tally.LoadedEqual tally.Refused
    printfn "fuzz %-26s slowest case %.2f s: %s" tally.Family (fst tally.Slowest) (snd tally.Slowest)
    if tally.Failures.Count > 0 then
        failtestf "%s: %d of %d cases went wrong:\n%s" tally.Family tally.Failures.Count tally.Cases
            (tally.Failures |> Seq.truncate 12 |> String.concat "\n")
    Expect.isGreaterThanOrEqual tally.Cases minimum (sprintf "%s: at least %d cases" tally.Family minimum)
    Expect.equal (tally.LoadedEqual + tally.Refused) tally.Cases "every case judged"

let private newTally family = { Family = family; Cases = 0; LoadedEqual = 0; Refused = 0; Slowest = (0.0, ""); Failures = ResizeArray() }

let private filesOf (dir: string) = [ for f in Directory.GetFiles dir -> Path.GetFileName f, File.ReadAllBytes f ]

// ------------------------------------------------------------------------------------------- comparisons

/// Equal values, NaN matching NaN (a new BatchTopK coder's threshold is NaN: not estimated yet).
let private sameValues (a: torch.Tensor) (b: torch.Tensor) =
    use eq = a.eq b
    if a.is_floating_point () then
        use both = a.isnan().logical_and(b.isnan())
        use ok = eq.logical_or both
        ok.all().item<bool> ()
    else eq.all().item<bool> ()

let private sameTensors (what: string) (expected: (string * torch.Tensor) list) (actual: (string * torch.Tensor) list) =
    let e, a = Map.ofList expected, Map.ofList actual
    if Set.ofSeq e.Keys <> Set.ofSeq a.Keys then
        Some (sprintf "%s names differ: %A vs %A" what (Set.ofSeq a.Keys) (Set.ofSeq e.Keys))
    else
        e |> Map.toSeq |> Seq.tryPick (fun (n, t) ->
            let b = a[n]
            if b.shape <> t.shape then Some (sprintf "%s '%s' has shape %A, not %A" what n b.shape t.shape)
            elif b.dtype <> t.dtype || not (sameValues b t) then Some (sprintf "%s '%s' holds other values" what n)
            else None)

/// A model's parameters, detached copies.
let private parametersOf (m: Transformer) = Transformer.parameters m |> List.map (fun (n, p) -> n, p.detach().clone())

let private modelCompare (reference: (string * torch.Tensor) list) (m: Transformer) = sameTensors "parameter" reference (Transformer.parameters m |> List.map (fun (n, p) -> n, p :> torch.Tensor))

// ------------------------------------------------------------------------------------------- artefacts

let private randomFloats (rng: Random) (n: int64) = Array.init (int n) (fun _ -> float32 (rng.NextDouble() * 2.0 - 1.0))

/// A Hugging Face folder of random weights for `tensors` (name, shape) and a config.json.
let private hfFolder (rng: Random) (config: string) (tensors: (string * int64[]) list) =
    let raws = [ for name, shape in tensors -> { Name = name; DType = "F32"; Shape = shape; Data = bytesOf "F32" (randomFloats rng (Array.fold (*) 1L shape) |> Array.map float) } ]
    [ "config.json", Encoding.UTF8.GetBytes config; "model.safetensors", writeSt [ "format", "pt" ] raws ]

let private gpt2Folder (rng: Random) =
    let d, m, v, n, layers = 8L, 20L, 16L, 8L, 2
    let config = """{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new", "n_embd": 8, "n_head": 2,
                    "n_layer": 2, "n_positions": 8, "n_inner": 20, "vocab_size": 16, "layer_norm_epsilon": 1e-05, "tie_word_embeddings": true}"""
    hfFolder rng config
        [ "transformer.wte.weight", [| v; d |]; "transformer.wpe.weight", [| n; d |]
          for l in 0 .. layers - 1 do
              let p = sprintf "transformer.h.%d." l
              yield! [ p + "ln_1.weight", [| d |]; p + "ln_1.bias", [| d |]; p + "attn.c_attn.weight", [| d; 3L * d |]; p + "attn.c_attn.bias", [| 3L * d |]
                       p + "attn.c_proj.weight", [| d; d |]; p + "attn.c_proj.bias", [| d |]; p + "ln_2.weight", [| d |]; p + "ln_2.bias", [| d |]
                       p + "mlp.c_fc.weight", [| d; m |]; p + "mlp.c_fc.bias", [| m |]; p + "mlp.c_proj.weight", [| m; d |]; p + "mlp.c_proj.bias", [| d |] ]
          "transformer.ln_f.weight", [| d |]; "transformer.ln_f.bias", [| d |] ]

let private llamaFolder (rng: Random) =
    let d, m, v, e, kv, layers = 8L, 12L, 16L, 4L, 1L, 2
    let config = """{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": 8, "num_attention_heads": 2,
                    "num_key_value_heads": 1, "num_hidden_layers": 2, "intermediate_size": 12, "max_position_embeddings": 16, "vocab_size": 16,
                    "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "tie_word_embeddings": false, "attention_bias": false, "mlp_bias": false}"""
    hfFolder rng config
        [ "model.embed_tokens.weight", [| v; d |]
          for l in 0 .. layers - 1 do
              let p = sprintf "model.layers.%d." l
              yield! [ p + "input_layernorm.weight", [| d |]; p + "self_attn.q_proj.weight", [| 2L * e; d |]; p + "self_attn.k_proj.weight", [| kv * e; d |]
                       p + "self_attn.v_proj.weight", [| kv * e; d |]; p + "self_attn.o_proj.weight", [| d; 2L * e |]; p + "post_attention_layernorm.weight", [| d |]
                       p + "mlp.gate_proj.weight", [| m; d |]; p + "mlp.up_proj.weight", [| m; d |]; p + "mlp.down_proj.weight", [| d; m |] ]
          "model.norm.weight", [| d |]; "lm_head.weight", [| v; d |] ]

/// Our own folder of a tiny model (learned positions with biases, or rotary, gated, untied).
let private ownFolder (rotary: bool) =
    let c =
        if rotary then { TransformerConfig.llama with DModel = 8; NLayers = 2; NHeads = 2; NKvHeads = 1; DMlp = 12; NCtx = 16; VocabSize = 16 }
        else
            let biases = { Biases.All with Unembed = true }
            { TransformerConfig.gpt2 with DModel = 8; NLayers = 2; NHeads = 2; NKvHeads = 2; DMlp = 16; NCtx = 8; VocabSize = 16; TiedUnembed = false; Biases = biases }
    use m = Transformer.create c torch.CPU
    use dir = new TempDir()
    Checkpoint.save dir.Path Checkpoint.Metadata.Empty m
    filesOf dir.Path

/// A graph with every kind of node and edge (features, errors, tokens, logits), not sorted by block size.
let private fuzzGraph () : Graph * GraphFileInfo =
    let g =
        { Tokens = [| 3; 1; 4; 1; 5 |]; TokenStrings = [| "a"; " \"b\""; "é"; "<c>"; "\n" |]; NLayers = 2
          Features =
            [| { Layer = 0; Position = 1; Feature = 7; Activation = 0.5 }; { Layer = 0; Position = 3; Feature = 2; Activation = 1.25 }
               { Layer = 1; Position = 2; Feature = 9; Activation = 0.75 }; { Layer = 1; Position = 4; Feature = 0; Activation = 2.0 } |]
          Logits = [| { Token = 6; Probability = 0.6; Logit = 3.5 }; { Token = 2; Probability = 0.3; Logit = 2.75 } |]
          // ids: features 0..3, errors 4..13, tokens 14..18, logits 19..20
          Blocks =
            [| { Targets = [| 19; 20 |]; Sources = [| 0; 1; 2; 3; 14; 18; 5 |]; Weights = Array.init 14 (fun i -> float32 i * 0.25f - 1.0f) }
               { Targets = [| 2; 3 |]; Sources = [| 0; 1; 15; 8 |]; Weights = Array.init 8 (fun i -> float32 i * 0.5f) }
               { Targets = [| 0 |]; Sources = [| 14; 15; 16 |]; Weights = [| 1.5f; -2.0f; 0.125f |] } |]
          Settings = { MaxLogits = 10; DesiredLogitProbability = 0.95; BatchSize = 32; MaxFeatureNodes = Some 100; UpdateInterval = 4; CausalCone = true }
          Stats = { ActiveFeatures = 12; Batches = 3; BuildSeconds = 0.5; RankingSeconds = 0.125; EstimatedBytes = 123456L } }
    g, { Scores = Some { Replacement = 0.7; Completeness = 0.9 }; Description = Map.ofList [ "model", "m"; "prompt", "a \"b\" é" ] }

/// The byte range of the "graph" metadata value inside a graph file's header (its contents are the graph itself:
/// a changed digit there is another valid graph, so random bytes stay out of it).
let private graphValueRange (bytes: byte[]) =
    let key = Encoding.ASCII.GetBytes "\"graph\":\""
    let start = (ReadOnlySpan bytes).IndexOf(ReadOnlySpan key) + key.Length
    let mutable i = start
    while bytes[i] <> byte '"' do i <- i + (if bytes[i] = byte '\\' then 2 else 1)
    start, i

/// A JSON mutation applied to the "graph" metadata of a graph file (None removes the key).
let private inGraphJson (m: Mutation) : Mutation =
    { m with
        Name = "graph JSON: " + m.Name
        Mutate = fun bytes ->
            let metadata, raws = readSt bytes
            let json = metadata |> List.find (fst >> (=) "graph") |> snd
            match m.Mutate(Encoding.UTF8.GetBytes json) with
            | Some b -> some (writeSt (metadata |> List.map (fun (k, v) -> if k = "graph" then k, Encoding.UTF8.GetString b else k, v)) raws)
            | None -> some (writeSt (metadata |> List.filter (fst >> (<>) "graph")) raws) }

/// Graph JSON edits that must all be refused (a value in range would be another valid graph, so none is used).
let private graphJsonMutations (file: string) : Mutation list =
    let edit (path: string) (value: string option) =
        { Name = sprintf "%s = %s" path (defaultArg value "removed"); File = file; Expect = MustRefuse
          Mutate = setJson (List.ofArray (path.Split '.')) (value |> Option.map (fun v -> JsonNode.Parse v)) }
    [ for v in [ "0"; "-1"; "1"; "3"; "4"; "2147483647"; "2147483648"; "1.5"; "\"2\""; "null"; "[]" ] do yield edit "n_layers" (Some v)
      yield edit "n_layers" None
      for v in [ "-1"; "-2147483648"; "2147483648"; "1.5"; "\"a\""; "null"; "true"; "[3]" ] do yield edit "tokens.0" (Some v)
      yield edit "tokens.4" None
      for v in [ "[]"; "\"x\""; "null"; "{}" ] do yield edit "tokens" (Some v)
      yield edit "tokens" None
      for v in [ "[\"a\"]"; "5"; "[1, 2, 3, 4, 5]" ] do yield edit "token_strings" (Some v)
      yield edit "token_strings" None
      for v in [ "[0, 1, 7]"; "5"; "null"; "[0, 1, 7, 0.5, 1]" ] do yield edit "features.0" (Some v)
      for v in [ "-1"; "2"; "1.5"; "\"0\""; "null" ] do yield edit "features.0.0" (Some v)
      for v in [ "-1"; "5"; "2147483648" ] do yield edit "features.0.1" (Some v)
      for v in [ "-1"; "\"x\"" ] do yield edit "features.0.2" (Some v)
      for v in [ "null"; "\"x\""; "1e999" ] do yield edit "features.0.3" (Some v)
      yield edit "features" (Some "{}")
      for v in [ "1.5"; "-0.1"; "null"; "\"x\"" ] do yield edit "logits.0.probability" (Some v)
      for v in [ "-1"; "1.5"; "null" ] do yield edit "logits.0.token" (Some v)
      yield edit "logits" (Some "[]")
      yield edit "logits.0" (Some "7")
      for v in [ "5"; "null" ] do yield edit "settings" (Some v)
      yield edit "settings" None
      for v in [ "\"x\""; "1.5"; "null" ] do yield edit "settings.batch_size" (Some v)
      for v in [ "1"; "\"true\"" ] do yield edit "settings.causal_cone" (Some v)
      for v in [ "\"x\""; "1.5" ] do yield edit "stats.estimated_bytes" (Some v)
      yield edit "stats" (Some "3")
      for v in [ "5"; "\"x\""; "[]" ] do yield edit "scores" (Some v)
      yield edit "scores.replacement" (Some "\"x\"")
      for v in [ "5"; "[]"; "\"x\"" ] do yield edit "description" (Some v)
      for v in [ "5"; "null" ] do yield edit "description.model" (Some v) ]

/// A llama2.c checkpoint of random weights (RoPE tables NaN: the loader must skip them) and the byte range of the
/// RoPE tables.
let private llama2cFile (rng: Random) =
    let dim, hidden, layers, heads, kv, vocab, seq = 8, 12, 2, 2, 1, 16, 16
    let hd = dim / heads
    let weights (n: int) = randomFloats rng (int64 n)
    use ms = new MemoryStream()
    use w = new BinaryWriter(ms)
    for v in [ dim; hidden; layers; heads; kv; -vocab; seq ] do w.Write(v: int)
    let floats (xs: float32[]) = for x in xs do w.Write(x: float32)
    floats (weights (vocab * dim))
    floats (weights (layers * dim))
    floats (weights (layers * heads * hd * dim))
    floats (weights (2 * layers * kv * hd * dim))
    floats (weights (layers * dim * heads * hd))
    floats (weights (layers * dim))
    floats (weights (3 * layers * hidden * dim))
    floats (weights dim)
    let ropeStart = int ms.Position
    floats (Array.create (seq * hd) nanf)
    let ropeEnd = int ms.Position
    floats (weights (vocab * dim))
    w.Flush()
    ms.ToArray(), (ropeStart, ropeEnd)

let private llama2cMutations (rng: Random) (file: string) (bytes: byte[]) (rope: int * int) (count: int) : Mutation list =
    let names = [| "dim"; "hidden_dim"; "n_layers"; "n_heads"; "n_kv_heads"; "vocab_size"; "seq_len" |]
    let orig i = BitConverter.ToInt32(bytes, 4 * i)
    [ for i in 0 .. 6 do
          for v in [ 0; -1; orig i - 1; orig i + 1; 2 * orig i; -(orig i); 1 <<< 20; 1 <<< 30; Int32.MaxValue; Int32.MinValue; 0x616b3432 ] |> List.distinct do
              yield { Name = sprintf "%s = %d" names[i] v; File = file; Expect = (if v = orig i then Either else MustRefuse)
                      Mutate = fun b -> (let c = Array.copy b in BinaryPrimitives.WriteInt32LittleEndian(Span(c, 4 * i, 4), v); some c) }
      for _ in 1 .. count / 2 do
          let at = rng.Next 28
          let v = byte (rng.Next 256)
          yield { Name = sprintf "header byte %d = %d" at v; File = file; Expect = (if bytes[at] = v then Either else MustRefuse)
                  Mutate = fun b -> (let c = Array.copy b in c[at] <- v; some c) }
      for n in [ 0; 3; 27; 28; 29; bytes.Length / 2; bytes.Length - 4; bytes.Length - 1 ] do
          yield { Name = sprintf "truncated to %d bytes" n; File = file; Expect = MustRefuse; Mutate = fun b -> some b[.. n - 1] }
      for n in [ 1; 4; 64 ] do
          yield { Name = sprintf "%d bytes appended" n; File = file; Expect = MustRefuse; Mutate = fun b -> some (Array.append b (Array.zeroCreate n)) }
      let lo, hi = rope
      for _ in 1 .. count do
          let at = 28 + 4 * rng.Next((bytes.Length - 28) / 4)
          let v = [| nanf; infinityf; -infinityf |][rng.Next 3]
          let inRope = at >= lo && at < hi
          yield { Name = sprintf "float at byte %d = %g%s" at v (if inRope then " (RoPE table, skipped)" else ""); File = file
                  Expect = (if inRope then MustLoad else MustRefuse)
                  Mutate = fun b -> (let c = Array.copy b in BinaryPrimitives.WriteSingleLittleEndian(Span(c, at, 4), v); some c) }
      yield { Name = "deleted"; File = file; Expect = MustRefuse; Mutate = fun _ -> None } ]

/// The cases of one model artefact: its weights' container and contents, and its config.
let private modelCases (tally: Tally) (root: string) (seed: int) (artefact: (string * byte[]) list) (load: string -> Transformer)
                       (bounded: string list list) (loose: string list list) (count: int) =
    let rng = Random seed
    let weights = artefact |> List.find (fst >> (=) "model.safetensors") |> snd
    let config = artefact |> List.find (fst >> (=) "config.json") |> snd
    let reference =
        use valid = new TempDir()
        for name, bytes in artefact do File.WriteAllBytes(valid.File name, bytes)
        use m = load valid.Path
        parametersOf m
    try
        let mutations =
            containerMutations rng "model.safetensors" weights (0, 0) count
            @ rewriteMutations rng "model.safetensors" weights { F64Loads = true; ExtraIgnored = false; NanRefused = Some true; NanAllowedIn = [ "batchtopk_threshold" ] } count
            @ jsonMutations rng "config.json" config bounded loose count
        runCases tally root artefact mutations load (modelCompare reference) (fun m -> m.Dispose())
    finally
        for _, t in reference do t.Dispose()

let private path (p: string) = List.ofArray (p.Split '.')

let private coderCases (tally: Tally) (root: string) (seed: int) (config: CoderConfig) (loose: string list list) (count: int) =
    let rng = Random seed
    let artefact =
        use c = Coder.create config torch.CPU
        use dir = new TempDir()
        CoderFile.save dir.Path c
        filesOf dir.Path
    let stateOf (c: Coder) = c.StateDict() |> List.map (fun (n, t) -> n, t.detach().clone())
    let reference =
        use valid = new TempDir()
        for name, bytes in artefact do File.WriteAllBytes(valid.File name, bytes)
        use c = CoderFile.load valid.Path torch.CPU
        stateOf c
    try
        let weights = artefact |> List.find (fst >> (=) "coder.safetensors") |> snd
        let json = artefact |> List.find (fst >> (=) "coder.json") |> snd
        let mutations =
            containerMutations rng "coder.safetensors" weights (0, 0) count
            @ rewriteMutations rng "coder.safetensors" weights { F64Loads = true; ExtraIgnored = false; NanRefused = Some true; NanAllowedIn = [ "batchtopk_threshold" ] } count
            @ jsonMutations rng "coder.json" json [ path "d_in"; path "d_out"; path "d_sae" ] loose count
        runCases tally root artefact mutations (fun dir -> CoderFile.load dir torch.CPU)
            (fun c -> sameTensors "coder tensor" reference (c.StateDict())) (fun c -> (c :> IDisposable).Dispose())
    finally
        for _, t in reference do t.Dispose()

/// Runs a family inside the memory bound and reports it.
let private family (name: string) (minimum: int) (run: Tally -> string -> unit) =
    test name {
        let tally = newTally name
        let sw = Stopwatch.StartNew()
        use root = new TempDir()
        boundedMemory name (512L <<< 20) (fun () -> run tally root.Path)
        printfn "fuzz %-26s took %.1f s" name sw.Elapsed.TotalSeconds
        report tally minimum
    }

let tests =
    testSequenced <| testList "Fuzzed files" [
        family "Hugging Face GPT-2" 350 (fun tally root ->
            modelCases tally root 101 (gpt2Folder (Random 1)) (fun dir -> HuggingFace.load dir torch.CPU)
                [ path "n_embd"; path "n_layer"; path "n_positions"; path "vocab_size"; path "n_inner" ]
                [ path "n_head"; path "layer_norm_epsilon"; path "n_ctx"; path "tie_word_embeddings" ] 40)

        family "Hugging Face Llama" 380 (fun tally root ->
            modelCases tally root 102 (llamaFolder (Random 2)) (fun dir -> HuggingFace.load dir torch.CPU)
                [ path "hidden_size"; path "num_hidden_layers"; path "intermediate_size"; path "vocab_size"; path "num_key_value_heads" ]
                [ path "num_attention_heads"; path "max_position_embeddings"; path "rope_theta"; path "head_dim"; path "tie_word_embeddings" ] 40)

        family "own model folders" 650 (fun tally root ->
            let load dir = fst (Checkpoint.load dir torch.CPU)
            let common = [ path "config.d_model"; path "config.n_layers"; path "config.d_mlp"; path "config.vocab_size"; path "config.n_kv_heads" ]
            let loose = [ path "config.n_heads"; path "config.norm_eps"; path "format_version"; path "config.d_head" ]
            modelCases tally root 103 (ownFolder false) load (path "config.n_ctx" :: common) loose 30
            modelCases tally root 104 (ownFolder true) load common (path "config.n_ctx" :: path "config.positions.theta" :: loose) 30)

        family "llama2.c files" 140 (fun tally root ->
            let bytes, rope = llama2cFile (Random 5)
            let load dir = Llama2c.load (Path.Combine(dir, "model.bin")) torch.CPU
            let reference =
                use valid = new TempDir()
                File.WriteAllBytes(valid.File "model.bin", bytes)
                use m = load valid.Path
                parametersOf m
            try runCases tally root [ "model.bin", bytes ] (llama2cMutations (Random 105) "model.bin" bytes rope 40) load (modelCompare reference) (fun m -> m.Dispose())
            finally for _, t in reference do t.Dispose())

        family "coder files" 550 (fun tally root ->
            coderCases tally root 106 { CoderConfig.skipTranscoder "m" 1 6 10 with Activation = JumpReLU JumpReLUSpec.Default }
                [ path "layers.0"; path "format_version"; path "hook_layer"; path "activation.initial_threshold" ] 30
            coderCases tally root 107 { CoderConfig.crossLayer "m" [| 0; 1; 2 |] 4 6 with Activation = BatchTopK 2.0 }
                [ path "layers.2"; path "activation.k"; path "format_version" ] 30)

        family "graph files" 300 (fun tally root ->
            let g, info = fuzzGraph ()
            let bytes =
                use valid = new TempDir()
                GraphFile.saveWith (valid.File "graph.safetensors") info g
                File.ReadAllBytes(valid.File "graph.safetensors")
            let rng = Random 108
            let _, raws = readSt bytes
            let sizes (name: string) (values: int64[]) =
                { Name = sprintf "%s = %A" name values; File = "graph.safetensors"; Expect = MustRefuse
                  Mutate = fun b ->
                      let metadata, raws = readSt b
                      some (writeSt metadata (raws |> List.map (fun r -> if r.Name = name then { r with Shape = [| int64 values.Length |]; Data = bytesOf "I64" (Array.map float values) } else r))) }
            let mutations =
                containerMutations rng "graph.safetensors" bytes (graphValueRange bytes) 60
                @ rewriteMutations rng "graph.safetensors" bytes { F64Loads = false; ExtraIgnored = true; NanRefused = Some true; NanAllowedIn = [] } 30
                @ (graphJsonMutations "graph" |> List.map (fun m -> inGraphJson { m with File = "graph.safetensors" }))
                @ [ for name in [ "adjacency.block_targets"; "adjacency.block_sources" ] do
                        let n = (raws |> List.find (fun r -> r.Name = name)).Shape[0] |> int
                        for values in [ [| 1L <<< 62; 1L <<< 62; 1L <<< 62 |]; [| Int64.MaxValue; 1L; 0L |]; [| Int64.MaxValue; Int64.MaxValue; 2L |]
                                        [| -1L; 4L; 2L |]; [| 1L <<< 32; -(1L <<< 32); 5L |]; Array.create n 0L; Array.create (n + 1) 1L ] do
                            yield sizes name values ]
            runCases tally root [ "graph.safetensors", bytes ] mutations (fun dir -> GraphFile.loadWith (Path.Combine(dir, "graph.safetensors")))
                (fun (g2, info2) -> if g2 = g && info2 = info then None else Some "another graph") ignore)

        family "training checkpoints" 240 (fun tally root ->
            let make () =
                let w = torch.nn.Parameter(torch.zeros(3L, 4L))
                let b = torch.nn.Parameter(torch.zeros(4L))
                w, b, torch.zeros(2L), new Optim.AdamW([ "w", w; "b", b ], Optim.AdamWConfig.Default)
            let artefact, reference =
                use saved = new TempDir()
                let w, b, buf, opt = make ()
                use _o = opt
                (use _ = torch.no_grad ()
                 w.copy_(torch.arange(12.0f).reshape(3L, 4L)) |> ignore
                 b.copy_(torch.tensor([| 0.5f; -1.0f; 2.0f; 0.25f |])) |> ignore
                 buf.copy_(torch.tensor([| 7.0f; 8.0f |])) |> ignore)
                opt.SetLearningRate 0.01
                (use loss = w.square().sum() + b.sum() in loss.backward ())
                opt.Step()
                let info : Checkpointing.Info = { Step = 1; Tokens = 10L; ElapsedSeconds = 1.0; Config = JsonObject(); Metadata = Map.empty; State = JsonObject() }
                let dir = Checkpointing.save saved.Path info [ "w", w :> torch.Tensor; "b", b :> torch.Tensor ] [ "buf", buf ] opt
                let state = [ "w", w.detach().clone(); "b", b.detach().clone(); "buf", buf.clone() ] @ (opt.StateTensors() |> List.map (fun (n, t) -> n, t.clone()))
                w.Dispose(); b.Dispose(); buf.Dispose()
                filesOf dir, state
            let rng = Random 109
            let files name = artefact |> List.find (fst >> (=) name) |> snd
            // Training checkpoints keep whatever values training produced (non-finite ones included), and the
            // optimizer file may carry state the optimizer does not read: an extra tensor there loads (Training/
            // belongs to the trainer; reported, not changed here).
            let policy file = { F64Loads = false; ExtraIgnored = (file = Checkpointing.OptimizerFile); NanRefused = None; NanAllowedIn = [] }
            let mutations =
                [ for file in [ Checkpointing.ModelFile; Checkpointing.OptimizerFile ] do
                      yield! containerMutations rng file (files file) (0, 0) 30
                      yield! rewriteMutations rng file (files file) (policy file) 12 ]
            let load dir =
                let w, b, buf, opt = make ()
                try
                    Checkpointing.load dir [ "w", w :> torch.Tensor; "b", b :> torch.Tensor ] [ "buf", buf ] opt |> ignore
                    w, b, buf, opt
                with _ ->
                    w.Dispose(); b.Dispose(); buf.Dispose(); (opt :> IDisposable).Dispose()
                    reraise ()
            try
                runCases tally root artefact mutations load
                    (fun (w, b, buf, opt) ->
                        let actual = [ "w", w.detach(); "b", b.detach(); "buf", buf ] @ opt.StateTensors()
                        sameTensors "checkpoint tensor" reference actual)
                    (fun (w, b, buf, opt) -> w.Dispose(); b.Dispose(); buf.Dispose(); (opt :> IDisposable).Dispose())
            finally
                for _, t in reference do t.Dispose())
    ]
