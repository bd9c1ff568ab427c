#load "common.fsx"
// The transcoder paper's blind interpretability comparison (interp-comparison.ipynb: 50 random live features of a
// transcoder and of an SAE at the same layer, shuffled, shown with their origin hidden and rated by a person).
//
//   dotnet build src/Transcoders -c Release
//   dotnet fsi paper/blind-interp.fsx [MODEL] [CODERS] [options]            1. prepare the blind set
//   dotnet fsi paper/blind-interp.fsx [MODEL] [CODERS] --rate               2. rate it here, one feature at a time
//   dotnet fsi paper/blind-interp.fsx [MODEL] [CODERS] --verdicts FILE      2'. or read verdicts written elsewhere
//   dotnet fsi paper/blind-interp.fsx [MODEL] [CODERS] --unblind            3. tabulate by origin
//
// 1 writes, in the work folder (default runs/paper/blind-interp): `features.md` (each feature as F001, F002, ...:
// its top examples and a sample from lower activations, the activating token in [[ ]], no numbers and no origin),
// `verdicts.tsv` (a template: one line per feature, `id<TAB>interpretable<TAB>single-token<TAB>note`) and `key.json`
// (the origins: do not open it before rating). Rate each feature: interpretable = yes / maybe / no (can you say in
// words what it detects, and do its examples agree?), single-token = yes / no (does it fire on one token whatever
// the context — the paper's "context-free"?). --rate asks for both on the console and saves after every answer;
// --verdicts FILE reads a filled-in copy of verdicts.tsv. --unblind writes paper/results/blind-interp.md.
//
//   --layer L     the layer (default ⌊2·n_layers/3⌋)     --n N   features of each kind (default 25; the paper: 50)
//   --stories N   held-out paragraphs scanned (default 600)   --ctx N   tokens per paragraph (default 128)
//   --min-count N a live feature fires at least this often (default 5)   --seed N   (default 1)
//   --work DIR, --out DIR, --device cpu|cuda|auto, --threads N

open System
open System.Diagnostics
open System.IO
open System.Text
open System.Text.Json
open Transcoders.Coders
open Transcoders.Files
open Transcoders.Views
open Common

let args = parseArgs "blind-interp" fsi.CommandLineArgs
let sw = Stopwatch.StartNew()
let work = workDir args
let keyPath, featuresPath, verdictsPath = Path.Combine(work, "key.json"), Path.Combine(work, "features.md"), Path.Combine(work, "verdicts.tsv")

type KeyEntry = { Id: string; Origin: string; Layer: int; Feature: int; Count: int64; Purity: float }

let verdictValues = [ "yes"; "maybe"; "no" ]

/// Verdict lines `id<TAB>interpretable<TAB>single-token[<TAB>note]`; '#' lines and unrated ones ('?') skipped.
let readVerdicts (path: string) : Map<string, string * string * string> =
    File.ReadAllLines path
    |> Array.mapi (fun i l -> i + 1, l)
    |> Array.filter (fun (_, l) -> l.Trim() <> "" && not (l.TrimStart().StartsWith "#"))
    |> Array.choose (fun (n, l) ->
        let c = l.Split('\t') |> Array.map (fun x -> x.Trim())
        if c.Length < 3 then failwithf "%s line %d: expected id, interpretable and single-token separated by tabs, got '%s'" path n l
        let v, s = c[1].ToLowerInvariant(), c[2].ToLowerInvariant()
        if v = "?" || s = "?" then None
        else
            if not (List.contains v verdictValues) then failwithf "%s line %d: interpretable must be yes, maybe or no, got '%s'" path n c[1]
            if s <> "yes" && s <> "no" then failwithf "%s line %d: single-token must be yes or no, got '%s'" path n c[2]
            Some(c[0], (v, s, (if c.Length > 3 then c[3] else ""))))
    |> Map.ofArray

let writeVerdicts (ids: string list) (verdicts: Map<string, string * string * string>) =
    let lines =
        [ yield "# id\tinterpretable (yes/maybe/no)\tsingle-token (yes/no)\tnote — '?' marks a feature not yet rated"
          for id in ids ->
              match verdicts.TryFind id with
              | Some(v, s, n) -> sprintf "%s\t%s\t%s\t%s" id v s n
              | None -> sprintf "%s\t?\t?\t" id ]
    AtomicFile.writeAllText verdictsPath (String.Join("\n", lines) + "\n")

let readKey () : KeyEntry list =
    if not (File.Exists keyPath) then failwithf "no blind set in %s: run the script without --rate/--verdicts/--unblind first" work
    JsonSerializer.Deserialize<KeyEntry[]>(File.ReadAllText keyPath) |> List.ofArray

/// Each feature's section of features.md, by id.
let sections () : (string * string) list =
    let text = File.ReadAllText featuresPath
    text.Split("\n## ", StringSplitOptions.RemoveEmptyEntries)
    |> Array.skip 1
    |> Array.map (fun s -> s.Substring(0, s.IndexOf '\n').Trim(), "## " + s)
    |> List.ofArray

let prepare () =
    let device = deviceOf args
    let model, tokenizer = loadModel (modelPath args) device
    let c = model.Config
    let coders = loadCoders (codersPath args) device
    let layer = args.Int("layer", 2 * c.NLayers / 3)
    let pick kind what =
        coders
        |> List.tryFind (fun x -> x.Config.Kind = kind && x.Config.Layers[0] = layer && (kind <> Sae || x.Config.HookIn[0] = CoderConfig.mlpOutHook layer))
        |> Option.defaultWith (fun () -> failwithf "no %s at layer %d in %s" what layer (codersPath args))
    let tc, sae = pick Transcoder "transcoder", pick Sae "SAE on hook_mlp_out"
    let ctx = args.Int("ctx", min 128 c.NCtx)
    let stories = validationStories tokenizer ctx 8 (args.Int("stories", 600))
    let options =
        { DashboardOptions.Default with
            Stats = { FeatureStatsOptions.Default with TopExamples = 12; SampleSize = 40; Before = 12; After = 3 }
            Context = ctx; Heads = 0 }
    let n = args.Int("n", 25)
    let minCount = int64 (args.Int("min-count", 5))
    let rng = Random(args.Int("seed", 1))
    let chosen (origin: string) (coder: Coder) =
        let d = FeatureDashboard.compute model tokenizer origin coder stories options
        let live = d.Layers[0].Summaries |> Array.filter (fun s -> s.Count >= minCount)
        printfn "%s: %d of %d features live (≥ %d firings in %d tokens)" origin live.Length coder.Config.DSae minCount d.Tokens
        if live.Length < n then failwithf "the %s has %d live features, fewer than --n %d: scan more --stories or lower --min-count" origin live.Length n
        live |> Array.sortBy (fun _ -> rng.Next()) |> Array.truncate n |> Array.map (fun s -> origin, s)
    let all = Array.append (chosen "transcoder" tc) (chosen "sae" sae) |> Array.sortBy (fun _ -> rng.Next())
    let md = StringBuilder()
    md.AppendLine(sprintf "# Blind set: %d features of layer %d\n\nRate each in `verdicts.tsv` (or run with `--rate`). The activating token is in [[ ]].\n" all.Length layer) |> ignore
    let key =
        [ for i, (origin, s) in Array.indexed all ->
            let id = sprintf "F%03d" (i + 1)
            md.AppendLine(sprintf "## %s\n\nTop examples:\n" id) |> ignore
            for e in s.Top |> Array.truncate 8 do md.AppendLine("- " + exampleText tokenizer e.Tokens e.Center) |> ignore
            let lower = s.Sample |> Array.filter (fun e -> not (s.Top |> Array.exists (fun t -> t.Sequence = e.Sequence && t.Position = e.Position)))
            if lower.Length > 0 then
                md.AppendLine("\nWeaker examples:\n") |> ignore
                let step = max 1 (lower.Length / 4)
                for e in lower |> Array.indexed |> Array.filter (fun (j, _) -> j % step = 0) |> Array.map snd |> Array.truncate 4 do
                    md.AppendLine("- " + exampleText tokenizer e.Tokens e.Center) |> ignore
            md.AppendLine() |> ignore
            { Id = id; Origin = origin; Layer = layer; Feature = s.Feature; Count = s.Count; Purity = fst (tokenPurity s.Top) } ]
    Directory.CreateDirectory work |> ignore
    AtomicFile.writeAllText featuresPath (md.ToString())
    AtomicFile.writeAllText keyPath (JsonSerializer.Serialize(Array.ofList key, JsonSerializerOptions(WriteIndented = true)))
    writeVerdicts (key |> List.map (fun k -> k.Id)) Map.empty
    printfn "\nblind set of %d features written:\n  %s (read this)\n  %s (fill this in, or run with --rate)\n  %s (the origins: open only to unblind)"
        key.Length (Path.GetFullPath featuresPath) (Path.GetFullPath verdictsPath) (Path.GetFullPath keyPath)

let rate () =
    let key = readKey ()
    let ids = key |> List.map (fun k -> k.Id)
    let mutable verdicts = if File.Exists verdictsPath then readVerdicts verdictsPath else Map.empty
    let rec ask (question: string) (allowed: string list) =
        printf "%s [%s] " question (String.Join("/", allowed))
        match Console.ReadLine() with
        | null -> None
        | answer ->
            let a = answer.Trim().ToLowerInvariant()
            match allowed |> List.tryFind (fun x -> x = a || (a.Length > 0 && x.StartsWith a)) with
            | Some x -> Some x
            | None -> ask question allowed
    let todo = sections () |> List.filter (fun (id, _) -> not (verdicts.ContainsKey id))
    printfn "%d of %d features rated; %d to go (end of input stops, answers are saved as you go)\n" verdicts.Count ids.Length todo.Length
    let mutable stop = false
    for id, text in todo do
        if not stop then
            printfn "%s" text
            match ask "interpretable?" verdictValues with
            | None -> stop <- true
            | Some v ->
                match ask "single-token?" [ "yes"; "no" ] with
                | None -> stop <- true
                | Some s ->
                    printf "note (optional): "
                    let note = match Console.ReadLine() with null -> "" | n -> n.Replace("\t", " ").Trim()
                    verdicts <- Map.add id (v, s, note) verdicts
                    writeVerdicts ids verdicts
                    printfn ""
    printfn "%d of %d rated; verdicts in %s" verdicts.Count ids.Length (Path.GetFullPath verdictsPath)

let unblind () =
    let key = readKey ()
    let verdicts = readVerdicts verdictsPath
    let missing = key |> List.filter (fun k -> not (verdicts.ContainsKey k.Id))
    if not missing.IsEmpty then
        printfn "warning: %d of %d features not rated (%s); tabulating the rated ones" missing.Length key.Length (String.Join(" ", missing |> List.map (fun k -> k.Id) |> List.truncate 10))
    let row (origin: string) =
        let ks = key |> List.filter (fun k -> k.Origin = origin)
        let rated = ks |> List.choose (fun k -> verdicts.TryFind k.Id |> Option.map (fun v -> k, v))
        let count f = rated |> List.filter f |> List.length |> string
        [ origin; string rated.Length
          count (fun (_, (v, _, _)) -> v = "yes"); count (fun (_, (v, _, _)) -> v = "maybe"); count (fun (_, (v, _, _)) -> v = "no")
          count (fun (_, (_, s, _)) -> s = "yes")
          string (ks |> List.filter (fun k -> k.Purity >= 0.8) |> List.length) ]
    let layer = key.Head.Layer
    let body =
        String.concat "\n"
            [ sprintf "%d features of layer %d (%d from the transcoder, %d from the SAE on hook_mlp_out), random live features of each, shown in random order with their origin hidden (`features.md` in the work folder); %d rated."
                  key.Length layer (key |> List.filter (fun k -> k.Origin = "transcoder") |> List.length)
                  (key |> List.filter (fun k -> k.Origin = "sae") |> List.length) verdicts.Count
              ""
              table [ "origin"; "rated"; "interpretable"; "maybe"; "not"; "single-token (rater)"; "single-token (≥ 80% of top examples on one token)" ]
                  [ row "transcoder"; row "sae" ]
              "The last column needs no rater: the share of a feature's top examples that activate on its most common token."
              ""
              "<details><summary>Every verdict, unblinded</summary>"
              ""
              table [ "id"; "origin"; "feature"; "interpretable"; "single-token"; "top-example token share"; "note" ]
                  [ for k in key ->
                      let v, s, n = verdicts.TryFind k.Id |> Option.defaultValue ("–", "–", "")
                      [ k.Id; k.Origin; sprintf "%d" k.Feature; v; s; f3 k.Purity; n ] ]
              "</details>" ]
    writeResults args "blind-interp.md" "Blind interpretability: transcoder vs SAE features" sw body |> ignore

if args.Has "verdicts" then
    let file = args.Get("verdicts", "")
    if not (File.Exists file) then failwithf "--verdicts: no file %s" file
    let key = readKey ()
    let verdicts = readVerdicts file
    match verdicts |> Map.toList |> List.tryFind (fun (id, _) -> not (key |> List.exists (fun k -> k.Id = id))) with
    | Some(id, _) -> failwithf "%s: '%s' is not a feature of the blind set in %s" file id work
    | None -> ()
    writeVerdicts (key |> List.map (fun k -> k.Id)) verdicts
    printfn "%d verdicts read from %s" verdicts.Count file
if args.Has "rate" then rate ()
if args.Has "unblind" then unblind ()
if not (args.Has "verdicts" || args.Has "rate" || args.Has "unblind") then prepare ()
