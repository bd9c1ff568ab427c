namespace Transcoders.Cluster

open System
open System.Globalization
open System.IO
open System.Text.Json
open System.Text.Json.Nodes
open TorchSharp
open Transcoders.Activations
open Transcoders.Coders
open Transcoders.Models

/// A sweep as plain values (what `transcoders sweep` takes), so that it can be written into a job table and rebuilt,
/// the same, by every array task: the `SweepConfig` is a function of these values and the model.
type SweepSettings =
    { /// The model (our folder, a Hugging Face folder or a llama2.c .bin), as an absolute path.
      Model: string
      /// Token shards (a folder with train/ and validation/); None: TinyStories in the model's tokenizer.
      Tokens: string option
      /// Kind names (`LayerCoderKind.Parse`).
      Kinds: string list
      /// Empty: the middle layer.
      Layers: int list
      /// TopK levels.
      Ks: int list
      /// ReLU + L1 levels λ.
      L1s: float list
      /// Features per coder; empty: 16 × d_model.
      Widths: int list
      Steps: int
      Batch: int
      Seed: int64
      /// Tokens per text row; None: min(128, n_ctx).
      Ctx: int option
      /// Shuffle-buffer rows; None: 64 batches.
      BufferRows: int64 option
      CheckpointEvery: int
      EvalRows: int64
      SplicedRows: int }

    /// `transcoders sweep`'s defaults for the model at `model`.
    static member Default(model: string) =
        { Model = model; Tokens = None; Kinds = [ "transcoder"; "sae" ]; Layers = []; Ks = [ 4; 8; 16; 32 ]; L1s = []
          Widths = []; Steps = 600; Batch = 1024; Seed = 42L; Ctx = None; BufferRows = None; CheckpointEvery = 500
          EvalRows = 32_768L; SplicedRows = 128 }

/// Building the sweep of `SweepSettings` and writing them as JSON.
[<RequireQualifiedAccess>]
module SweepSettings =
    /// The sparsity levels: the TopK levels, then the L1 levels.
    let levels (s: SweepSettings) : SparsityLevel list =
        [ yield! s.Ks |> List.map TopKLevel
          yield! s.L1s |> List.map L1Level ]

    /// The sweep of `s` on the loaded `model`, written to `out`, its activations cached in `cache` (as `transcoders
    /// sweep` builds it: every point trains with `CoderDefaults.forCoder` and the settings' seed).
    let config (s: SweepSettings) (model: Transformer) (out: string) (cache: string option) (device: torch.Device) : SweepConfig =
        let c = model.Config
        { Model = ModelName.ofPath s.Model
          Kinds = s.Kinds |> List.map LayerCoderKind.Parse
          Layers = (if s.Layers.IsEmpty then [ c.NLayers / 2 ] else s.Layers)
          Widths = (if s.Widths.IsEmpty then [ 16 * c.DModel ] else s.Widths)
          Levels = levels s
          Train =
            fun coder level ->
                let lambda = match level with L1Level l -> l | TopKLevel _ -> 0.0
                { CoderDefaults.forCoder coder lambda s.Steps s.Batch with Seed = s.Seed }
          MaxConcurrent = 0
          Run =
            CoderRun.jobsConfig model
                { CoderRunSettings.Default with
                    Plan = { CoderPlan.Default with Batch = s.Batch; Seed = s.Seed }
                    Ctx = s.Ctx
                    BufferRows = s.BufferRows
                    CacheActivations = cache
                    CheckpointEvery = s.CheckpointEvery
                    Resume = true
                    EvalRows = s.EvalRows
                    SplicedRows = s.SplicedRows }
                out device }

    let private ints (xs: int list) = JsonArray([| for x in xs -> JsonValue.Create x :> JsonNode |])

    /// The settings as a JSON object.
    let toJson (s: SweepSettings) : JsonObject =
        let o = JsonObject()
        o["model"] <- s.Model
        o["tokens"] <- (match s.Tokens with Some t -> JsonValue.Create t :> JsonNode | None -> null)
        o["kinds"] <- JsonArray([| for k in s.Kinds -> JsonValue.Create k :> JsonNode |])
        o["layers"] <- ints s.Layers
        o["ks"] <- ints s.Ks
        o["l1s"] <- JsonArray([| for l in s.L1s -> JsonValue.Create(l.ToString("R", CultureInfo.InvariantCulture)) :> JsonNode |])
        o["widths"] <- ints s.Widths
        o["steps"] <- s.Steps
        o["batch"] <- s.Batch
        o["seed"] <- s.Seed
        o["ctx"] <- (match s.Ctx with Some c -> JsonValue.Create c :> JsonNode | None -> null)
        o["buffer_rows"] <- (match s.BufferRows with Some r -> JsonValue.Create r :> JsonNode | None -> null)
        o["checkpoint_every"] <- s.CheckpointEvery
        o["eval_rows"] <- s.EvalRows
        o["spliced_rows"] <- s.SplicedRows
        o

    /// Reads `toJson`'s object; `where` names the file in errors.
    let ofJson (where: string) (o: JsonObject) : SweepSettings =
        let field (name: string) =
            match o[name] with
            | null when not (o.ContainsKey name) -> failwithf "%s: the sweep settings have no field '%s'" where name
            | n -> n
        let get (name: string) (read: JsonNode -> 'a) =
            try read (field name)
            with e when not (e.Message.StartsWith where) -> failwithf "%s: field '%s' of the sweep settings: %s" where name e.Message
        let opt (name: string) (read: JsonNode -> 'a) = get name (fun n -> if isNull n then None else Some(read n))
        let list (name: string) (read: JsonNode -> 'a) = get name (fun n -> [ for x in n.AsArray() -> read x ])
        { Model = get "model" (fun n -> n.GetValue<string>())
          Tokens = opt "tokens" (fun n -> n.GetValue<string>())
          Kinds = list "kinds" (fun n -> n.GetValue<string>())
          Layers = list "layers" (fun n -> n.GetValue<int>())
          Ks = list "ks" (fun n -> n.GetValue<int>())
          L1s = list "l1s" (fun n -> Double.Parse(n.GetValue<string>(), CultureInfo.InvariantCulture))
          Widths = list "widths" (fun n -> n.GetValue<int>())
          Steps = get "steps" (fun n -> n.GetValue<int>())
          Batch = get "batch" (fun n -> n.GetValue<int>())
          Seed = get "seed" (fun n -> n.GetValue<int64>())
          Ctx = opt "ctx" (fun n -> n.GetValue<int>())
          BufferRows = opt "buffer_rows" (fun n -> n.GetValue<int64>())
          CheckpointEvery = get "checkpoint_every" (fun n -> n.GetValue<int>())
          EvalRows = get "eval_rows" (fun n -> n.GetValue<int64>())
          SplicedRows = get "spliced_rows" (fun n -> n.GetValue<int>()) }
