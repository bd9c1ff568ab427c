#load "../scripts/load.fsx"
// What every paper script shares: its command line (MODEL and CODERS as optional positional arguments, `--name value`
// options), the default shipped model and coders, the held-out TinyStories text, markdown tables, and the results
// file with the command that made it and its wall time at the top.

open System
open System.Diagnostics
open System.Globalization
open System.IO
open TorchSharp
open Transcoders.Coders
open Transcoders.Files
open Transcoders.Models
open Transcoders.Text

/// A paper script's command line: positional arguments first, then `--name [values...]` options.
type Args =
    { Script: string
      Raw: string[]
      Positional: string list
      Options: Map<string, string list> }

    member a.Has(name: string) = a.Options.ContainsKey name
    member a.TryGet(name: string) = a.Options.TryFind name |> Option.bind List.tryHead
    member a.Get(name: string, fallback: string) = defaultArg (a.TryGet name) fallback
    member a.Int(name: string, fallback: int) =
        match a.TryGet name with
        | Some v ->
            match Int32.TryParse(v, NumberStyles.Integer, CultureInfo.InvariantCulture) with
            | true, x -> x
            | _ -> failwithf "--%s: '%s' is not an integer" name v
        | None -> fallback
    member a.Float(name: string, fallback: float) =
        match a.TryGet name with
        | Some v ->
            match Double.TryParse(v, NumberStyles.Float, CultureInfo.InvariantCulture) with
            | true, x -> x
            | _ -> failwithf "--%s: '%s' is not a number" name v
        | None -> fallback
    member a.Ints(name: string, fallback: int list) =
        match a.Options.TryFind name with
        | Some (_ :: _ as vs) -> vs |> List.map (fun v -> match Int32.TryParse v with | true, x -> x | _ -> failwithf "--%s: '%s' is not an integer" name v)
        | _ -> fallback

/// Parses `fsi.CommandLineArgs` of the script `name`.
let parseArgs (name: string) (argv: string[]) : Args =
    let rest = argv |> Array.tail
    let firstOption = rest |> Array.tryFindIndex (fun a -> a.StartsWith "--") |> Option.defaultValue rest.Length
    let positional = rest[.. firstOption - 1] |> List.ofArray
    let options =
        let mutable m = Map.empty
        let mutable current = None
        for a in rest[firstOption ..] do
            if a.StartsWith "--" then
                let n = a.Substring 2
                current <- Some n
                m <- Map.add n [] m
            else
                match current with
                | Some n -> m <- Map.add n (m[n] @ [ a ]) m
                | None -> ()
        m
    { Script = name; Raw = rest; Positional = positional; Options = options }

/// The shipped default model and coders (issue 14).
let defaultModel () = Paths.data "models/tinystories-gpt"
let defaultCoders () = Paths.data "coders/tinystories-gpt"

let modelPath (a: Args) = a.Positional |> List.tryItem 0 |> Option.defaultWith defaultModel
let codersPath (a: Args) = a.Positional |> List.tryItem 1 |> Option.defaultWith defaultCoders

/// `--device` (default auto) and `--threads` (default: TorchSharp's).
let deviceOf (a: Args) =
    match a.TryGet "threads" with
    | Some t -> torch.set_num_threads (int t)
    | None -> ()
    Transcoders.Tensors.Device.resolve (Transcoders.Tensors.Device.parse (a.Get("device", "auto")))

/// The model (eval mode) and its tokenizer; a clear error when the folder is missing.
let loadModel (path: string) (device: torch.Device) =
    if not (Directory.Exists path || File.Exists path) then
        failwithf "no model at %s: give MODEL (a model folder, a Hugging Face folder or a llama2.c .bin) as the first argument" path
    let model, _ = ModelFiles.load path device
    model.eval ()
    model, ModelTokenizer.find path

/// The coders under `path` (a coder folder or a folder of coder folders).
let loadCoders (path: string) (device: torch.Device) : Coder list =
    if not (Directory.Exists path) then
        failwithf "no coders at %s: give CODERS (a folder of coder folders, e.g. from `train-coder`) as the second argument" path
    CoderFolders.load [ path ] device

/// What a paper script starts from: its arguments, a clock started at once, the device, the model (eval mode) and
/// its tokenizer.
type Setup =
    { Args: Args
      Clock: Stopwatch
      Device: torch.Device
      ModelPath: string
      Model: Transformer
      Tokenizer: Tokenizer }

    /// The coders the command line names (the shipped ones by default).
    member s.Coders() = loadCoders (codersPath s.Args) s.Device

/// Parses the script's command line and loads its model.
let setup (script: string) (argv: string[]) : Setup =
    let args = parseArgs script argv
    let clock = Stopwatch.StartNew()
    let device = deviceOf args
    let path = modelPath args
    let model, tokenizer = loadModel path device
    { Args = args; Clock = clock; Device = device; ModelPath = path; Model = model; Tokenizer = tokenizer }

/// Where results go: `--out`, default `paper/results`.
let resultsDir (a: Args) = a.Get("out", Path.Combine(__SOURCE_DIRECTORY__, "results"))

/// Scratch space (trained coders, blind pages): `--work`, default `runs/paper/<script>`.
let workDir (a: Args) = a.Get("work", Path.Combine("runs", "paper", a.Script))

/// The held-out text (the shipped validation file, read with the library's corpus reader) as paragraphs: the file
/// has no `<|endoftext|>` delimiters, so its stories come as one text whose blank lines separate paragraphs.
let heldOutParagraphs () : seq<string> =
    Corpus.readStories (Paths.data ("tinystories/" + Corpus.shippedValidationFile))
    |> Seq.collect (fun s -> s.Text.Replace("\r", "").Split("\n\n", StringSplitOptions.RemoveEmptyEntries))
    |> Seq.map (fun p -> p.Trim())
    |> Seq.filter (fun p -> p.Length > 0)

/// Held-out paragraphs, each encoded with BOS first and cut to `ctx` tokens; those shorter than `minTokens` are
/// skipped.
let validationStories (tokenizer: Tokenizer) (ctx: int) (minTokens: int) (count: int) : int[][] =
    heldOutParagraphs ()
    |> Seq.map (fun p -> Tokenizer.encodeDocument tokenizer true false p)
    |> Seq.filter (fun t -> t.Length >= minTokens)
    |> Seq.map (fun t -> if t.Length > ctx then t[.. ctx - 1] else t)
    |> Seq.truncate count
    |> Array.ofSeq

/// The first sentence of each held-out paragraph (through its first '.', '!' or '?'), at least `minWords` words.
let firstSentences (count: int) (minWords: int) : string[] =
    heldOutParagraphs ()
    |> Seq.choose (fun t ->
        let stop = t.IndexOfAny [| '.'; '!'; '?' |]
        let sentence = if stop > 0 then t.Substring(0, stop + 1) else t
        if sentence.Split(' ', StringSplitOptions.RemoveEmptyEntries).Length >= minWords then Some sentence else None)
    |> Seq.distinct
    |> Seq.truncate count
    |> Array.ofSeq

/// Consecutive rows of `ctx` tokens of the held-out stories (BOS before each story), as the coders' evaluations use.
let validationRows (tokenizer: Tokenizer) (ctx: int) (rows: int) : int[][] =
    let stream =
        Corpus.readStories (Paths.data ("tinystories/" + Corpus.shippedValidationFile))
        |> Seq.collect (fun s -> Tokenizer.encodeDocument tokenizer true false s.Text)
        |> Seq.truncate (ctx * rows)
        |> Array.ofSeq
    if stream.Length < ctx then failwithf "the held-out text holds %d tokens, fewer than one row of %d" stream.Length ctx
    Array.init (stream.Length / ctx) (fun i -> stream[i * ctx .. (i + 1) * ctx - 1])

let inv (v: float) = v.ToString("0.####", CultureInfo.InvariantCulture)
let f3 (v: float) = if Double.IsNaN v then "–" else v.ToString("F3", CultureInfo.InvariantCulture)
let f4 (v: float) = if Double.IsNaN v then "–" else v.ToString("F4", CultureInfo.InvariantCulture)

/// A markdown table.
let table (headers: string list) (rows: string list list) : string =
    let line (cells: string list) = "| " + String.Join(" | ", cells |> List.map (fun c -> c.Replace("|", "\\|").Replace("\n", " "))) + " |"
    String.Join("\n", [ yield line headers; yield line (headers |> List.map (fun _ -> "---")); for r in rows -> line r ]) + "\n"

/// A token as it reads in a table: its decoded text, quoted, newlines shown as ↵.
let tokenText (tokenizer: Tokenizer) (id: int) = sprintf "`%s`" ((Tokenizer.decode tokenizer [| id |]).Replace("\n", "↵").Replace("`", "'"))

/// An example window as text, the activating token in [[ ]].
let exampleText (tokenizer: Tokenizer) (tokens: int[]) (center: int) =
    let piece (ids: int[]) = (Tokenizer.decode tokenizer ids).Replace("\n", "↵")
    piece tokens[.. center - 1] + "[[" + piece [| tokens[center] |] + "]]" + piece tokens[center + 1 ..]

/// Mean, median, standard deviation, min and max.
let summary (xs: float[]) =
    let xs = xs |> Array.filter (fun x -> not (Double.IsNaN x))
    if xs.Length = 0 then nan, nan, nan, nan, nan
    else
        let s = Array.sort xs
        let median = if s.Length % 2 = 1 then s[s.Length / 2] else (s[s.Length / 2 - 1] + s[s.Length / 2]) / 2.0
        let mean = Array.average xs
        let sd = if xs.Length > 1 then sqrt ((xs |> Array.sumBy (fun x -> (x - mean) ** 2.0)) / float (xs.Length - 1)) else 0.0
        mean, median, sd, s[0], s[s.Length - 1]

/// Writes `results/<file>` with a title, the command that made it and its wall time at the top, then `body`.
let writeResults (a: Args) (file: string) (title: string) (sw: Stopwatch) (body: string) =
    let dir = resultsDir a
    Directory.CreateDirectory dir |> ignore
    let command = String.Join(" ", [ yield "dotnet fsi paper/" + a.Script + ".fsx"; for r in a.Raw -> (if r.Contains ' ' then sprintf "\"%s\"" r else r) ])
    let header =
        sprintf "# %s\n\nMade by `%s`\n\nWall time %.0f s (%d torch threads, %d cores, %s), %s.\n\n"
            title command sw.Elapsed.TotalSeconds (torch.get_num_threads ()) Environment.ProcessorCount
            (if torch.cuda.is_available () then "CUDA available" else "CPU")
            (DateTime.UtcNow.ToString("yyyy-MM-dd HH:mm 'UTC'", CultureInfo.InvariantCulture))
    let path = Path.Combine(dir, file)
    AtomicFile.writeAllText path (header + body)
    printfn "wrote %s" (Path.GetFullPath path)
    path

/// The per-layer transcoders among `coders`, one per layer (the first found), by layer.
let transcodersOf (coders: Coder list) : Coder list =
    coders
    |> List.filter (fun x -> x.Config.Kind = Transcoder)
    |> List.distinctBy (fun x -> x.Config.Layers[0])
    |> List.sortBy (fun x -> x.Config.Layers[0])

/// The share of a feature's top examples whose activating token is its most common one, and that token.
let tokenPurity (top: Transcoders.Views.FeatureExample[]) : float * int =
    if top.Length = 0 then 0.0, -1
    else
        let token, n = top |> Array.countBy (fun e -> e.Tokens[e.Center]) |> Array.maxBy snd
        float n / float top.Length, token
