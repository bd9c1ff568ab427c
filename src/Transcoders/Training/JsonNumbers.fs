/// Numbers in the JSON this library writes (metrics logs, trainer state, run summaries, evaluations).
/// System.Text.Json refuses NaN and ±∞ (".NET number values such as infinity cannot be written as valid JSON"),
/// so a diverged loss would crash the save that records it. Non-finite numbers are written as null and read
/// back as NaN.
module Transcoders.Training.JsonNumbers

open System
open System.Text.Json
open System.Text.Json.Nodes

/// A number as a JSON node: the value when finite, null otherwise.
let node (v: float) : JsonNode = if Double.IsFinite v then JsonValue.Create v :> JsonNode else null

/// Writes a named number: the value when finite, null otherwise.
let write (w: Utf8JsonWriter) (name: string) (v: float) =
    if Double.IsFinite v then w.WriteNumber(name, v) else w.WriteNull name

/// Reads a number written by `write` or `node`: null (or a string such as "NaN", from older files) is NaN.
let ofElement (e: JsonElement) : float =
    match e.ValueKind with
    | JsonValueKind.Number -> e.GetDouble()
    | JsonValueKind.String ->
        match Double.TryParse(e.GetString(), Globalization.NumberStyles.Float, Globalization.CultureInfo.InvariantCulture) with
        | true, v -> v
        | _ -> nan
    | _ -> nan

/// Reads a number node written by `node`: null is NaN.
let ofNode (n: JsonNode) : float =
    if isNull n then nan
    else
        match n.GetValueKind() with
        | JsonValueKind.Number -> n.GetValue<float>()
        | _ -> nan
