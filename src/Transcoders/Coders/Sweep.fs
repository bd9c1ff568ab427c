namespace Transcoders.Coders

open System
open System.Diagnostics
open System.Globalization
open System.IO
open Transcoders.Files
open Transcoders.Models

/// A sparsity / width / layer / kind sweep (the transcoder paper's SAE-versus-transcoder comparison).
type SweepConfig =
    { /// The model's name, recorded in each coder's config.
      Model: string
      Kinds: LayerCoderKind list
      Layers: int list
      /// Features per coder (d_sae).
      Widths: int list
      Levels: SparsityLevel list
      /// Training settings of a point; `CoderDefaults.forCoder` (with the level's λ) is the recommended choice.
      Train: CoderConfig -> SparsityLevel -> TrainConfig
      /// Points trained together from one activation stream, at most this many at once (0: all of them). Groups
      /// run one after the other, each in `Run.Out/group-NN`; with a disk cache they share the model's activations.
      MaxConcurrent: int
      Run: JobsConfig }

/// One point of a sweep.
type SweepPoint =
    { Kind: LayerCoderKind
      Layer: int
      Width: int
      Level: SparsityLevel
      Job: CoderJob }

/// A point on an L0 frontier: per (kind, layer, width), points sorted by L0 with their Pareto status (no other
/// point of the same series has both lower-or-equal L0 and lower-or-equal CE / FVU, one of them strictly).
type FrontierRow =
    { Series: string
      Kind: string
      Layer: int
      Width: int
      Level: string
      L0: float
      Fvu: float
      CeSpliced: float
      CeRecovered: float
      ParetoCe: bool
      ParetoFvu: bool }

/// What `Sweep.run` did.
type SweepResult =
    { Points: (SweepPoint * CoderResult) list
      Runs: JobsResult list
      Frontier: FrontierRow list
      Seconds: float }

/// Sweeps over kind, layer, width and sparsity: every point trains from one shared activation stream (or a few, see
/// `SweepConfig.MaxConcurrent`), is evaluated like any `CoderJobs` coder, and the results are written as
/// `sweep.csv`, `sweep.md` and `frontier.csv` (L0 against spliced CE and FVU, for plots).
module Sweep =
    /// Every point of the sweep (kinds × layers × widths × levels), with its job. An SAE on a hook whose width is
    /// not d_model gets its real width from the model.
    let points (model: Transformer) (config: SweepConfig) : SweepPoint list =
        let empty name xs = if List.isEmpty xs then invalidArg name (sprintf "the sweep has no %s" name)
        empty "Kinds" config.Kinds
        empty "Layers" config.Layers
        empty "Widths" config.Widths
        empty "Levels" config.Levels
        [ for kind in config.Kinds do
              for layer in config.Layers do
                  if layer < 0 || layer >= model.Config.NLayers then
                      invalidArg "Layers" (sprintf "layer %d is outside the model's layers 0..%d" layer (model.Config.NLayers - 1))
                  let dIn = LayerCoder.inputWidth model kind layer
                  for width in config.Widths do
                      for level in config.Levels do
                          let coder = { LayerCoder.config config.Model dIn kind layer width level with DIn = dIn; DOut = dIn }
                          let name = sprintf "%s-w%d-%s" (CoderJob.name coder) width level.Name
                          let train = config.Train coder level
                          yield { Kind = kind; Layer = layer; Width = width; Level = level; Job = { Name = name; Coder = coder; Train = train } } ]

    /// The frontier row of a point's metrics (Pareto status not yet set: see `pareto`).
    let frontierRow (kind: LayerCoderKind) (layer: int) (width: int) (level: SparsityLevel) (m: MetricsRow) : FrontierRow =
        { Series = sprintf "%s L%d w%d" kind.Name layer width; Kind = kind.Name; Layer = layer; Width = width
          Level = level.Name; L0 = m.L0; Fvu = m.Fvu; CeSpliced = m.CeSpliced; CeRecovered = m.CeRecovered
          ParetoCe = false; ParetoFvu = false }

    /// Rows with their Pareto status, each series sorted by L0.
    let pareto (rows: FrontierRow list) : FrontierRow list =
        let dominated (value: FrontierRow -> float) (a: FrontierRow) (series: FrontierRow list) =
            series |> List.exists (fun b ->
                not (obj.ReferenceEquals(a, b)) && b.L0 <= a.L0 && value b <= value a && (b.L0 < a.L0 || value b < value a))
        rows
        |> List.groupBy (fun r -> r.Series)
        |> List.collect (fun (_, series) ->
            series
            |> List.map (fun r ->
                { r with
                    ParetoCe = not (Double.IsNaN r.CeSpliced) && not (dominated (fun x -> x.CeSpliced) r series)
                    ParetoFvu = not (Double.IsNaN r.Fvu) && not (dominated (fun x -> x.Fvu) r series) })
            |> List.sortBy (fun r -> r.L0))

    /// The frontier rows of evaluated points.
    let frontier (evaluated: (SweepPoint * CoderResult) list) : FrontierRow list =
        pareto [ for p, r in evaluated -> frontierRow p.Kind p.Layer p.Width p.Level (MetricsTable.row r) ]

    let private inv (v: float) = if Double.IsNaN v then "" else v.ToString("G6", CultureInfo.InvariantCulture)

    /// `frontier.csv`'s text.
    let frontierCsv (rows: FrontierRow list) =
        let lines =
            [ yield "series,kind,layer,width,level,l0,fvu,ce_spliced,ce_recovered,pareto_ce,pareto_fvu"
              for r in rows ->
                  String.Join(",", [ r.Series; r.Kind; string r.Layer; string r.Width; r.Level; inv r.L0; inv r.Fvu
                                     inv r.CeSpliced; inv r.CeRecovered; (if r.ParetoCe then "true" else "false")
                                     (if r.ParetoFvu then "true" else "false") ]) ]
        String.Join("\n", lines) + "\n"

    /// Runs the sweep (see the module doc) and writes its tables into `config.Run.Out`.
    let run (model: Transformer) (text: ModelText) (config: SweepConfig) (onProgress: JobsProgress -> unit) : SweepResult =
        let sw = Stopwatch.StartNew()
        let all = points model config
        let groups =
            if config.MaxConcurrent <= 0 || all.Length <= config.MaxConcurrent then [ all ]
            else List.chunkBySize config.MaxConcurrent all
        let runs =
            groups
            |> List.mapi (fun i group ->
                let out = if groups.Length = 1 then config.Run.Out else Path.Combine(config.Run.Out, sprintf "group-%02d" i)
                let cache =
                    config.Run.Cache
                    |> Option.map (fun c ->
                        if groups.Length = 1 then c
                        else
                            // groups with the same hooks share one cache
                            let hooks = group |> List.collect (fun p -> List.ofArray (Array.append p.Job.Coder.HookIn p.Job.Coder.HookOut)) |> List.distinct |> List.sort
                            let mutable h = 14695981039346656037UL
                            for c in String.Join("|", hooks) do h <- (h ^^^ uint64 c) * 1099511628211UL
                            { c with Dir = Path.Combine(c.Dir, h.ToString("x16")) })
                let run = CoderJobs.run model text [ for p in group -> p.Job ] { config.Run with Out = out; Cache = cache } onProgress
                group, run)
        let evaluated =
            [ for group, run in runs do
                  for p in group do
                      yield p, run.Coders |> List.find (fun r -> r.Name = p.Job.Name) ]
        let ordered =
            evaluated |> List.sortBy (fun (p, r) -> p.Kind.Name, p.Layer, p.Width, (MetricsTable.row r).L0)
        let rows = ordered |> List.map (snd >> MetricsTable.row)
        let front = frontier ordered
        Directory.CreateDirectory config.Run.Out |> ignore
        AtomicFile.writeAllText (Path.Combine(config.Run.Out, "sweep.csv")) (MetricsTable.csv rows)
        let joint =
            [ for _, run in runs do
                  match run.Joint with
                  | Some j -> yield sprintf "\nEvery transcoder spliced at once: CE spliced %.4f, CE recovered %.3f, KL %.4f\n" j.CeSpliced j.CeRecovered j.KlToClean
                  | None -> () ]
        let header =
            sprintf "# Sweep on %s\n\n%d points (%s × layers %s × widths %s × %s), %d steps of %d tokens each.\n\n"
                config.Model all.Length (String.Join(", ", config.Kinds |> List.map (fun k -> k.Name)))
                (String.Join(", ", config.Layers)) (String.Join(", ", config.Widths))
                (String.Join(", ", config.Levels |> List.map (fun l -> l.Name)))
                (all |> List.map (fun p -> p.Job.Train.Steps) |> List.max) config.Run.Store.Buffer.BatchSize
        AtomicFile.writeAllText (Path.Combine(config.Run.Out, "sweep.md")) (header + MetricsTable.markdown rows + String.Join("", joint))
        AtomicFile.writeAllText (Path.Combine(config.Run.Out, "frontier.csv")) (frontierCsv front)
        { Points = ordered; Runs = runs |> List.map snd; Frontier = front; Seconds = sw.Elapsed.TotalSeconds }
