/// A byte-level BPE read from a Hugging Face `tokenizer.json` (GPT-NeoX / Pythia's, and other GPT-2-style exports):
/// model "BPE" with a vocabulary spelled in GPT-2's byte alphabet and its merges, a "ByteLevel" pre-tokenizer (GPT-2's
/// split regex, no prefix space), an optional "NFC" normalizer, and added tokens.
///
/// Encoding follows Hugging Face's, with one convention of this library: text is NFC-normalised when the file asks,
/// the non-special added tokens (GPT-NeoX's runs of 2–24 spaces) are split out first (leftmost, longest) and get
/// their own ids, and the rest is BPE-encoded. Special added tokens (`<|endoftext|>`, `<|padding|>`) stay ordinary
/// text, as `Gpt2Tokenizer.encode` treats `<|endoftext|>`: only `Tokenizer.encodeDocument` emits them.
module Transcoders.Text.ByteLevelBpe

open System
open System.Collections.Generic
open System.IO
open System.Text
open System.Text.Json
open System.Text.RegularExpressions
open Microsoft.ML.Tokenizers

/// A tokenizer.json that this reader cannot use, and why (naming the field).
exception TokenizerFileError of path: string * problem: string with
    override this.Message = sprintf "%s: %s" this.path this.problem

/// A loaded byte-level BPE. Thread-safe (the BPE cache inside is locked).
[<Sealed>]
type ByteLevelBpe internal (bpe: BpeTokenizer, tokenBytes: byte[][], added: Regex option, addedIds: IReadOnlyDictionary<string, int>,
                            specials: IReadOnlyDictionary<string, int>, normalize: bool, json: JsonElement, source: string) =
    member _.Bpe = bpe
    /// Number of ids (one more than the largest).
    member _.VocabSize = tokenBytes.Length
    /// Where it was read from.
    member _.Source = source
    /// The tokenizer.json itself (what `Tokenizer.toJson` stores).
    member _.Json = json
    /// Special added tokens by content (`<|endoftext|>` → 0 for GPT-NeoX).
    member _.Specials = specials
    member internal _.TokenBytes = tokenBytes
    member internal _.Added = added
    member internal _.AddedIds = addedIds
    member internal _.Normalize = normalize
    override _.ToString() = sprintf "byte-level BPE (%d ids, from %s)" tokenBytes.Length source

let private fail path problem : 'a = raise (TokenizerFileError(path, problem))

let private int32 (e: JsonElement) =
    if e.ValueKind <> JsonValueKind.Number then None
    else match e.TryGetInt32() with | true, v -> Some v | _ -> None

let private str (e: JsonElement) (name: string) =
    match e.TryGetProperty name with
    | true, v when v.ValueKind = JsonValueKind.String -> Some (v.GetString())
    | _ -> None

/// Reads a parsed tokenizer.json; `path` names it in errors.
let ofJsonElement (path: string) (root: JsonElement) : ByteLevelBpe =
    if root.ValueKind <> JsonValueKind.Object then fail path "not a JSON object"
    let model =
        match root.TryGetProperty "model" with
        | true, m when m.ValueKind = JsonValueKind.Object -> m
        | _ -> fail path "field 'model' is missing"
    match str model "type" with
    | Some "BPE" | None -> ()
    | Some t -> fail path (sprintf "field 'model.type' is '%s'; only byte-level BPE tokenizers are supported" t)
    let preTokenizer =
        match root.TryGetProperty "pre_tokenizer" with
        | true, p when p.ValueKind = JsonValueKind.Object -> p
        | _ -> fail path "field 'pre_tokenizer' is missing: a byte-level BPE needs a ByteLevel pre-tokenizer"
    if str preTokenizer "type" <> Some "ByteLevel" then
        fail path (sprintf "field 'pre_tokenizer.type' is %s; only 'ByteLevel' is supported" (defaultArg (str preTokenizer "type") "missing"))
    let flag (e: JsonElement) name fallback =
        match e.TryGetProperty(name: string) with
        | true, v when v.ValueKind = JsonValueKind.True -> true
        | true, v when v.ValueKind = JsonValueKind.False -> false
        | _ -> fallback
    if flag preTokenizer "add_prefix_space" false then fail path "field 'pre_tokenizer.add_prefix_space' is true, which this reader does not support"
    if not (flag preTokenizer "use_regex" true) then fail path "field 'pre_tokenizer.use_regex' is false, which this reader does not support"
    let normalize =
        match root.TryGetProperty "normalizer" with
        | true, n when n.ValueKind = JsonValueKind.Null -> false
        | true, n when n.ValueKind = JsonValueKind.Object && str n "type" = Some "NFC" -> true
        | true, n -> fail path (sprintf "field 'normalizer' is %s; only null or NFC are supported" (n.GetRawText()))
        | _ -> false
    let vocab = Dictionary<string, int>()
    match model.TryGetProperty "vocab" with
    | true, v when v.ValueKind = JsonValueKind.Object ->
        for p in v.EnumerateObject() do
            match int32 p.Value with
            | Some id when id >= 0 -> vocab[p.Name] <- id
            | _ -> fail path (sprintf "field 'model.vocab': token %A has id %s, not a non-negative integer" p.Name (p.Value.GetRawText()))
    | _ -> fail path "field 'model.vocab' is missing or not an object"
    // every byte valid UTF-8 can hold needs a token of its own (GPT-NeoX's vocabulary lacks C0, C1 and F5..FF)
    for b in 0 .. 255 do
        if not (b = 0xC0 || b = 0xC1 || b >= 0xF5) && not (vocab.ContainsKey(string Gpt2Tokenizer.byteToChar[b])) then
            fail path (sprintf "field 'model.vocab' lacks the single-byte token for byte %d (%A): not a byte-level vocabulary" b (string Gpt2Tokenizer.byteToChar[b]))
    let added =
        match root.TryGetProperty "added_tokens" with
        | true, a when a.ValueKind = JsonValueKind.Array ->
            [ for t in a.EnumerateArray() ->
                let id = match t.TryGetProperty "id" with | true, i -> int32 i | _ -> None
                match str t "content", id with
                | Some content, Some id when id >= 0 && content <> "" -> content, id, flag t "special" false
                | _ -> fail path (sprintf "field 'added_tokens': entry %s needs a non-empty content and an id" (t.GetRawText())) ]
        | _ -> []
    let size = 1 + max (if vocab.Count = 0 then -1 else Seq.max vocab.Values) (added |> List.fold (fun m (_, id, _) -> max m id) -1)
    let tokenBytes = Array.zeroCreate<byte[]> size
    for KeyValue(token, id) in vocab do
        if not (isNull tokenBytes[id]) then fail path (sprintf "field 'model.vocab': id %d is used twice" id)
        tokenBytes[id] <-
            token.ToCharArray() |> Array.map (fun c ->
                match Gpt2Tokenizer.charToByte.TryGetValue c with
                | true, b -> b
                | _ -> fail path (sprintf "field 'model.vocab': token %A (id %d) has the character U+%04X outside the byte-level alphabet" token id (int c)))
    for content, id, _ in added do
        match vocab.TryGetValue content with
        | true, v when v <> id -> fail path (sprintf "added token %A has id %d but the vocabulary gives it %d" content id v)
        | _ -> ()
        if isNull tokenBytes[id] then tokenBytes[id] <- Encoding.UTF8.GetBytes content
        elif not (vocab.ContainsKey content) then fail path (sprintf "added token %A has id %d, which the vocabulary already uses" content id)
    match Array.tryFindIndex isNull tokenBytes with
    | Some id -> fail path (sprintf "id %d is neither in 'model.vocab' nor in 'added_tokens' (ids must run 0..%d without gaps)" id (size - 1))
    | None -> ()
    let merges =
        match model.TryGetProperty "merges" with
        | true, m when m.ValueKind = JsonValueKind.Array ->
            [| for i, e in Seq.indexed (m.EnumerateArray()) ->
                 let pair =
                     match e.ValueKind with
                     | JsonValueKind.String -> e.GetString().Split(' ')
                     | JsonValueKind.Array -> [| for x in e.EnumerateArray() -> (if x.ValueKind = JsonValueKind.String then x.GetString() else null) |]
                     | _ -> [||]
                 if pair.Length <> 2 || Array.exists isNull pair then fail path (sprintf "field 'model.merges': entry %d is not a pair of tokens: %s" i (e.GetRawText()))
                 for part in pair do
                     if not (vocab.ContainsKey part) then
                         fail path (sprintf "field 'model.merges': entry %d merges %A, which is not in 'model.vocab'" i part)
                 if not (vocab.ContainsKey(pair[0] + pair[1])) then
                     fail path (sprintf "field 'model.merges': entry %d merges into %A, which is not in 'model.vocab'" i (pair[0] + pair[1]))
                 pair[0] + " " + pair[1] |]
        | _ -> fail path "field 'model.merges' is missing or not an array"
    let pre = RegexPreTokenizer(Gpt2Tokenizer.preTokenizerRegex.Force(), null)
    let bpe =
        try BpeTokenizer.Create(BpeOptions(vocab, Merges = merges, ByteLevel = true, PreTokenizer = pre))
        with :? InvalidOperationException | :? ArgumentException as e -> fail path (sprintf "not a usable BPE: %s" e.Message)
    let plainAdded = added |> List.filter (fun (_, _, special) -> not special)
    let addedRegex =
        if plainAdded.IsEmpty then None
        else
            // longest first, so the alternation picks the longest token at the leftmost position
            let alternatives = plainAdded |> List.map (fun (c, _, _) -> c) |> List.distinct |> List.sortByDescending String.length |> List.map Regex.Escape
            Some (Regex(String.Join("|", alternatives), RegexOptions.CultureInvariant))
    let addedIds = plainAdded |> List.map (fun (c, id, _) -> KeyValuePair(c, id)) |> Dictionary :> IReadOnlyDictionary<_, _>
    let specials = added |> List.filter (fun (_, _, s) -> s) |> List.map (fun (c, id, _) -> KeyValuePair(c, id)) |> Dictionary :> IReadOnlyDictionary<_, _>
    ByteLevelBpe(bpe, tokenBytes, addedRegex, addedIds, specials, normalize, root.Clone(), path)

/// Reads a tokenizer.json file.
let load (path: string) : ByteLevelBpe =
    if not (File.Exists path) then raise (FileNotFoundException(sprintf "tokenizer file not found: %s" path, path))
    let doc =
        try JsonDocument.Parse(File.ReadAllText path)
        with :? JsonException as e -> fail path (sprintf "not valid JSON: %s" e.Message)
    use doc = doc
    ofJsonElement path doc.RootElement

/// Token ids of `text` (see the module's notes on normalisation and added tokens).
let encode (t: ByteLevelBpe) (text: string) : int[] =
    if String.IsNullOrEmpty text then [||]
    else
        let text = Gpt2Tokenizer.replaceLoneSurrogates text
        let text = if t.Normalize then text.Normalize NormalizationForm.FormC else text
        let bpe (s: string) = if s = "" then Seq.empty else t.Bpe.EncodeToIds s :> seq<int>
        match t.Added with
        | None -> bpe text |> Seq.toArray
        | Some r ->
            let out = ResizeArray<int>()
            let mutable start = 0
            for m in r.Matches text do
                out.AddRange(bpe (text.Substring(start, m.Index - start)))
                out.Add t.AddedIds[m.Value]
                start <- m.Index + m.Length
            out.AddRange(bpe (text.Substring start))
            out.ToArray()

let private checkIds (t: ByteLevelBpe) (ids: int seq) =
    for id in ids do
        if id < 0 || id >= t.VocabSize then invalidArg "ids" (sprintf "token id %d is outside 0..%d (%s)" id (t.VocabSize - 1) t.Source)

/// The raw bytes of token `id`.
let tokenBytes (t: ByteLevelBpe) (id: int) : byte[] =
    checkIds t [ id ]
    Array.copy t.TokenBytes[id]

/// The text of `ids`; bytes that do not form valid UTF-8 become U+FFFD. Ids at or beyond `VocabSize` decode to
/// nothing, as in Hugging Face: a model's vocabulary is often padded beyond its tokenizer's (Pythia: 50,304 rows
/// for 50,277 ids), and sampling or a de-embedding can reach those rows. Negative ids are an error.
let decode (t: ByteLevelBpe) (ids: int[]) : string =
    checkIds t (ids |> Seq.filter (fun id -> id < t.VocabSize))
    let out = ResizeArray<byte>(ids.Length * 4)
    for id in ids do
        if id < t.VocabSize then out.AddRange t.TokenBytes[id]
    Encoding.UTF8.GetString(out.ToArray())

/// The text of one token, for display ("" for a padding id beyond the tokenizer, as `decode`).
let tokenText (t: ByteLevelBpe) (id: int) : string = decode t [| id |]
