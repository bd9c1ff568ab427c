/// Training checkpoints: everything needed to continue a run exactly, in safetensors and JSON
/// (no pickles, no opaque formats). One folder per checkpoint, written under a temporary name and
/// renamed into place, plus a `latest` pointer file:
///
///     checkpoints/latest                              "step_000100"
///     checkpoints/step_000100/model.safetensors       parameters and buffers (metadata: the caller's + step)
///     checkpoints/step_000100/optimizer.safetensors   AdamW state: {name}.exp_avg, {name}.exp_avg_sq, {name}.step
///     checkpoints/step_000100/trainer.json            step, tokens, elapsed time, the TrainConfig, tensor names and shapes
module Transcoders.Training.Checkpointing

open System
open System.IO
open System.Text.Json
open System.Text.Json.Nodes
open TorchSharp
open Transcoders.Files

/// A checkpoint's bookkeeping, read from or written to trainer.json.
type Info =
    { /// Optimizer updates completed when the checkpoint was taken.
      Step: int
      /// Tokens processed so far.
      Tokens: int64
      /// Wall-clock training seconds so far.
      ElapsedSeconds: float
      /// The run's configuration (the trainer's JSON form).
      Config: JsonObject
      /// Caller metadata saved with the model (e.g. the model's configuration, to rebuild it).
      Metadata: Map<string, string> }

/// A problem with a checkpoint on disk: the file and what is wrong.
exception CheckpointError of path: string * problem: string with
    override this.Message = sprintf "%s: %s" this.path this.problem

let private fail path problem = raise (CheckpointError(path, problem))

let [<Literal>] private Format = "transcoders.train_checkpoint"
let [<Literal>] private Version = 1
let [<Literal>] ModelFile = "model.safetensors"
let [<Literal>] OptimizerFile = "optimizer.safetensors"
let [<Literal>] TrainerFile = "trainer.json"
let [<Literal>] LatestFile = "latest"

/// The folder name of the checkpoint after `step` updates: `step_000100`.
let dirName (step: int) = sprintf "step_%06d" step

let private tryParseStep (name: string) =
    if name.StartsWith "step_" then
        match Int32.TryParse(name.Substring 5) with
        | true, s when s >= 0 -> Some s
        | _ -> None
    else None

/// The complete checkpoints under `root`, oldest first.
let list (root: string) : (int * string) list =
    if not (Directory.Exists root) then []
    else
        Directory.GetDirectories root
        |> Array.choose (fun d -> tryParseStep (Path.GetFileName d) |> Option.map (fun s -> s, d))
        |> Array.sortBy fst
        |> List.ofArray

/// The checkpoint `latest` points to, if any. A pointer to a missing folder is an error.
let tryLatest (root: string) : string option =
    let pointer = Path.Combine(root, LatestFile)
    if not (File.Exists pointer) then None
    else
        let name = File.ReadAllText(pointer).Trim()
        if tryParseStep name |> Option.isNone then fail pointer (sprintf "expected a folder name like step_000100, found '%s'" name)
        let dir = Path.Combine(root, name)
        if not (Directory.Exists dir) then fail pointer (sprintf "points to %s, which does not exist" dir)
        Some dir

let private shapeText (s: int64 seq) = "[" + (s |> Seq.map string |> String.concat ", ") + "]"

let private shapeJson (s: int64[]) =
    let a = JsonArray()
    for d in s do a.Add(JsonValue.Create d)
    a

let private torchDType (d: Safetensors.DType) = d.ScalarType

let private checkNames (what: string) (names: string seq) =
    let dups = names |> Seq.countBy id |> Seq.filter (fun (_, n) -> n > 1) |> Seq.map fst |> List.ofSeq
    if not dups.IsEmpty then invalidArg what (sprintf "duplicate tensor names: %s" (String.concat ", " dups))

/// Writes a checkpoint of `parameters`, `buffers` and the optimizer under `root`, atomically (a
/// temporary folder renamed into place, then `latest` updated). Returns the checkpoint's folder.
let save (root: string) (info: Info) (parameters: (string * torch.Tensor) seq) (buffers: (string * torch.Tensor) seq)
         (optimizer: Optim.AdamW) : string =
    let parameters = List.ofSeq parameters
    let buffers = List.ofSeq buffers
    checkNames "parameters" (List.map fst (parameters @ buffers))
    Directory.CreateDirectory root |> ignore
    let name = dirName info.Step
    let final = Path.Combine(root, name)
    let tmp = Path.Combine(root, sprintf ".%s.tmp-%s" name (Guid.NewGuid().ToString("N").[..7]))
    try
        Directory.CreateDirectory tmp |> ignore
        use scope = torch.NewDisposeScope()
        let metadata = info.Metadata |> Map.add "step" (string info.Step)
        Safetensors.save (Path.Combine(tmp, ModelFile)) metadata
            (parameters @ buffers |> List.map (fun (n, t) -> n, t.detach()))
        Safetensors.save (Path.Combine(tmp, OptimizerFile)) (Map.ofList [ "step", string info.Step ]) (optimizer.StateTensors())
        let j = JsonObject()
        j["format"] <- JsonValue.Create Format
        j["version"] <- JsonValue.Create Version
        j["step"] <- JsonValue.Create info.Step
        j["tokens"] <- JsonValue.Create info.Tokens
        j["elapsed_s"] <- JsonValue.Create info.ElapsedSeconds
        j["saved_at"] <- JsonValue.Create(DateTime.UtcNow.ToString "o")
        j["config"] <- info.Config.DeepClone()
        let ps = JsonObject()
        for (n, t) in parameters do ps[n] <- shapeJson t.shape
        j["parameters"] <- ps
        let bs = JsonObject()
        for (n, t) in buffers do bs[n] <- shapeJson t.shape
        j["buffers"] <- bs
        let md = JsonObject()
        for KeyValue (k, v) in info.Metadata do md[k] <- JsonValue.Create v
        j["metadata"] <- md
        AtomicFile.writeAllText (Path.Combine(tmp, TrainerFile)) (j.ToJsonString(JsonSerializerOptions(WriteIndented = true)))
        if Directory.Exists final then
            // Re-saving a step (a run resumed from an earlier checkpoint): move the old one aside first.
            let trash = Path.Combine(root, sprintf ".%s.old-%s" name (Guid.NewGuid().ToString("N").[..7]))
            Directory.Move(final, trash)
            Directory.Move(tmp, final)
            Directory.Delete(trash, true)
        else Directory.Move(tmp, final)
    with _ ->
        (try if Directory.Exists tmp then Directory.Delete(tmp, true) with _ -> ())
        reraise ()
    AtomicFile.writeAllText (Path.Combine(root, LatestFile)) (name + "\n")
    final

/// Removes all but the newest `keep` checkpoints (0 keeps all) and leftovers of interrupted writes;
/// never the one `latest` points to.
let prune (root: string) (keep: int) =
    if Directory.Exists root then
        for d in Directory.GetDirectories root do
            let n = Path.GetFileName d
            if n.StartsWith "." && (n.Contains ".tmp-" || n.Contains ".old-") then try Directory.Delete(d, true) with _ -> ()
        if keep > 0 then
            let latest = tryLatest root |> Option.map Path.GetFullPath
            let all = list root
            for (_, d) in all |> List.take (max 0 (all.Length - keep)) do
                if Some(Path.GetFullPath d) <> latest then Directory.Delete(d, true)

/// Reads trainer.json of a checkpoint folder, validating its format.
let readInfo (dir: string) : Info =
    let path = Path.Combine(dir, TrainerFile)
    if not (Directory.Exists dir) then fail dir "checkpoint folder does not exist"
    if not (File.Exists path) then fail path "missing (not a complete checkpoint folder)"
    let j =
        try JsonNode.Parse(File.ReadAllText path) :?> JsonObject
        with e -> fail path (sprintf "not valid JSON: %s" e.Message)
    if isNull j then fail path "empty"
    let field (k: string) =
        match j[k] with
        | null -> fail path (sprintf "missing field '%s'" k)
        | v -> v
    let fmt = try (field "format").GetValue<string>() with :? CheckpointError -> reraise () | _ -> ""
    if fmt <> Format then fail path (sprintf "format is '%s', expected '%s'" fmt Format)
    let version = (field "version").GetValue<int>()
    if version > Version then fail path (sprintf "version %d is newer than this program reads (%d)" version Version)
    { Step = (field "step").GetValue<int>()
      Tokens = (field "tokens").GetValue<int64>()
      ElapsedSeconds = (field "elapsed_s").GetValue<float>()
      Config = (match field "config" with :? JsonObject as o -> o | _ -> fail path "'config' is not an object")
      Metadata =
        match j["metadata"] with
        | :? JsonObject as o -> o |> Seq.map (fun kv -> kv.Key, kv.Value.GetValue<string>()) |> Map.ofSeq
        | _ -> Map.empty }

let private requireFile (dir: string) (file: string) =
    let p = Path.Combine(dir, file)
    if not (File.Exists p) then fail p "missing (not a complete checkpoint folder)"
    p

/// Copies tensors of a safetensors file into `targets` (same names, shapes and dtypes required; no
/// extra tensors allowed), after checking all of them against the header.
let private loadInto (path: string) (targets: (string * torch.Tensor) list) =
    use reader =
        try Safetensors.Reader.Open path
        with
        | :? CheckpointError -> reraise ()
        | e -> fail path (sprintf "cannot be read: %s" e.Message)
    let entries = reader.Entries |> List.map (fun e -> e.Name, e) |> Map.ofList
    let expected = targets |> List.map fst |> Set.ofList
    let missing = targets |> List.filter (fun (n, _) -> not (entries.ContainsKey n)) |> List.map fst
    if not missing.IsEmpty then fail path (sprintf "missing tensors: %s" (String.concat ", " missing))
    let extra = entries |> Map.toList |> List.map fst |> List.filter (fun n -> not (expected.Contains n))
    if not extra.IsEmpty then fail path (sprintf "unexpected tensors (a checkpoint of another model?): %s" (String.concat ", " extra))
    for (n, t) in targets do
        let e = entries[n]
        if e.Shape <> t.shape then
            fail path (sprintf "tensor '%s' has shape %s, the model's is %s" n (shapeText e.Shape) (shapeText t.shape))
        if torchDType e.DType <> t.dtype then
            fail path (sprintf "tensor '%s' has dtype %A, the model's is %A" n e.DType t.dtype)
    use _ = torch.no_grad ()
    for (n, t) in targets do
        use src = reader.Tensor(n, t.device)
        t.copy_(src) |> ignore

/// Loads only the parameters and buffers of a checkpoint folder into the given tensors (in place).
let loadModel (dir: string) (parameters: (string * torch.Tensor) seq) (buffers: (string * torch.Tensor) seq) =
    let targets = List.ofSeq parameters @ List.ofSeq buffers
    checkNames "parameters" (List.map fst targets)
    loadInto (requireFile dir ModelFile) targets

/// Restores a checkpoint folder into the parameters, buffers and optimizer (in place) and returns
/// its bookkeeping. Every file, name, shape and dtype is checked; a problem raises `CheckpointError`
/// naming the file and the tensor.
let load (dir: string) (parameters: (string * torch.Tensor) seq) (buffers: (string * torch.Tensor) seq)
         (optimizer: Optim.AdamW) : Info =
    let info = readInfo dir
    let modelPath = requireFile dir ModelFile
    let optPath = requireFile dir OptimizerFile
    let targets = List.ofSeq parameters @ List.ofSeq buffers
    checkNames "parameters" (List.map fst targets)
    // Check the optimizer file before touching the model, so a bad checkpoint changes nothing.
    use optReader =
        try Safetensors.Reader.Open optPath
        with e -> fail optPath (sprintf "cannot be read: %s" e.Message)
    let optEntries = optReader.Entries |> List.map (fun e -> e.Name, e) |> Map.ofList
    let optNames =
        use scope = torch.NewDisposeScope()
        optimizer.StateTensors() |> List.map (fun (n, t) -> n, t.shape, t.dtype)
    for (n, shape, dtype) in optNames do
        match optEntries.TryFind n with
        | None -> fail optPath (sprintf "missing optimizer state '%s'" n)
        | Some e when e.Shape <> shape ->
            fail optPath (sprintf "optimizer state '%s' has shape %s, expected %s" n (shapeText e.Shape) (shapeText shape))
        | Some e when torchDType e.DType <> dtype ->
            fail optPath (sprintf "optimizer state '%s' has dtype %A, expected %A" n e.DType dtype)
        | Some _ -> ()
    loadInto modelPath targets
    let device = (snd optimizer.Parameters[0]).device
    use scope = torch.NewDisposeScope()
    let find (n: string) = if optReader.Contains n then Some(optReader.Tensor(n, device)) else None
    try optimizer.LoadState find
    with :? InvalidDataException as e -> fail optPath e.Message
    info
