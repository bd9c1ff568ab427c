/// How a long run shows its progress: a live Spectre.Console bar on a terminal, plain periodic lines
/// when the output is redirected or under CI, or nothing.
module Transcoders.Training.Progress

open System
open Spectre.Console

/// How to show progress.
type Mode =
    /// A live bar on an interactive terminal; plain lines when output is redirected or CI is set.
    | Auto
    /// Always the live bar.
    | Bar
    /// One plain line per logged record.
    | Lines
    /// Nothing at all (tests, library use).
    | Silent

/// The state shown on every step.
type Snapshot = { Step: int; Total: int; Loss: float; Lr: float; TokensPerSecond: float }

/// Receives the run's progress.
type IReporter =
    /// After every update (must be cheap).
    abstract Update: Snapshot -> unit
    /// After every metrics record is written.
    abstract Logged: Metrics.Record * total: int -> unit
    /// A line worth telling the user (resumed from…, stopped because…).
    abstract Message: string -> unit

let private isCi () =
    match Environment.GetEnvironmentVariable "CI" with
    | null | "" | "0" -> false
    | v -> not (v.Equals("false", StringComparison.OrdinalIgnoreCase))

/// `Auto` resolved for this process: `Lines` when output is redirected, CI is set or the console is not interactive.
let resolve (mode: Mode) =
    match mode with
    | Auto ->
        if Console.IsOutputRedirected || isCi () || not AnsiConsole.Profile.Capabilities.Interactive then Lines else Bar
    | m -> m

let private fmtTokens (tps: float) =
    if not (Double.IsFinite tps) then "-" else tps.ToString("N0", Globalization.CultureInfo.InvariantCulture)

let private fmtFloat (fmt: string) (v: float) = v.ToString(fmt, Globalization.CultureInfo.InvariantCulture)

/// A record as one plain line: `step 100/1000  loss 3.2140  lr 6.00e-04  |g| 0.812  12,345 tok/s  0:01:23  eval: …`.
let line (r: Metrics.Record) (total: int) =
    let group (name: string) (m: Map<string, float>) =
        if m.IsEmpty then ""
        else sprintf "  %s " name + (m |> Seq.map (fun (KeyValue (k, v)) -> sprintf "%s %s" k (fmtFloat "G5" v)) |> String.concat ", ")
    let eval = group "train" r.Train + group "eval" r.Eval
    sprintf "step %d/%d  loss %s  lr %s  |g| %s  %s tok/s  %s%s" r.Step total (fmtFloat "F4" r.Loss) (fmtFloat "0.00e+00" r.Lr)
        (fmtFloat "G4" r.GradNorm) (fmtTokens r.TokensPerSecond) (TimeSpan.FromSeconds(r.ElapsedSeconds).ToString(@"h\:mm\:ss")) eval

let private silent =
    { new IReporter with
        member _.Update _ = ()
        member _.Logged(_, _) = ()
        member _.Message _ = () }

let private lines =
    { new IReporter with
        member _.Update _ = ()
        member _.Logged(r, total) = Console.Out.WriteLine(line r total); Console.Out.Flush()
        member _.Message m = Console.Out.WriteLine m; Console.Out.Flush() }

/// Runs `body` with a reporter for `mode`; `title` names the run, `start`/`total` are in updates.
let run (mode: Mode) (title: string) (start: int) (total: int) (body: IReporter -> 'T) : 'T =
    match resolve mode with
    | Silent -> body silent
    | Lines | Auto -> body lines
    | Bar ->
        AnsiConsole
            .Progress()
            .AutoClear(false)
            .Columns(
                [| TaskDescriptionColumn() :> ProgressColumn
                   ProgressBarColumn()
                   PercentageColumn()
                   ElapsedTimeColumn()
                   RemainingTimeColumn() |])
            .Start(
                Func<ProgressContext, 'T>(fun ctx ->
                    let task = ctx.AddTask(Markup.Escape title, true, float (max total 1))
                    task.Value <- float start
                    let mutable lastText = DateTime.MinValue
                    let reporter =
                        { new IReporter with
                            member _.Update s =
                                task.Value <- float s.Step
                                let now = DateTime.UtcNow
                                if (now - lastText).TotalMilliseconds >= 200.0 || s.Step = s.Total then
                                    lastText <- now
                                    task.Description <-
                                        Markup.Escape(
                                            sprintf "%s  loss %s  lr %s  %s tok/s" title (fmtFloat "F4" s.Loss)
                                                (fmtFloat "0.00e+00" s.Lr) (fmtTokens s.TokensPerSecond))
                            member _.Logged(r, total) = AnsiConsole.WriteLine(line r total)
                            member _.Message m = AnsiConsole.WriteLine m }
                    body reporter))
