/// The greater-than prompt generator (Text/TaskPrompts), and the paper scripts (`paper/*.fsx`,
/// `scripts/walkthrough.fsx`) run through `dotnet fsi` on a tiny model with tiny settings, each checked for its
/// results file and that file's table columns.
module Transcoders.Tests.PaperTests

open System
open System.IO
open Expecto
open Transcoders.Files
open Transcoders.Text
open Transcoders.Tests.Fixtures

let private gpt2 = lazy (Tokenizer.gpt2 ())

let taskPromptTests =
    testList "greater-than prompts" [
        test "prompts follow the template, cycle through the years the tokenizer splits as ' XX' + 'YY', and are seeded" {
            let t = gpt2.Force()
            let valid = TaskPrompts.greaterThanYears t
            Expect.isNonEmpty valid "some years qualify"
            for century, year in valid do
                let ids = Tokenizer.encode t (sprintf " %d%02d" century year)
                Expect.equal ids.Length 2 (sprintf "%d%02d is two tokens" century year)
                Expect.equal (Tokenizer.decode t [| ids[1] |]) (sprintf "%02d" year) "the second is YY"
                Expect.isTrue (year >= 2 && year <= 98) "YY in 02..98"
            let years = valid |> List.map snd |> List.distinct
            let prompts = TaskPrompts.greaterThan t (2 * years.Length) 7
            for p in prompts do
                Expect.equal p.Text (sprintf "The %s lasted from the year %d%02d to the year %d" p.Noun p.Century p.Year p.Century) "the template"
                Expect.equal p.Corrupted (sprintf "The %s lasted from the year %d01 to the year %d" p.Noun p.Century p.Century) "the 01 corruption"
                Expect.contains valid (p.Century, p.Year) "a valid year"
                Expect.contains TaskPrompts.greaterThanNouns p.Noun "a listed noun"
            let counts = prompts |> Array.countBy (fun p -> p.Year) |> Array.map snd
            Expect.equal (Array.distinct counts) [| 2 |] "every valid YY twice in two cycles"
            Expect.equal (TaskPrompts.greaterThan t 20 7) (TaskPrompts.greaterThan t 20 7) "the same seed, the same prompts"
        }

        test "the year tokens are 100 distinct single tokens 00..99; a vocabulary without them fails clearly" {
            let ids = TaskPrompts.yearTokens (gpt2.Force())
            Expect.equal (Array.distinct ids).Length 100 "100 distinct ids"
            ids |> Array.iteri (fun y id -> Expect.equal (Tokenizer.decode (gpt2.Force()) [| id |]) (sprintf "%02d" y) "decodes to its year")
            let compact = Tokenizer.compact (CompactVocab.ofBaseIds "gpt2" 50257 [| 13; 11; 262 |])
            let message =
                try TaskPrompts.yearTokens compact |> ignore; None
                with :? ArgumentException as e -> Some e.Message
            Expect.isSome message "no two-digit tokens: an ArgumentException"
            Expect.stringContains message.Value "\"00\"" "names the token"
        }

        testProperty "the probability difference is the mass above YY minus the mass at or below it" <| fun (seed: int) (y: byte) ->
            let year = int y % 100
            let rng = Random seed
            let vocab = 150
            let years = Array.init 100 (fun i -> i + 50)
            let probs = Array.init vocab (fun _ -> rng.NextDouble())
            let total = Array.sum probs
            let probs = probs |> Array.map (fun p -> p / total)
            let above = [ for i in year + 1 .. 99 -> probs[years[i]] ] |> List.sum
            let atOrBelow = [ for i in 0 .. year -> probs[years[i]] ] |> List.sum
            let raw = TaskPrompts.probabilityDifference false years year probs
            let restricted = TaskPrompts.probabilityDifference true years year probs
            abs (raw - (above - atOrBelow)) < 1e-9
            && abs (restricted - (above - atOrBelow) / (above + atOrBelow)) < 1e-9
            && restricted >= -1.0 - 1e-12 && restricted <= 1.0 + 1e-12
    ]

/// The scratch folder of the paper script tests (removed when the process exits).
let private work =
    lazy
        (let dir = Path.Combine(Path.GetTempPath(), sprintf "transcoders-paper-tests-%d-%s" Environment.ProcessId (Guid.NewGuid().ToString("N").[..7]))
         Directory.CreateDirectory dir |> ignore
         AppDomain.CurrentDomain.ProcessExit.Add(fun _ -> try Directory.Delete(dir, true) with _ -> ())
         dir)

let private path (relative: string) = Path.Combine(work.Force(), relative)
let private env () = [ "TRANSCODERS_CACHE", path "cache"; "TRANSCODERS_DATA", Paths.dataDir () ]
let private common = [ "--device"; "cpu"; "--threads"; "1" ]

let private cli (args: string list) =
    let code, out, err = runDotnet (builtAssembly "src/Transcoders.Cli" "Transcoders.Cli.dll" :: args) (work.Force()) (env ()) (TimeSpan.FromMinutes 5.0)
    if code <> 0 then failtestf "transcoders %s exited %d\nstdout:\n%s\nstderr:\n%s" (String.Join(" ", args)) code out err

/// A tiny GPT (2 layers, d_model 16) on a few shipped stories, token shards of the same stories, and its coders:
/// transcoders, SAEs on hook_mlp_out, skip transcoders and a cross-layer transcoder, a few steps each.
let private tiny =
    lazy
        (let stories = path "stories.txt"
         let texts = Corpus.readStories (Paths.data "tinystories/ts_v2_valid_head_part2.txt.gz") |> Seq.truncate 300 |> Seq.map (fun s -> s.Text)
         File.WriteAllText(stories, String.Join("\n<|endoftext|>\n", texts))
         cli [ "corpus"; "--files"; stories; "--vocab-size"; "300"; "--out"; path "corpus" ]
         cli ([ "train-lm"; "--files"; stories; "--vocab-size"; "300"; "--layers"; "2"; "--d-model"; "16"; "--heads"; "2"; "--ctx"; "64"
                "--batch"; "4"; "--steps"; "4"; "--warmup"; "1"; "--eval-every"; "4"; "--checkpoint-every"; "4"; "--out"; path "lm" ] @ common)
         cli ([ "train-coder"; path "lm/model"; "--tokens"; path "corpus"; "--kind"; "transcoder"; "sae"; "skip-transcoder"; "clt"
                "--width"; "32"; "--k"; "4"; "--steps"; "4"; "--batch"; "64"; "--ctx"; "32"; "--eval-rows"; "128"; "--spliced-rows"; "2"
                "--checkpoint-every"; "0"; "--out"; path "coders" ] @ common)
         path "lm/model", path "coders")

/// Runs `dotnet fsi <script>` in the scratch folder; its stdout.
let private fsi (script: string) (args: string list) =
    let code, out, err = runDotnet ([ "fsi"; Path.Combine(repoRoot, script) ] @ args) (work.Force()) (env ()) (TimeSpan.FromMinutes 5.0)
    Expect.equal code 0 (sprintf "%s: exit code (stdout: %s; stderr: %s)" script out err)
    out

/// Runs `paper/<name>.fsx MODEL CODERS args --out <dir>` and returns its results file's text.
let private paper (name: string) (file: string) (args: string list) =
    let model, coders = tiny.Force()
    let out = path ("results-" + name)
    fsi (sprintf "paper/%s.fsx" name) ([ model; coders ] @ args @ [ "--out"; out ] @ common) |> ignore
    let results = Path.Combine(out, file)
    Expect.isTrue (File.Exists results) (sprintf "%s written" results)
    File.ReadAllText results

let private hasColumns (text: string) (columns: string list) =
    let header = "| " + String.Join(" | ", columns) + " |"
    Expect.stringContains text header (sprintf "the table with columns %s" header)
    Expect.stringContains text "Made by `dotnet fsi paper/" "the command at the top"
    Expect.stringContains text "Wall time" "the wall time at the top"

let scriptTests =
    testList "paper scripts" [
        test "sparsity-fidelity trains transcoders and SAEs at each k and writes the frontier" {
            let sfArgs =
                [ "--tokens"; path "corpus"; "--ks"; "2"; "4"; "--width"; "32"; "--steps"; "3"; "--batch"; "64"
                  "--ctx"; "32"; "--eval-rows"; "128"; "--spliced-rows"; "2"; "--work"; path "sf" ]
            let text = paper "sparsity-fidelity" "sparsity-fidelity.md" sfArgs
            hasColumns text [ "layer"; "kind"; "k"; "L0"; "FVU"; "CE spliced"; "ΔCE"; "CE recovered"; "on the CE frontier" ]
            hasColumns text [ "layer"; "k"; "L0 transcoder"; "L0 SAE"; "CE transcoder"; "CE SAE"; "CE transcoder − SAE"; "FVU transcoder"; "FVU SAE" ]
            // 2 layers × 2 kinds × 2 ks rows
            Expect.equal (text.Split('\n') |> Array.filter (fun l -> l.StartsWith "| 0 | transcoder |" || l.StartsWith "| 1 | sae |") |> Array.length) 4 "a row per point"
        }

        test "spliced-table splices each family, layer by layer and all at once" {
            let text = paper "spliced-table" "spliced-table.md" [ "--rows"; "4"; "--ctx"; "32" ]
            hasColumns text [ "coder"; "replaced"; "CE spliced"; "ΔCE"; "CE zero-ablated"; "CE recovered"; "KL to clean"; "KL zero-ablated"; "top-1 agreement"; "top-1 zero-ablated" ]
            for row in [ "| transcoder | MLP 0 |"; "| transcoder | MLP 1 |"; "| transcoder | all MLPs |"; "| skip transcoder | all MLPs |"; "| cross-layer transcoder | all MLPs |" ] do
                Expect.stringContains text row (sprintf "the row %s" row)
        }

        test "case-study traces a feature's paths, checks them by ablation and lists a graph's supernodes" {
            let text = paper "case-study" "case-study.md" [ "--stories"; "40"; "--ctx"; "32"; "--min-count"; "2"; "--supernodes"; "3" ]
            hasColumns text [ "attribution"; "path" ]
            hasColumns text [ "node"; "contribution"; "transcoder error"; "bias error"; "prune error" ]
            hasColumns text [ "ablated"; "predicted change (−path attribution)"; "measured change"; "measured / predicted" ]
            hasColumns text [ "supernode"; "positions (tokens)"; "influence"; "top examples"; "de-embedding"; "promotes" ]
        }

        test "tc-vs-clt scores graphs of both replacements over held-out first sentences" {
            let text = paper "tc-vs-clt" "tc-vs-clt.md" [ "--prompts"; "3" ]
            hasColumns text [ "score"; "mean"; "median"; "sd"; "25%"; "75%"; "min"; "max" ]
            Expect.stringContains text "| replacement, CLT − transcoders |" "the paired difference"
            Expect.equal (text.Split('\n') |> Array.filter (fun l -> l.StartsWith "| ") |> Array.length) (2 + 6 + 2 + 3) "six score rows and three prompts"
        }

        test "blind-interp prepares a blind set, reads verdicts and unblinds the tally by origin" {
            let model, coders = tiny.Force()
            let blind = path "blind"
            fsi "paper/blind-interp.fsx" ([ model; coders; "--n"; "3"; "--stories"; "40"; "--ctx"; "32"; "--min-count"; "1"; "--work"; blind ] @ common) |> ignore
            let features = File.ReadAllText(Path.Combine(blind, "features.md"))
            let headings = features.Split('\n') |> Array.filter (fun l -> l.StartsWith "## ")
            Expect.equal headings.Length 6 "a section per feature"
            for h in headings do Expect.isTrue (Text.RegularExpressions.Regex.IsMatch(h, "^## F[0-9]{3}$")) (sprintf "'%s' names no origin" h)
            let template = File.ReadAllLines(Path.Combine(blind, "verdicts.tsv"))
            let ids = template |> Array.filter (fun l -> not (l.StartsWith "#")) |> Array.map (fun l -> l.Split('\t')[0])
            Expect.equal ids.Length 6 "three features of each kind"
            let filled = path "verdicts.tsv"
            let verdict i = [| "yes"; "maybe"; "no" |][i % 3]
            File.WriteAllLines(filled, ids |> Array.mapi (fun i id -> sprintf "%s\t%s\t%s\tnote %d" id (verdict i) (if i % 2 = 0 then "yes" else "no") i))
            let text = paper "blind-interp" "blind-interp.md" [ "--verdicts"; filled; "--unblind"; "--work"; blind ]
            hasColumns text [ "origin"; "rated"; "interpretable"; "maybe"; "not"; "single-token (rater)"; "single-token (≥ 80% of top examples on one token)" ]
            let count (origin: string) = text.Split('\n') |> Array.tryFind (fun l -> l.StartsWith(sprintf "| %s | " origin)) |> Option.map (fun l -> let cells = l.Split('|') in int (cells[2].Trim()))
            Expect.equal (count "transcoder") (Some 3) "three transcoder features rated"
            Expect.equal (count "sae") (Some 3) "three SAE features rated"
        }

        test "scripts/walkthrough.fsx traces and tests a feature's paths" {
            let model, coders = tiny.Force()
            let out = fsi "scripts/walkthrough.fsx" [ model; coders ]
            Expect.stringContains out "paths:" "the paths"
            Expect.stringContains out "de-embedding:" "the de-embedding"
            Expect.stringContains out "graph of mlp" "the path graph"
        }
    ]

let tests = testList "paper" [ taskPromptTests; scriptTests ]
