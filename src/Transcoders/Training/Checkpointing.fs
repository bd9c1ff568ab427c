/// Training checkpoints: everything needed to continue a run exactly, in safetensors and JSON
/// (no pickles, no opaque formats). One folder per checkpoint, written under a temporary name and
/// renamed into place, plus a `latest` pointer file:
///
///     checkpoints/latest                              "step_000100"
///     checkpoints/step_000100/model.safetensors       parameters and buffers (metadata: the caller's + step)
///     checkpoints/step_000100/optimizer.safetensors   AdamW state: {prefix}{name}.exp_avg, .exp_avg_sq, .step
///     checkpoints/step_000100/trainer.json            step, tokens, elapsed time, the run's configuration, the
///                                                     trainer's resumable state (metrics window, caller's counters),
///                                                     tensor names and shapes
///     checkpoints/step_000100/<extra files>           the caller's extra resumable state (a shuffle buffer, …)
///     checkpoints/step_000100/manifest.json           size and SHA-256 of every file above, and the step;
///                                                     written last, so a folder without it is incomplete
///
/// One mechanism for the language-model trainer (`Trainer`) and the coder trainer (`CoderJobs`): a folder is
/// used only when every file matches its manifest and trainer.json's step agrees with it; resuming takes the newest
/// intact checkpoint and says which newer ones it skipped and why.
module Transcoders.Training.Checkpointing

open System
open System.IO
open System.Security.Cryptography
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
      Metadata: Map<string, string>
      /// Resumable state that is not a tensor: the metrics window of the trainer, a caller's counters
      /// (an empty object when there is none).
      State: JsonObject }

/// A problem with a checkpoint on disk: the file and what is wrong.
exception CheckpointError of path: string * problem: string with
    override this.Message = sprintf "%s: %s" this.path this.problem

let private fail path problem = raise (CheckpointError(path, problem))

let [<Literal>] private Format = "transcoders.train_checkpoint"
let [<Literal>] private Version = 2
let [<Literal>] private ManifestFormat = "transcoders.checkpoint_manifest"
let [<Literal>] ModelFile = "model.safetensors"
let [<Literal>] OptimizerFile = "optimizer.safetensors"
let [<Literal>] TrainerFile = "trainer.json"
let [<Literal>] ManifestFile = "manifest.json"
let [<Literal>] LatestFile = "latest"

/// A file of the caller's extra resumable state, written into the checkpoint folder with the rest and covered by
/// its manifest: `Write` gets the file's path (inside the temporary folder) and writes it.
type Part = { File: string; Write: string -> unit }

/// The folder name of the checkpoint after `step` updates: `step_000100`.
let dirName (step: int) = sprintf "step_%06d" step

let private tryParseStep (name: string) =
    if name.StartsWith "step_" then
        match Int32.TryParse(name.Substring 5) with
        | true, s when s >= 0 -> Some s
        | _ -> None
    else None

/// The checkpoint folders under `root` (complete or not), oldest first.
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

// ---------------------------------------------------------------------------------------------- manifest

/// The SHA-256 of a file, as lower-case hex.
let sha256 (path: string) : string =
    use s = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 <<< 20)
    Convert.ToHexString(SHA256.HashData s).ToLowerInvariant()

/// Writes `dir/manifest.json` (atomically) listing the size and SHA-256 of `files` and the step.
let private writeManifest (dir: string) (step: int) (files: string list) =
    let j = JsonObject()
    j["format"] <- JsonValue.Create ManifestFormat
    j["version"] <- JsonValue.Create 1
    j["step"] <- JsonValue.Create step
    let fs = JsonObject()
    for f in files do
        let p = Path.Combine(dir, f)
        let e = JsonObject()
        e["bytes"] <- JsonValue.Create (FileInfo(p).Length)
        e["sha256"] <- JsonValue.Create (sha256 p)
        fs[f] <- e
    j["files"] <- fs
    AtomicFile.writeAllText (Path.Combine(dir, ManifestFile)) (j.ToJsonString(JsonSerializerOptions(WriteIndented = true)))

/// Reads trainer.json of a checkpoint folder, validating its format (no checksums: see `verify`).
let readInfo (dir: string) : Info =
    let path = Path.Combine(dir, TrainerFile)
    if not (Directory.Exists dir) then fail dir "checkpoint folder does not exist"
    if not (File.Exists path) then fail path "missing (not a complete checkpoint folder)"
    let j =
        try JsonNode.Parse(File.ReadAllText path)
        with e -> fail path (sprintf "not valid JSON: %s" e.Message)
    let j = match j with :? JsonObject as o -> o | null -> fail path "empty" | _ -> fail path "not a JSON object"
    let field (k: string) =
        match j[k] with
        | null -> fail path (sprintf "missing field '%s'" k)
        | v -> v
    let fmt = try (field "format").GetValue<string>() with :? CheckpointError -> reraise () | _ -> ""
    if fmt <> Format then fail path (sprintf "format is '%s', expected '%s'" fmt Format)
    let version = try (field "version").GetValue<int>() with :? CheckpointError -> reraise () | e -> fail path (sprintf "field 'version' is not an integer: %s" e.Message)
    if version > Version then fail path (sprintf "version %d is newer than this program reads (%d)" version Version)
    try
        { Step = (field "step").GetValue<int>()
          Tokens = (field "tokens").GetValue<int64>()
          ElapsedSeconds = (match j["elapsed_s"] with null -> 0.0 | v -> JsonNumbers.ofNode v)
          Config = (match field "config" with :? JsonObject as o -> o | _ -> fail path "'config' is not an object")
          Metadata =
            match j["metadata"] with
            | :? JsonObject as o -> o |> Seq.map (fun kv -> kv.Key, kv.Value.GetValue<string>()) |> Map.ofSeq
            | _ -> Map.empty
          State = (match j["state"] with :? JsonObject as o -> o | _ -> JsonObject()) }
    with
    | :? CheckpointError -> reraise ()
    | e -> fail path (sprintf "invalid field: %s" e.Message)

/// Checks a checkpoint folder against its manifest: every listed file present with its size and SHA-256, the
/// model, optimizer and trainer files listed, and the step of the manifest, the folder name and trainer.json
/// the same. Returns its bookkeeping, or the problem (naming the file) when it is damaged or incomplete.
let verify (dir: string) : Result<Info, string * string> =
    let manifestPath = Path.Combine(dir, ManifestFile)
    try
        if not (Directory.Exists dir) then Error(dir, "checkpoint folder does not exist")
        elif not (File.Exists manifestPath) then
            Error(manifestPath, "missing: the checkpoint was not completed (or was written by an older version, without checksums)")
        else
            let m =
                try JsonNode.Parse(File.ReadAllText manifestPath) :?> JsonObject
                with e -> fail manifestPath (sprintf "not valid JSON: %s" e.Message)
            if isNull m then fail manifestPath "empty"
            if (match m["format"] with null -> "" | v -> v.GetValue<string>()) <> ManifestFormat then
                fail manifestPath "not a checkpoint manifest"
            let step = match m["step"] with null -> fail manifestPath "missing field 'step'" | v -> v.GetValue<int>()
            match tryParseStep (Path.GetFileName(Path.TrimEndingDirectorySeparator dir)) with
            | Some s when s <> step -> fail manifestPath (sprintf "records step %d, but the folder is %s" step (dirName s))
            | _ -> ()
            let files =
                match m["files"] with
                | :? JsonObject as o -> [ for kv in o -> kv.Key, kv.Value ]
                | _ -> fail manifestPath "missing field 'files'"
            for required in [ ModelFile; OptimizerFile; TrainerFile ] do
                if not (files |> List.exists (fun (f, _) -> f = required)) then fail manifestPath (sprintf "does not list %s" required)
            for (f, e) in files do
                if f.IndexOfAny([| '/'; '\\' |]) >= 0 || f = ".." then fail manifestPath (sprintf "lists a path outside the folder: '%s'" f)
                let p = Path.Combine(dir, f)
                if not (File.Exists p) then fail p "missing (listed in the manifest)"
                let bytes = e["bytes"].GetValue<int64>()
                let actual = FileInfo(p).Length
                if actual <> bytes then fail p (sprintf "has %d bytes, the manifest records %d (damaged or truncated)" actual bytes)
                let expected = e["sha256"].GetValue<string>()
                let hash = sha256 p
                if hash <> expected then fail p (sprintf "SHA-256 %s differs from the manifest's %s (damaged)" hash expected)
            let info = readInfo dir
            if info.Step <> step then
                fail (Path.Combine(dir, TrainerFile)) (sprintf "records step %d, but the manifest records step %d" info.Step step)
            Ok info
    with
    | CheckpointError (p, problem) -> Error(p, problem)
    | e -> Error(manifestPath, e.Message)

/// `verify`, raising `CheckpointError` when the checkpoint is damaged.
let verified (dir: string) : Info =
    match verify dir with
    | Ok info -> info
    | Error (p, problem) -> fail p problem

/// The checkpoint to resume from under `root`: the newest one that `verify` accepts, with the newer ones skipped
/// on the way (their folder and the problem). None when `root` holds no checkpoint folder; `CheckpointError`
/// naming `root` and every problem when it holds some but none is intact.
let newestIntact (root: string) : (string * Info) option * (string * string) list =
    let rec go (candidates: (int * string) list) skipped =
        match candidates with
        | [] -> None, List.rev skipped
        | (_, d) :: rest ->
            match verify d with
            | Ok info -> Some(d, info), List.rev skipped
            | Error (p, problem) -> go rest ((d, sprintf "%s: %s" (Path.GetRelativePath(d, p)) problem) :: skipped)
    let all = list root |> List.rev
    match go all [] with
    | None, (_ :: _ as skipped) ->
        fail root
            (sprintf "no intact checkpoint to resume from; %s. Start over in another folder, or remove the damaged checkpoints"
                (skipped |> List.map (fun (d, why) -> sprintf "%s is unusable (%s)" (Path.GetFileName d) why) |> String.concat "; "))
    | r -> r

// ---------------------------------------------------------------------------------------------- save

let private reserved = set [ ModelFile; OptimizerFile; TrainerFile; ManifestFile ]

/// Writes a checkpoint under `root` atomically: `parameters` and `buffers` (model.safetensors), the state of every
/// optimizer with its name prefix (optimizer.safetensors: "{prefix}{name}.exp_avg", …), trainer.json, the `extra`
/// files, and last the manifest, all in a temporary folder that is then renamed into place; `latest` is updated
/// after. Returns the checkpoint's folder.
let saveWith (root: string) (info: Info) (parameters: (string * torch.Tensor) seq) (buffers: (string * torch.Tensor) seq)
             (optimizers: (string * Optim.AdamW) list) (extra: Part list) : string =
    let parameters = List.ofSeq parameters
    let buffers = List.ofSeq buffers
    checkNames "parameters" (List.map fst (parameters @ buffers))
    for p in extra do
        if reserved.Contains p.File || p.File.StartsWith "." || p.File.IndexOfAny(Path.GetInvalidFileNameChars()) >= 0 then
            invalidArg "extra" (sprintf "'%s' cannot be the name of an extra checkpoint file" p.File)
    checkNames "extra" (extra |> List.map (fun p -> p.File))
    Directory.CreateDirectory root |> ignore
    let name = dirName info.Step
    let final = Path.Combine(root, name)
    let tmp = Path.Combine(root, sprintf ".%s.tmp-%s" name (Guid.NewGuid().ToString("N").[..7]))
    try
        Directory.CreateDirectory tmp |> ignore
        do
            use scope = torch.NewDisposeScope()
            let metadata = info.Metadata |> Map.add "step" (string info.Step)
            Safetensors.save (Path.Combine(tmp, ModelFile)) metadata
                (parameters @ buffers |> List.map (fun (n, t) -> n, t.detach()))
            let states = [ for prefix, o in optimizers do for n, t in o.StateTensors() -> prefix + n, t ]
            checkNames "optimizers" (List.map fst states)
            Safetensors.save (Path.Combine(tmp, OptimizerFile)) (Map.ofList [ "step", string info.Step ]) states
        let j = JsonObject()
        j["format"] <- JsonValue.Create Format
        j["version"] <- JsonValue.Create Version
        j["step"] <- JsonValue.Create info.Step
        j["tokens"] <- JsonValue.Create info.Tokens
        j["elapsed_s"] <- JsonNumbers.node info.ElapsedSeconds
        j["saved_at"] <- JsonValue.Create(DateTime.UtcNow.ToString "o")
        j["config"] <- info.Config.DeepClone()
        j["state"] <- info.State.DeepClone()
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
        for p in extra do p.Write(Path.Combine(tmp, p.File))
        for p in extra do
            if not (File.Exists(Path.Combine(tmp, p.File))) then invalidOp (sprintf "the extra checkpoint file '%s' was not written" p.File)
        // last: the manifest; a folder without it is an interrupted write
        writeManifest tmp info.Step ([ ModelFile; OptimizerFile; TrainerFile ] @ (extra |> List.map (fun p -> p.File)))
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

/// Writes a checkpoint of `parameters`, `buffers` and the optimizer under `root` (see `saveWith`).
let save (root: string) (info: Info) (parameters: (string * torch.Tensor) seq) (buffers: (string * torch.Tensor) seq)
         (optimizer: Optim.AdamW) : string =
    saveWith root info parameters buffers [ "", optimizer ] []

/// Removes all but the newest `keep` checkpoints (0 keeps all) and leftovers of interrupted writes;
/// never the one `latest` points to, nor the folders in `protect`.
let pruneKeeping (root: string) (keep: int) (protect: string list) =
    if Directory.Exists root then
        for d in Directory.GetDirectories root do
            let n = Path.GetFileName d
            if n.StartsWith "." && (n.Contains ".tmp-" || n.Contains ".old-") then try Directory.Delete(d, true) with _ -> ()
        if keep > 0 then
            let latest = try tryLatest root |> Option.map Path.GetFullPath with _ -> None
            let protect = protect |> List.map Path.GetFullPath |> Set.ofList
            let all = list root
            for (_, d) in all |> List.take (max 0 (all.Length - keep)) do
                let full = Path.GetFullPath d
                if Some full <> latest && not (protect.Contains full) then Directory.Delete(d, true)

/// Removes all but the newest `keep` checkpoints (0 keeps all) and leftovers of interrupted writes;
/// never the one `latest` points to.
let prune (root: string) (keep: int) = pruneKeeping root keep []

// ---------------------------------------------------------------------------------------------- load

let private requireFile (dir: string) (file: string) =
    let p = Path.Combine(dir, file)
    if not (File.Exists p) then fail p "missing (not a complete checkpoint folder)"
    p

let private openReader (path: string) =
    try Safetensors.Reader.Open path
    with
    | :? CheckpointError -> reraise ()
    | e -> fail path (sprintf "cannot be read: %s" e.Message)

/// Checks the tensors of a safetensors file against `targets` (same names, shapes and dtypes required; no extra
/// tensors allowed), then copies them into the targets.
let private loadInto (path: string) (reader: Safetensors.Reader) (targets: (string * torch.Tensor) list) =
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

/// The step recorded in a model file's metadata must be the checkpoint's.
let private checkModelStep (path: string) (reader: Safetensors.Reader) (step: int) =
    match reader.Metadata.TryFind "step" with
    | Some s when s <> string step -> fail path (sprintf "holds the weights of step %s, but the checkpoint is at step %d" s step)
    | _ -> ()

/// Loads only the parameters and buffers of a checkpoint folder into the given tensors (in place), after checking
/// the folder against its manifest.
let loadModel (dir: string) (parameters: (string * torch.Tensor) seq) (buffers: (string * torch.Tensor) seq) =
    let info = verified dir
    let targets = List.ofSeq parameters @ List.ofSeq buffers
    checkNames "parameters" (List.map fst targets)
    let path = requireFile dir ModelFile
    use reader = openReader path
    checkModelStep path reader info.Step
    loadInto path reader targets

/// `loadWith` for a folder `verify` has already accepted, with the `Info` it returned (the files are not hashed again).
let loadVerifiedWith (dir: string) (info: Info) (parameters: (string * torch.Tensor) seq) (buffers: (string * torch.Tensor) seq)
                     (optimizers: (string * Optim.AdamW) list) : unit =
    let modelPath = requireFile dir ModelFile
    let optPath = requireFile dir OptimizerFile
    let targets = List.ofSeq parameters @ List.ofSeq buffers
    checkNames "parameters" (List.map fst targets)
    use modelReader = openReader modelPath
    checkModelStep modelPath modelReader info.Step
    // Check the optimizer file before touching the model, so a bad checkpoint changes nothing.
    use optReader = openReader optPath
    let optEntries = optReader.Entries |> List.map (fun e -> e.Name, e) |> Map.ofList
    let optNames =
        use scope = torch.NewDisposeScope()
        [ for prefix, o in optimizers do for n, t in o.StateTensors() -> prefix + n, t.shape, t.dtype ]
    for (n, shape, dtype) in optNames do
        match optEntries.TryFind n with
        | None -> fail optPath (sprintf "missing optimizer state '%s'" n)
        | Some e when e.Shape <> shape ->
            fail optPath (sprintf "optimizer state '%s' has shape %s, expected %s" n (shapeText e.Shape) (shapeText shape))
        | Some e when torchDType e.DType <> dtype ->
            fail optPath (sprintf "optimizer state '%s' has dtype %A, expected %A" n e.DType dtype)
        | Some _ -> ()
    let known = optNames |> List.map (fun (n, _, _) -> n) |> Set.ofList
    let unknown = optEntries |> Map.toList |> List.map fst |> List.filter (fun n -> not (known.Contains n))
    if not unknown.IsEmpty then fail optPath (sprintf "unexpected optimizer state (a checkpoint of another model?): %s" (String.concat ", " unknown))
    loadInto modelPath modelReader targets
    for prefix, o in optimizers do
        let device = (snd o.Parameters[0]).device
        use scope = torch.NewDisposeScope()
        let find (n: string) = if optReader.Contains(prefix + n) then Some(optReader.Tensor(prefix + n, device)) else None
        try o.LoadState find
        with :? InvalidDataException as e -> fail optPath e.Message

/// Restores a checkpoint folder into the parameters, buffers and optimizers (each with the name prefix it was
/// saved with, in place) and returns its bookkeeping. The folder is checked against its manifest first, then
/// every file, name, shape and dtype; a problem raises `CheckpointError` naming the file and the tensor, and
/// changes nothing. Extra files are the caller's to read (from the returned folder's `Part` names).
let loadWith (dir: string) (parameters: (string * torch.Tensor) seq) (buffers: (string * torch.Tensor) seq)
             (optimizers: (string * Optim.AdamW) list) : Info =
    let info = verified dir
    loadVerifiedWith dir info parameters buffers optimizers
    info

/// Restores a checkpoint folder into the parameters, buffers and optimizer (see `loadWith`).
let load (dir: string) (parameters: (string * torch.Tensor) seq) (buffers: (string * torch.Tensor) seq)
         (optimizer: Optim.AdamW) : Info =
    loadWith dir parameters buffers [ "", optimizer ]
