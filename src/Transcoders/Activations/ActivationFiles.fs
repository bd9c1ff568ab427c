namespace Transcoders.Activations

open System
open System.Text.Json

/// A clear error about one of this area's files (cache manifest or shard, buffer state), naming the file.
exception ActivationFileError of path: string * problem: string with
    override this.Message = sprintf "%s: %s" this.path this.problem

/// Strict reading of the small JSON documents this area writes: every field is required, has the right
/// kind, and an error names the file and the field.
module internal JsonFields =
    let fail (path: string) (problem: string) : 'a = raise (ActivationFileError(path, problem))

    let private kind (path: string) (where: string) (name: string) (expected: JsonValueKind) (o: JsonElement) : JsonElement =
        if o.ValueKind <> JsonValueKind.Object then fail path (sprintf "%s is not a JSON object" where)
        match o.TryGetProperty name with
        | true, v when v.ValueKind = expected -> v
        | true, v -> fail path (sprintf "%s field '%s' is %s, expected a %A" where name (v.GetRawText()) expected)
        | _ -> fail path (sprintf "%s has no field '%s'" where name)

    let text (path: string) (where: string) (name: string) (o: JsonElement) = (kind path where name JsonValueKind.String o).GetString()
    let obj path where name o = kind path where name JsonValueKind.Object o
    let items path where name o = [ for x in (kind path where name JsonValueKind.Array o).EnumerateArray() -> x ]

    let integer path where name o =
        match (kind path where name JsonValueKind.Number o).TryGetInt64() with
        | true, n -> n
        | _ -> fail path (sprintf "%s field '%s' is not an integer" where name)

    let natural path where name o =
        let n = integer path where name o
        if n < 0L then fail path (sprintf "%s field '%s' is negative (%d)" where name n)
        n

    let number path where name o = (kind path where name JsonValueKind.Number o).GetDouble()

    let boolean (path: string) (where: string) (name: string) (o: JsonElement) =
        match o.TryGetProperty name with
        | true, v when v.ValueKind = JsonValueKind.True -> true
        | true, v when v.ValueKind = JsonValueKind.False -> false
        | true, v -> fail path (sprintf "%s field '%s' is %s, expected true or false" where name (v.GetRawText()))
        | _ -> fail path (sprintf "%s has no field '%s'" where name)

    /// Parses `text` as a JSON object, failing with the file's name.
    let parse (path: string) (text: string) =
        let doc =
            try JsonDocument.Parse text
            with :? JsonException as e -> fail path (sprintf "not valid JSON: %s" e.Message)
        if doc.RootElement.ValueKind <> JsonValueKind.Object then
            doc.Dispose()
            fail path "not a JSON object"
        doc

    let writePosition (w: Utf8JsonWriter) (name: string) (p: Position) =
        w.WriteStartObject name
        w.WriteNumber("epoch", p.Epoch)
        w.WriteNumber("chunk", p.Chunk)
        w.WriteNumber("row", p.Row)
        w.WriteEndObject()

    let position path where name o =
        let p = obj path where name o
        let inner = sprintf "%s's %s" where name
        { Epoch = natural path inner "epoch" p; Chunk = natural path inner "chunk" p; Row = natural path inner "row" p }

    /// Runs `write` on a JSON writer and returns the indented UTF-8 text.
    let render (write: Utf8JsonWriter -> unit) =
        use stream = new IO.MemoryStream()
        do
            let options = JsonWriterOptions(Indented = true, Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping)
            use w = new Utf8JsonWriter(stream, options)
            write w
        Text.Encoding.UTF8.GetString(stream.ToArray())
