/// Console output shared by the commands: plain aligned tables, durations.
module Transcoders.Cli.Output

open System

/// Prints rows as an aligned two-column table.
let table (rows: (string * string) list) =
    let w = rows |> List.map (fst >> String.length) |> List.fold max 0
    for k, v in rows do
        printfn "  %-*s  %s" w k v

let seconds (t: TimeSpan) = sprintf "%.1f s" t.TotalSeconds

let count (n: int64) = n.ToString("N0", Globalization.CultureInfo.InvariantCulture)

let percent (f: float) = sprintf "%.3f%%" (100.0 * f)
