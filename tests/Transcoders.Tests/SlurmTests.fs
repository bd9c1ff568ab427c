/// Sweeps on Slurm without a cluster: the job table's settings round trip, the batch scripts, and the gather of a sweep
/// directory with finished and unfinished configurations. (.ci/slurm-test.sh runs a real single-node cluster.)
module Transcoders.Tests.SlurmTests

open System
open System.IO
open System.Text.Json
open Expecto
open FsCheck
open Transcoders.Cluster
open Transcoders.Coders

let private options =
    { JobName = "sweep-test"; Sbatch = []; MaxParallel = 0; Command = "dotnet /opt/t/Transcoders.Cli.dll"; Device = "cuda"; Setup = [ "module load cuda" ] }

let private sbatchLines (script: string) =
    script.Split('\n') |> Array.filter (fun l -> l.StartsWith "#SBATCH ") |> Array.map (fun l -> l.Substring 8) |> List.ofArray

let private metrics (name: string) (l0: float) (ce: float) : MetricsRow =
    { Name = name; Kind = "transcoder"; Layers = "1"; HookIn = "a"; HookOut = "b"; Width = 32; Activation = "topk"; K = l0
      Lambda = nan; Tokens = 1000L; L0 = l0; Fvu = 0.1 * ce; Mse = 0.01; NormalizedMse = 0.02; CosineSimilarity = 0.99
      DeadFraction = 0.0; DenseFraction = 0.0; CeClean = 5.0; CeSpliced = ce; CeAblated = 6.0; CeRecovered = 0.9
      KlToClean = 0.001; KlRecovered = 0.9; Top1Agreement = 0.95 }

let tests =
    testList "slurm" [
        testProperty "sweep settings survive the job table's JSON" (fun (steps: PositiveInt) (seed: int64) (ks: PositiveInt list) (l1: NormalFloat list) (ctx: PositiveInt option) ->
            let s =
                { SweepSettings.Default "/m/model" with
                    Tokens = Some "/t/corpus"; Steps = steps.Get; Seed = seed; Ks = ks |> List.map (fun k -> k.Get)
                    L1s = l1 |> List.map (fun l -> l.Get); Ctx = ctx |> Option.map (fun c -> c.Get); Layers = [ 0; 3 ] }
            let back = SweepSettings.ofJson "t" (Nodes.JsonNode.Parse((SweepSettings.toJson s).ToJsonString()).AsObject())
            back = s)

        test "a settings object missing a field fails naming the field" {
            let o = SweepSettings.toJson (SweepSettings.Default "/m")
            o.Remove "steps" |> ignore
            let e = Expect.throwsC (fun () -> SweepSettings.ofJson "sweep.json" o |> ignore) id
            Expect.stringContains e.Message "'steps'" "names the field"
            Expect.stringContains e.Message "sweep.json" "names the file"
        }

        test "the array script: one task per row, requeue, SIGTERM before the limit, the task's row, requeue on exit 75" {
            let o = { options with MaxParallel = 2; Sbatch = [ "partition", "gpu"; "gres", "gpu:1"; "cpus-per-task", "8" ] }
            let script = Slurm.trainScript o "/shared/sw" "/shared/sw/sweep.json" 12
            let lines = sbatchLines script
            Expect.contains lines "--array=0-11%2" "12 rows, 2 at once"
            Expect.contains lines "--requeue" "requeue"
            Expect.contains lines (sprintf "--signal=TERM@%d" Slurm.SignalSeconds) "warning before the time limit"
            Expect.contains lines "--partition=gpu" "the user's partition"
            Expect.contains lines "--gres=gpu:1" "the user's GPUs"
            Expect.contains lines "--cpus-per-task=8" "the user's CPUs"
            Expect.isFalse (List.contains "--cpus-per-task=1" lines) "the default gives way to the user's"
            Expect.stringContains script "sweep-task --table '/shared/sw/sweep.json' --index \"$SLURM_ARRAY_TASK_ID\"" "the task's row"
            Expect.stringContains script "--device 'cuda'" "the device"
            Expect.stringContains script "module load cuda" "the set-up lines"
            Expect.stringContains script (sprintf "if [ \"$rc\" -eq %d ]; then" Slurm.RequeueExitCode) "requeue on the checkpoint exit code"
            Expect.stringContains script "scontrol requeue \"${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}\"" "requeues its own task"
        }

        test "the sweep's own options cannot be overridden" {
            Expect.throws (fun () -> Slurm.trainScript { options with Sbatch = [ "array", "0-3" ] } "/d" "/d/t.json" 4 |> ignore) "array is the sweep's"
            Expect.equal (Slurm.parseOption "--time=04:00:00") ("time", "04:00:00") "key=value with dashes"
            Expect.equal (Slurm.parseOption "exclusive") ("exclusive", "") "a bare key"
        }

        test "submit.sh chains cache → array (afterok) → gather (afterany)" {
            let s = Slurm.submitScript "/shared/sw"
            Expect.stringContains s "--dependency=afterok:${cache%%;*} train.sbatch" "the array waits for the cache"
            Expect.stringContains s "--dependency=afterany:${train%%;*} gather.sbatch" "gather runs whatever the tasks did"
        }

        test "gather writes the finished rows as the in-process sweep orders them and names the unfinished ones" {
            let dir = Directory.CreateTempSubdirectory("transcoders-slurm-gather-").FullName
            try
                let settings = { SweepSettings.Default "/m/model" with Kinds = [ "transcoder" ]; Ks = [ 2; 4; 8; 16 ]; Layers = [ 1 ]; Widths = [ 32 ] }
                let rows = [ for i, k in List.indexed [ 2; 4; 8; 16 ] -> { Index = i; Name = sprintf "transcoder-L1-w32-k%d" k; Kind = "transcoder"; Layer = 1; Width = 32; Level = sprintf "k%d" k } ]
                let table = { Dir = dir; Settings = settings; Rows = rows }
                let json = JsonSerializerOptions(NumberHandling = Serialization.JsonNumberHandling.AllowNamedFloatingPointLiterals)
                let finish (r: TableRow) (m: MetricsRow) =
                    let d = SlurmSweep.runDir dir r.Name
                    Directory.CreateDirectory d |> ignore
                    File.WriteAllText(Path.Combine(d, "status.json"), """{"state":"finished"}""")
                    File.WriteAllText(Path.Combine(d, "metrics-row.json"), JsonSerializer.Serialize(m, json))
                // k16 finished with the lower L0 listed first in the table's order only after sorting
                finish rows[3] (metrics rows[3].Name 16.0 5.1)
                finish rows[0] (metrics rows[0].Name 2.0 5.5)
                let stopped = SlurmSweep.runDir dir rows[1].Name
                Directory.CreateDirectory stopped |> ignore
                File.WriteAllText(Path.Combine(stopped, "status.json"), """{"state":"stopped","step":500}""")
                let g = SlurmSweep.gather table
                Expect.equal (g.Rows |> List.map (fun r -> r.Name)) [ rows[0].Name; rows[3].Name ] "finished rows, by L0"
                Expect.equal (g.Unfinished |> List.map (fun (r, s) -> r.Name, s)) [ rows[1].Name, Stopped 500; rows[2].Name, Pending ] "unfinished, with their state"
                Expect.isTrue (g.Frontier |> List.forall (fun f -> f.ParetoCe)) "lower L0 with higher CE and the reverse: both on the frontier"
                let md = File.ReadAllText(Path.Combine(dir, "sweep.md"))
                Expect.stringContains md (sprintf "- %s (task 1): stopped at step 500" rows[1].Name) "the stopped one named"
                Expect.stringContains md (sprintf "- %s (task 2): not started" rows[2].Name) "the missing one named"
                Expect.stringContains md (sprintf "sbatch --array=1,2 %s" (Path.Combine(dir, "train.sbatch"))) "how to rerun them alone"
                let csv = File.ReadAllLines(Path.Combine(dir, "sweep.csv"))
                Expect.equal csv.Length 3 "header and two rows"
                Expect.equal (csv[1].Split(',')[0]) rows[0].Name "sorted by L0"
                Expect.isTrue (File.Exists(Path.Combine(dir, "frontier.html"))) "the plot page"
            finally
                Directory.Delete(dir, true)
        }

        test "the C# facade prepares a Slurm sweep (table, scripts, submit.sh) and gathers it" {
            let dir = Path.Combine(Path.GetTempPath(), "transcoders-cluster-" + Guid.NewGuid().ToString("N").[..11])
            try
                let options =
                    Transcoders.ClusterSweepOptions(
                        Kinds = ResizeArray [ "transcoder"; "sae" ], Layers = ResizeArray [ 1 ], Ks = ResizeArray [ 2; 4 ],
                        Widths = ResizeArray [ 32 ], Steps = 5, Command = "dotnet /opt/t/Transcoders.Cli.dll", Device = "cpu")
                options.Sbatch["partition"] <- "gpu"
                let names = Transcoders.ClusterSweep.Prepare(Transcoders.Files.Paths.data "models/stories260K/stories260K.bin", dir, options)
                Expect.equal names.Count 4 "2 kinds × 2 levels at one layer and width"
                for f in [ "sweep.json"; "jobs.csv"; "cache.sbatch"; "train.sbatch"; "gather.sbatch"; "submit.sh" ] do
                    Expect.isTrue (File.Exists(Path.Combine(dir, f))) f
                let train = File.ReadAllText(Path.Combine(dir, "train.sbatch"))
                Expect.contains (sbatchLines train) "--partition=gpu" "the user's #SBATCH option"
                Expect.contains (sbatchLines train) "--array=0-3" "one array task per configuration"
                let summary = Transcoders.ClusterSweep.Gather dir
                Expect.equal summary.Finished 0 "nothing trained yet"
                Expect.equal summary.Unfinished.Count 4 "every configuration named as unfinished"
            finally
                if Directory.Exists dir then Directory.Delete(dir, true)
        }
    ]
