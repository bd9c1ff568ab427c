/// Training runs killed with SIGKILL (Process.Kill) at seeded random moments, some while a checkpoint is being
/// written, and resumed each time: the final weights and the metrics log must equal those of a run that was never
/// interrupted. The runs are the real command line (`train-lm`, `train-coder`) as child processes, on tiny models.
/// Also: a diverging `train-lm` exits non-zero, writes no final model and names the checkpoint to use.
module Transcoders.Tests.KillTests

open System
open System.Diagnostics
open System.IO
open System.Text.Json
open System.Text.Json.Nodes
open System.Threading
open Expecto
open Transcoders.Coders
open Transcoders.Files
open Transcoders.Models
open Transcoders.Text
open Transcoders.Training
open Transcoders.Tests.Fixtures

/// The built command line, next to this test binary's configuration (src/Transcoders.Cli/bin/<Configuration>/<tfm>).
let private cliDll () =
    let here = DirectoryInfo(Path.TrimEndingDirectorySeparator AppContext.BaseDirectory)
    let tfm, configuration = here.Name, here.Parent.Name
    let candidate = Path.Combine(repoRoot, "src", "Transcoders.Cli", "bin", configuration, tfm, "Transcoders.Cli.dll")
    if File.Exists candidate then candidate
    else failtestf "the command line is not built (looked for %s); building tests/Transcoders.Tests builds it" candidate

let private host () =
    match Environment.GetEnvironmentVariable "DOTNET_HOST_PATH" with
    | null | "" -> "dotnet"
    | p -> p

/// A started command-line process whose output is drained in the background.
type private Child(args: string list, environment: (string * string) list) =
    let psi =
        ProcessStartInfo(host (), UseShellExecute = false, RedirectStandardOutput = true, RedirectStandardError = true,
                         WorkingDirectory = Path.GetTempPath())
    do
        psi.ArgumentList.Add(cliDll ())
        for a in args do psi.ArgumentList.Add a
        for name, value in environment do psi.Environment[name] <- value
    let p = Process.Start psi
    let out = p.StandardOutput.ReadToEndAsync()
    let err = p.StandardError.ReadToEndAsync()
    member _.HasExited = p.HasExited
    /// SIGKILL, no chance to clean up.
    member _.Kill() =
        try p.Kill() with :? InvalidOperationException -> () // it had already exited
        p.WaitForExit()
    /// Waits for the end (at most `minutes`); returns (exit code, stdout, stderr).
    member _.Wait(minutes: float) =
        if not (p.WaitForExit(TimeSpan.FromMinutes minutes)) then
            p.Kill true
            failtestf "%s did not finish within %g minutes" (String.Join(" ", args)) minutes
        p.WaitForExit()
        p.ExitCode, out.Result, err.Result
    member _.Output = out.Result + err.Result
    interface IDisposable with
        member _.Dispose() = (try if not p.HasExited then p.Kill true with _ -> ()); p.Dispose()

/// Runs the command line to its end; fails the test on a non-zero exit code.
let private runToEnd (args: string list) (environment: (string * string) list) =
    use c = new Child(args, environment)
    let code, out, err = c.Wait 5.0
    Expect.equal code 0 (sprintf "exit code of %s (stdout: %s; stderr: %s)" (String.Join(" ", args)) out err)
    out

let private steps (root: string) = Checkpointing.list root |> List.map fst

/// Partly written checkpoints (temporary folders) under `root`.
let private partial (root: string) =
    if Directory.Exists root then
        Directory.GetDirectories root |> Array.filter (fun d -> (Path.GetFileName d).Contains ".tmp-")
    else [||]

type private KillReport = { Kills: int; DuringWrite: int; Runs: int; Output: string list }

/// Starts the run in `args` again and again, killing it with SIGKILL: once it has checkpointed past where it
/// started, either after a seeded random delay or (`duringWrite`) as soon as a checkpoint's temporary folder
/// appears. At least `kills` kills, at least `writes` of them leaving a partly written checkpoint behind; then the
/// run goes to its end. Returns what happened.
let private killRepeatedly (seed: int) (kills: int) (writes: int) (root: string) (args: string list) (environment: (string * string) list) =
    let rng = Random seed
    let mutable killed = 0
    let mutable duringWrite = 0
    let mutable runs = 0
    let mutable finished = false
    let outputs = ResizeArray<string>()
    while not finished && (killed < kills || duringWrite < writes) && killed < kills + 8 do
        let before = steps root |> List.fold max -1
        let leftovers = partial root |> Set.ofArray
        let fresh () = partial root |> Array.exists (fun d -> not (leftovers.Contains d))
        let aimAtWrite = duringWrite < writes && (killed >= kills - writes || rng.Next 2 = 0)
        use c = new Child(args, environment)
        runs <- runs + 1
        let deadline = Stopwatch.StartNew()
        // wait until the run has got somewhere (a checkpoint beyond the one it resumed from)
        while not c.HasExited && (steps root |> List.fold max -1) <= before && deadline.Elapsed < TimeSpan.FromMinutes 3.0 do
            Thread.Sleep 2
        if c.HasExited then
            let code, out, err = c.Wait 1.0
            Expect.equal code 0 (sprintf "a resumed run ended by itself with an error (stdout: %s; stderr: %s)" out err)
            finished <- true
        else
            if aimAtWrite then
                while not c.HasExited && not (fresh ()) && deadline.Elapsed < TimeSpan.FromMinutes 3.0 do
                    Thread.SpinWait 2000
            else Thread.Sleep(rng.Next(10, 250))
            let exitedFirst = c.HasExited
            c.Kill()
            outputs.Add c.Output
            if exitedFirst then finished <- true
            else
                killed <- killed + 1
                if fresh () then duringWrite <- duringWrite + 1
    if not finished then outputs.Add(runToEnd args environment); runs <- runs + 1
    { Kills = killed; DuringWrite = duringWrite; Runs = runs; Output = List.ofSeq outputs }

/// A metrics line without its wall-clock fields (throughput and elapsed time differ between any two runs).
let private withoutTime (line: string) =
    let o = JsonNode.Parse(line).AsObject()
    o.Remove "tokens_per_s" |> ignore
    o.Remove "elapsed_s" |> ignore
    o.ToJsonString()

let private lines (path: string) = File.ReadAllLines path |> Array.filter (fun l -> l.Trim() <> "")

/// 300 TinyStories stories as a text file in the corpus format.
let private writeStories (path: string) =
    let stories =
        Corpus.readStories (Path.Combine(Paths.data "tinystories", "ts_v1_train_head.txt.gz"))
        |> Seq.truncate 300 |> Seq.map (fun s -> s.Text)
    File.WriteAllText(path, String.Join("\n" + Corpus.Delimiter + "\n", stories) + "\n")

let private lmArgs (stories: string) (out: string) (extra: string list) =
    [ "train-lm"; "--files"; stories; "--vocab-size"; "300"; "--layers"; "1"; "--d-model"; "16"; "--heads"; "2"
      "--ctx"; "16"; "--batch"; "4"; "--warmup"; "5"; "--checkpoint-every"; "1"; "--eval-every"; "6"
      "--log-every"; "4"; "--device"; "cpu"; "--threads"; "1"; "--seed"; "3"; "--out"; out ] @ extra

let tests =
    testSequenced <| testList "killed and resumed" [
        test "train-lm killed with SIGKILL at random moments (also mid-checkpoint) resumes to the same weights and metrics log" {
            use dir = new TempDir()
            let env = [ "TRANSCODERS_CACHE", dir.File "cache" ]
            let stories = dir.File "stories.txt"
            writeStories stories
            let total = "32"
            let straight = dir.File "straight"
            runToEnd (lmArgs stories straight [ "--steps"; total ]) env |> ignore
            let broken = dir.File "broken"
            let args = lmArgs stories broken [ "--steps"; total; "--resume" ]
            let r = killRepeatedly 20261203 4 1 (Trainer.checkpointsDir broken) args env
            printfn "train-lm: %d kills (%d during a checkpoint write) over %d runs" r.Kills r.DuringWrite r.Runs
            Expect.isGreaterThanOrEqual r.Kills 4 (sprintf "killed at least 4 times (%A)" r)
            Expect.isGreaterThanOrEqual r.DuringWrite 1 (sprintf "at least one kill left a half-written checkpoint (%A)" r)
            let bytes (root: string) (relative: string) = File.ReadAllBytes(Path.Combine(root, relative))
            for f in [ "model/model.safetensors"; "model/config.json"
                       "checkpoints/step_000032/model.safetensors"; "checkpoints/step_000032/optimizer.safetensors" ] do
                Expect.isTrue (bytes broken f = bytes straight f) (sprintf "%s is bit-identical to the uninterrupted run's" f)
            let a = lines (Trainer.metricsPath straight) |> Array.map withoutTime
            let b = lines (Trainer.metricsPath broken) |> Array.map withoutTime
            Expect.equal b.Length a.Length "as many metrics records"
            Expect.sequenceEqual b a "metrics.jsonl equals the uninterrupted run's (wall-clock fields aside)"
            Expect.isEmpty (partial (Trainer.checkpointsDir broken)) "no half-written checkpoint left at the end"
        }

        test "train-coder killed with SIGKILL at random moments (also mid-checkpoint) resumes to the same coder and log" {
            use dir = new TempDir()
            let modelPath = Paths.data "models/stories260K/stories260K.bin"
            let stories = dir.File "stories.txt"
            writeStories stories
            let tokens = dir.File "tokens"
            ModelText.prepare (ModelTokenizer.find modelPath) [ stories ] tokens |> ignore
            let args (out: string) (extra: string list) =
                [ "train-coder"; modelPath; "--tokens"; tokens; "--layers"; "1"; "--width"; "128"; "--k"; "8"; "--steps"; "30"
                  "--batch"; "64"; "--buffer-rows"; "512"; "--ctx"; "32"; "--checkpoint-every"; "1"; "--eval-rows"; "0"
                  "--spliced-rows"; "0"; "--device"; "cpu"; "--threads"; "1"; "--out"; out ] @ extra
            let env = [ "TRANSCODERS_CACHE", dir.File "cache" ]
            let straight = dir.File "straight"
            runToEnd (args straight []) env |> ignore
            let broken = dir.File "broken"
            let r = killRepeatedly 7 3 1 (Path.Combine(broken, "checkpoint")) (args broken []) env
            printfn "train-coder: %d kills (%d during a checkpoint write) over %d runs" r.Kills r.DuringWrite r.Runs
            Expect.isGreaterThanOrEqual r.Kills 3 (sprintf "killed at least 3 times (%A)" r)
            Expect.isGreaterThanOrEqual r.DuringWrite 1 (sprintf "at least one kill left a half-written checkpoint (%A)" r)
            for f in [ "transcoder-L1/coder.safetensors"; "transcoder-L1/log.jsonl" ] do
                let a = File.ReadAllBytes(Path.Combine(straight, f))
                let b = File.ReadAllBytes(Path.Combine(broken, f))
                Expect.isTrue (a = b) (sprintf "%s is bit-identical to the uninterrupted run's" f)
        }

        test "a diverging train-lm exits non-zero, writes no final model and names the checkpoint to use" {
            use dir = new TempDir()
            let env = [ "TRANSCODERS_CACHE", dir.File "cache" ]
            let stories = dir.File "stories.txt"
            writeStories stories
            let out = dir.File "run"
            use c = new Child(lmArgs stories out [ "--steps"; "30"; "--warmup"; "20"; "--lr"; "1e3" ], env)
            let code, stdout, stderr = c.Wait 5.0
            Expect.equal code 2 (sprintf "exit code (stdout: %s; stderr: %s)" stdout stderr)
            Expect.isFalse (Directory.Exists(Path.Combine(out, "model"))) "no final model"
            Expect.stringContains stderr "Checkpoint to use: " "names the checkpoint to use"
            let named = stderr.Substring(stderr.IndexOf "Checkpoint to use: " + "Checkpoint to use: ".Length).Trim()
            let root = Trainer.checkpointsDir out
            let loss d = Trainer.checkpointLoss (Checkpointing.verified d)
            Expect.isTrue (Directory.Exists named) (sprintf "the named checkpoint %s exists" named)
            let newest = Checkpointing.list root |> List.last |> snd
            Expect.isLessThan (loss named) 10.0 (sprintf "the named checkpoint was taken before the loss blew up (%g)" (loss named))
            Expect.isGreaterThan (loss newest) (10.0 * loss named) "the newest checkpoint is past the divergence, and not the one named"
            Expect.stringContains stdout "not finite" "says why it stopped"
        }
    ]
