namespace Transcoders.Views

open System
open System.IO
open System.Reflection
open System.Text
open System.Text.Encodings.Web
open System.Text.Json
open System.Text.Json.Nodes
open Transcoders.Files

/// A vendored JavaScript library that a page inlines (see `assets/README.md`).
type Asset =
    /// d3 7.9.2 (ISC): drawing the graph page, histograms and bars.
    | D3
    /// plotly.js 2.35.3 (MIT): the charts XPlot.Plotly describes.
    | Plotly

/// What one page holds: everything is inlined, so the file opens offline from a file manager.
type PageSpec =
    { Title: string
      /// Extra CSS (added after the shared style).
      Css: string
      /// Body HTML. Build it with `Page.escape` for every string that came from a model or a user.
      Body: string
      /// The page's data, embedded as JSON (read in the page with `pageData()`); also written next to the page.
      Data: JsonNode option
      /// Libraries inlined before the page script.
      Assets: Asset list
      /// The page's own script (runs after the data and the libraries).
      Script: string }

/// The page-building module every page kind shares: escaping, JSON embedding, asset inlining, the template, and
/// writing a page with its data next to it.
///
/// Safety: every string from a model or a user reaches a page either escaped by `escape` (HTML built here) or inside
/// the embedded JSON (whose `<`, `>`, `&` and quotes are written as \uXXXX escapes, so no string can close the script
/// element), and page scripts put strings into the document with `textContent`, never as HTML.
[<RequireQualifiedAccess>]
module Page =

    /// HTML-escapes text for element content and quoted attribute values (& < > " ').
    let escape (text: string) : string =
        if isNull text then ""
        else
            let sb = StringBuilder(text.Length + 16)
            for ch in text do
                match ch with
                | '&' -> sb.Append "&amp;" |> ignore
                | '<' -> sb.Append "&lt;" |> ignore
                | '>' -> sb.Append "&gt;" |> ignore
                | '"' -> sb.Append "&quot;" |> ignore
                | '\'' -> sb.Append "&#39;" |> ignore
                | c -> sb.Append c |> ignore
            sb.ToString()

    /// JSON options for embedded data: HTML-sensitive characters escaped as \uXXXX (the default encoder), any other
    /// non-ASCII text kept readable, no indentation.
    let jsonOptions =
        let o = JsonSerializerOptions(WriteIndented = false)
        o.Encoder <- JavaScriptEncoder.Create(Unicode.UnicodeRanges.All)
        o

    /// JSON text that is safe inside a `<script>` element: besides the encoder's escapes, `<`, `>`, `&`, U+2028 and
    /// U+2029 are escaped wherever they occur (so a `</script>` inside a string cannot end the element).
    let scriptSafe (json: string) : string =
        json.Replace("<", "\\u003c").Replace(">", "\\u003e").Replace("&", "\\u0026")
            .Replace("\u2028", "\\u2028").Replace("\u2029", "\\u2029")

    /// A JSON node's text, for embedding (`scriptSafe`).
    let json (node: JsonNode) : string =
        if isNull node then "null" else scriptSafe (node.ToJsonString jsonOptions)

    let private assetName = function
        | D3 -> "d3.min.js"
        | Plotly -> "plotly.min.js"

    let private licenseName = function
        | D3 -> "d3.LICENSE"
        | Plotly -> "plotly.LICENSE"

    let private cache = Collections.Concurrent.ConcurrentDictionary<string, string>()

    /// The text of a vendored file (embedded in the assembly as `Transcoders.Views.assets.<name>`).
    let resource (name: string) : string =
        cache.GetOrAdd(name, fun n ->
            let asm = Assembly.GetExecutingAssembly()
            use s = asm.GetManifestResourceStream("Transcoders.Views.assets." + n)
            if isNull s then failwithf "vendored asset '%s' is missing from the assembly" n
            use r = new StreamReader(s, Encoding.UTF8)
            r.ReadToEnd())

    /// The library's script text and its licence.
    let asset (a: Asset) : string * string = resource (assetName a), resource (licenseName a)

    /// The shared style: system fonts, token spans, tables, panels.
    let baseCss = """
:root { --fg:#1a202c; --muted:#667085; --line:#e2e8f0; --accent:#2b6cb0; --neg:#c53030; --bg:#fff; }
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: var(--fg);
       margin: 0; padding: 12px 18px; background: var(--bg); font-size: 14px; }
h1 { font-size: 20px; margin: 4px 0 8px; } h2 { font-size: 16px; margin: 14px 0 6px; } h3 { font-size: 14px; margin: 10px 0 4px; }
.muted { color: var(--muted); } .small { font-size: 12px; }
table { border-collapse: collapse; } td, th { padding: 2px 8px; border-bottom: 1px solid var(--line); text-align: left; }
th { font-weight: 600; } td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.tok { font-family: ui-monospace, "DejaVu Sans Mono", monospace; white-space: pre; border-radius: 2px; padding: 0 1px; }
.ctx { line-height: 1.9; margin: 2px 0; padding: 2px 4px; border-left: 3px solid var(--line); }
.ctx .max { font-weight: 700; outline: 1px solid #c05621; }
.panel { border: 1px solid var(--line); border-radius: 6px; padding: 8px 12px; margin: 8px 0; }
.grid2 { display: grid; grid-template-columns: 1fr 1fr; gap: 10px; }
#page-errors { color: #c53030; white-space: pre-wrap; }
#page-errors:empty { display: none; }
"""

    /// Records script errors in `#page-errors` (so a headless check sees them in the DOM) as well as the console.
    let private errorCatcher = """
window.__pageErrors = [];
function __recordError(msg) { window.__pageErrors.push(String(msg));
  var e = document.getElementById('page-errors'); if (e) e.textContent = window.__pageErrors.join('\n'); }
window.addEventListener('error', function (ev) { __recordError('error: ' + ev.message + ' (' + (ev.filename || '') + ':' + (ev.lineno || 0) + ')'); });
window.addEventListener('unhandledrejection', function (ev) { __recordError('unhandled rejection: ' + ev.reason); });
(function () { var orig = console.error; console.error = function () { __recordError('console.error: ' + Array.prototype.join.call(arguments, ' ')); orig.apply(console, arguments); }; })();
document.addEventListener('DOMContentLoaded', function () { var e = document.getElementById('page-errors'); if (e && window.__pageErrors.length) e.textContent = window.__pageErrors.join('\n'); });
function pageData() { var e = document.getElementById('page-data'); return e ? JSON.parse(e.textContent) : null; }
function markDrawn(what) { document.body.setAttribute('data-drawn', (document.body.getAttribute('data-drawn') || '') + what + ' '); }
"""

    /// The whole page as one HTML string.
    let render (spec: PageSpec) : string =
        let sb = StringBuilder()
        let add (s: string) = sb.Append s |> ignore
        add "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        add "<meta name=\"generator\" content=\"Transcoders (views)\">\n"
        add (sprintf "<title>%s</title>\n<style>%s%s</style>\n" (escape spec.Title) baseCss spec.Css)
        add "<script>"; add errorCatcher; add "</script>\n"
        // libraries in the head, so inline scripts in the body (XPlot's charts) can use them as they load
        for a in List.distinct spec.Assets do
            let code, licence = asset a
            add (sprintf "<!-- %s, vendored and inlined. Licence:\n%s\n-->\n" (assetName a) (licence.Replace("--", "- -")))
            add "<script>"; add (code.Replace("</script", "<\\/script")); add "</script>\n"
        add "</head>\n<body>\n<pre id=\"page-errors\"></pre>\n"
        add spec.Body
        add "\n"
        match spec.Data with
        | Some d -> add "<script id=\"page-data\" type=\"application/json\">"; add (json d); add "</script>\n"
        | None -> ()
        add "<script>\n"; add spec.Script; add "\n</script>\n</body>\n</html>\n"
        sb.ToString()

    /// Writes the page to `path` (atomically) and its data, when it has any, to the same name with `.json`
    /// (indented, for other tools). Returns the page's full path.
    let write (path: string) (spec: PageSpec) : string =
        let full = Path.GetFullPath path
        match Path.GetDirectoryName full with
        | null | "" -> ()
        | d -> Directory.CreateDirectory d |> ignore
        AtomicFile.writeAllText full (render spec)
        match spec.Data with
        | Some d ->
            let o = JsonSerializerOptions(WriteIndented = true)
            AtomicFile.writeAllText (Path.ChangeExtension(full, ".json")) (d.ToJsonString o)
        | None -> ()
        full

    // ---- JSON helpers shared by the page kinds ----

    /// A finite number as JSON (null for NaN and infinities).
    let num (v: float) : JsonNode = if Double.IsFinite v then JsonValue.Create v :> JsonNode else null

    /// A number rounded to `digits` significant digits (keeps embedded data small).
    let round (digits: int) (v: float) : JsonNode =
        if not (Double.IsFinite v) then null
        elif v = 0.0 then JsonValue.Create 0.0 :> JsonNode
        else
            let scale = Math.Pow(10.0, float (digits - 1 - int (Math.Floor(Math.Log10(abs v)))))
            let r = if scale > 1e300 || scale < 1e-300 then v else Math.Round(v * scale) / scale
            JsonValue.Create r :> JsonNode

    let str (s: string) : JsonNode = JsonValue.Create(if isNull s then "" else s) :> JsonNode
    let int (i: int) : JsonNode = JsonValue.Create i :> JsonNode
    let int64 (i: int64) : JsonNode = JsonValue.Create i :> JsonNode
    let bool (b: bool) : JsonNode = JsonValue.Create b :> JsonNode
    let arr (xs: JsonNode seq) : JsonNode = JsonArray(Array.ofSeq xs) :> JsonNode
    let obj (props: (string * JsonNode) seq) : JsonNode =
        let o = JsonObject()
        for k, v in props do o[k] <- v
        o :> JsonNode
