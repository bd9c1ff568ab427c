/// The training metrics log: JSON Lines, one object per logged step, appended and flushed as it goes
/// so a crash loses nothing already logged and plots can read it while the run is going. The log writer,
/// the truncation a resumed run needs and the number encoding serve every trainer (the language-model trainer's
/// `Record` below, the coder trainer's per-step lines); each trainer owns only its line's fields.
module Transcoders.Training.Metrics

open System
open System.IO
open System.Text
open System.Text.Json

/// One logged step. `Loss` and `GradNorm` are means over the steps since the previous record
/// (the loss each update was computed with; the gradient norm before clipping), `Lr` the rate of the
/// last of them. Written as `step`, `loss`, `lr`, `grad_norm`, `tokens`, `tokens_per_s`, `elapsed_s`,
/// `train` (an object, when the objective reports metrics) and `eval` (an object, when evaluation ran
/// at this step). Non-finite numbers are written as null.
type Record =
    { /// Optimizer updates completed.
      Step: int
      Loss: float
      Lr: float
      GradNorm: float
      /// Tokens (or examples) processed since the start of the run.
      Tokens: int64
      /// Training throughput since the previous record (evaluation and checkpointing excluded).
      TokensPerSecond: float
      /// Wall-clock seconds since the start of the run (across resumes).
      ElapsedSeconds: float
      /// The objective's own training metrics (logged as "train"), empty when it has none.
      Train: Map<string, float>
      /// Evaluation metrics (logged as "eval"), empty when evaluation did not run at this step.
      Eval: Map<string, float> }

let private writeNumber = JsonNumbers.write

/// One JSON object written by `body` as one line (no newline).
let jsonLine (body: Utf8JsonWriter -> unit) : string =
    use ms = new MemoryStream()
    do
        use w = new Utf8JsonWriter(ms)
        w.WriteStartObject()
        body w
        w.WriteEndObject()
    Encoding.UTF8.GetString(ms.ToArray())

/// Parses one line of a log (`source` names the file in errors) and reads it with `read`.
let parseLine (source: string) (line: string) (read: JsonElement -> 'T) : 'T =
    let doc =
        try JsonDocument.Parse line
        with e -> failwithf "%s: not a JSON line (%s): %s" source e.Message line
    use doc = doc
    read doc.RootElement

/// The "step" of a log line, or None when the line is not a complete JSON object with an integer step (a line
/// cut short by a crash).
let tryStep (line: string) : int option =
    if String.IsNullOrWhiteSpace line then None
    else
        try
            use doc = JsonDocument.Parse line
            match doc.RootElement.TryGetProperty "step" with
            | true, v when v.ValueKind = JsonValueKind.Number -> Some(v.GetInt32())
            | _ -> None
        with _ -> None

/// The record as one line of JSON (no newline).
let toJsonLine (r: Record) : string =
    jsonLine (fun w ->
        w.WriteNumber("step", r.Step)
        writeNumber w "loss" r.Loss
        writeNumber w "lr" r.Lr
        writeNumber w "grad_norm" r.GradNorm
        w.WriteNumber("tokens", r.Tokens)
        writeNumber w "tokens_per_s" r.TokensPerSecond
        writeNumber w "elapsed_s" r.ElapsedSeconds
        let group (name: string) (m: Map<string, float>) =
            if not m.IsEmpty then
                w.WriteStartObject name
                for KeyValue (k, v) in m do writeNumber w k v
                w.WriteEndObject()
        group "train" r.Train
        group "eval" r.Eval)

/// Parses one line written by `toJsonLine`; `source` names the file in errors.
let ofJsonLine (source: string) (line: string) : Record =
    parseLine source line <| fun root ->
    let prop (name: string) =
        match root.TryGetProperty name with
        | true, v -> v
        | _ -> failwithf "%s: metrics line without '%s': %s" source name line
    let num = JsonNumbers.ofElement
    let group (name: string) =
        match root.TryGetProperty name with
        | true, e when e.ValueKind = JsonValueKind.Object -> e.EnumerateObject() |> Seq.map (fun p -> p.Name, num p.Value) |> Map.ofSeq
        | _ -> Map.empty
    { Step = (prop "step").GetInt32()
      Loss = num (prop "loss")
      Lr = num (prop "lr")
      GradNorm = num (prop "grad_norm")
      Tokens = (prop "tokens").GetInt64()
      TokensPerSecond = num (prop "tokens_per_s")
      ElapsedSeconds = num (prop "elapsed_s")
      Train = group "train"
      Eval = group "eval" }

/// Every line of a log file read with `parse source line`, in order (blank lines skipped).
let readWith (parse: string -> string -> 'T) (path: string) : 'T list =
    File.ReadLines path
    |> Seq.mapi (fun i l -> i, l)
    |> Seq.filter (fun (_, l) -> not (String.IsNullOrWhiteSpace l))
    |> Seq.map (fun (i, l) -> parse (sprintf "%s line %d" path (i + 1)) l)
    |> List.ofSeq

/// Every record of a log file, in order.
let read (path: string) : Record list = readWith ofJsonLine path

/// The last complete line of a log file read with `parse`, if any.
let tryLast (parse: string -> string -> 'T) (path: string) : 'T option =
    if not (File.Exists path) then None
    else
        File.ReadAllLines path
        |> Array.filter (fun l -> (tryStep l).IsSome)
        |> Array.tryLast
        |> Option.map (parse path)

/// Keeps the lines whose step satisfies `keep` (a resumed run writes the others again), atomically. Lines that
/// are not complete JSON objects with a step (a partial line from a crash mid-write) are dropped too.
let truncate (path: string) (keep: int -> bool) =
    if File.Exists path then
        let kept =
            File.ReadAllLines path
            |> Array.filter (fun l -> match tryStep l with Some s -> keep s | None -> false)
        Transcoders.Files.AtomicFile.writeAllText path (String.Join("", kept |> Array.map (fun l -> l + "\n")))

/// Drops the records after `step` (those a resumed run will write again), atomically. A trailing
/// partial line (from a crash mid-write) is dropped too.
let truncateAfter (path: string) (step: int) = truncate path (fun s -> s <= step)

/// An append-only JSONL writer; each record is flushed to the file as soon as it is written.
type Log(path: string) =
    do
        let dir = Path.GetDirectoryName(Path.GetFullPath path)
        Directory.CreateDirectory dir |> ignore
    let stream = new FileStream(path, FileMode.Append, FileAccess.Write, FileShare.Read)
    let writer = new StreamWriter(stream, UTF8Encoding false)
    member _.Path = path
    /// Appends one line (a JSON object without its newline) and flushes it to the file.
    member _.WriteLine(line: string) =
        writer.Write line
        writer.Write '\n'
        writer.Flush()
        stream.Flush true
    member this.Write(record: Record) = this.WriteLine(toJsonLine record)
    interface IDisposable with
        member _.Dispose() =
            writer.Dispose()
            stream.Dispose()
