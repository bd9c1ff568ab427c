/// tinymodel's compact vocabulary: the K−4 most frequent tokens of a base tokenizer (by descending corpus
/// frequency, ties broken by ascending base id), then `[BEGIN]`, `[END]`, `[PAD]`, `[UNK]` as ids K−4..K−1.
/// Every base token outside the kept set maps to `[UNK]`. A smaller vocabulary makes the embedding and
/// unembedding small, which suits tiny models (tinymodel keeps 10,000 of GPT-Neo's 50,257 ids).
///
/// Saved as self-describing JSON:
/// `{"kind":"compact","version":1,"base":"gpt2","base_vocab_size":50257,"size":K,"base_ids":[...],
///   "specials":{"[BEGIN]":K-4,"[END]":K-3,"[PAD]":K-2,"[UNK]":K-1}}`.
module Transcoders.Text.CompactVocab

open System
open System.IO
open System.Text.Json
open System.Text.Json.Nodes

/// Names of the four specials, in id order after the kept tokens.
let SpecialNames = [| "[BEGIN]"; "[END]"; "[PAD]"; "[UNK]" |]

/// A compact vocabulary over a base tokenizer's ids.
type CompactVocab =
    { /// Name of the base tokenizer ("gpt2").
      Base: string
      /// Number of base ids.
      BaseVocabSize: int
      /// Compact id i (for i < Size−4) is base id `BaseIds[i]`.
      BaseIds: int[]
      /// Base id → compact id (`Unk` for tokens not kept); length `BaseVocabSize`.
      ToCompact: int[] }
    /// K: kept tokens plus the four specials.
    member v.Size = v.BaseIds.Length + 4
    member v.Begin = v.BaseIds.Length
    member v.End = v.BaseIds.Length + 1
    member v.Pad = v.BaseIds.Length + 2
    member v.Unk = v.BaseIds.Length + 3
    /// Whether `id` is one of the four specials.
    member v.IsSpecial(id: int) = id >= v.BaseIds.Length && id < v.Size

/// A clear error naming the file (or "<json>") and the field at fault.
exception CompactVocabError of source: string * field: string * problem: string with
    override this.Message = sprintf "%s: compact vocabulary field '%s': %s" this.source this.field this.problem

/// Builds the vocabulary from kept base ids (compact id order), checking ranges and duplicates.
let ofBaseIds (baseName: string) (baseVocabSize: int) (baseIds: int[]) : CompactVocab =
    let fail field problem = raise (CompactVocabError("<arguments>", field, problem))
    if String.IsNullOrWhiteSpace baseName then fail "base" "empty name"
    if baseVocabSize <= 0 then fail "base_vocab_size" (sprintf "%d is not positive" baseVocabSize)
    if baseIds.Length > baseVocabSize then fail "base_ids" (sprintf "%d ids for a base of %d" baseIds.Length baseVocabSize)
    let unk = baseIds.Length + 3
    let toCompact = Array.create baseVocabSize unk
    baseIds |> Array.iteri (fun i b ->
        if b < 0 || b >= baseVocabSize then fail "base_ids" (sprintf "entry %d is %d, outside 0..%d" i b (baseVocabSize - 1))
        if toCompact[b] <> unk then fail "base_ids" (sprintf "base id %d appears twice (entries %d and %d)" b toCompact[b] i)
        toCompact[b] <- i)
    { Base = baseName; BaseVocabSize = baseVocabSize; BaseIds = Array.copy baseIds; ToCompact = toCompact }

/// Counts of every base id over tokenized documents.
let countTokens (baseVocabSize: int) (docs: seq<int[]>) : int64[] =
    let counts = Array.zeroCreate<int64> baseVocabSize
    for d in docs do
        for id in d do
            if id < 0 || id >= baseVocabSize then invalidArg "docs" (sprintf "token id %d is outside 0..%d" id (baseVocabSize - 1))
            counts[id] <- counts[id] + 1L
    counts

/// The K−4 base ids to keep: descending count, ties (including the unseen, count 0) by ascending base id;
/// ids in `excluded` (e.g. the base's `<|endoftext|>`) are never kept, as in tinymodel.
let selectTop (k: int) (excluded: int seq) (counts: int64[]) : int[] =
    let ex = set excluded
    let keep = k - 4
    if k < 5 then invalidArg "k" (sprintf "a compact vocabulary needs K >= 5 (4 specials + at least one token), got %d" k)
    let candidates = [| for id in 0 .. counts.Length - 1 do if not (ex.Contains id) then yield id |]
    if keep > candidates.Length then
        invalidArg "k" (sprintf "K = %d keeps %d tokens but the base has only %d eligible ids" k keep candidates.Length)
    candidates
    |> Array.sortWith (fun a b -> let c = compare counts[b] counts[a] in if c <> 0 then c else compare a b)
    |> Array.truncate keep

/// Builds a K-id vocabulary from base-id counts.
let ofCounts (baseName: string) (k: int) (excluded: int seq) (counts: int64[]) : CompactVocab =
    ofBaseIds baseName counts.Length (selectTop k excluded counts)

/// Base ids → compact ids (unknown tokens → `[UNK]`).
let toCompact (v: CompactVocab) (baseIds: int[]) : int[] =
    baseIds |> Array.map (fun b ->
        if b < 0 || b >= v.BaseVocabSize then invalidArg "baseIds" (sprintf "base id %d is outside 0..%d" b (v.BaseVocabSize - 1))
        v.ToCompact[b])

/// Compact ids → base ids. Specials have no base id: asking for one is an error (see `decodeWith`).
let toBase (v: CompactVocab) (ids: int[]) : int[] =
    ids |> Array.map (fun i ->
        if i < 0 || i >= v.Size then invalidArg "ids" (sprintf "compact id %d is outside 0..%d" i (v.Size - 1))
        if i >= v.BaseIds.Length then invalidArg "ids" (sprintf "compact id %d is the special %s, which has no base id" i SpecialNames[i - v.BaseIds.Length])
        v.BaseIds[i])

/// The name of a special id, or None.
let specialName (v: CompactVocab) (id: int) = if v.IsSpecial id then Some SpecialNames[id - v.BaseIds.Length] else None

/// A document: `[BEGIN]`, its tokens mapped to compact ids, and `[END]` when `addEnd`.
let encodeDocument (v: CompactVocab) (addEnd: bool) (baseIds: int[]) : int[] =
    [| yield v.Begin
       yield! toCompact v baseIds
       if addEnd then yield v.End |]

/// Decodes compact ids through `decodeBase` (the base tokenizer's decode); each special shows as its name
/// (`[BEGIN]`...) unless `skipSpecials`. Runs of ordinary ids are decoded together so multi-byte characters survive.
let decodeWith (decodeBase: int[] -> string) (skipSpecials: bool) (v: CompactVocab) (ids: int[]) : string =
    let sb = Text.StringBuilder()
    let run = ResizeArray<int>()
    let flush () =
        if run.Count > 0 then
            sb.Append(decodeBase (run.ToArray())) |> ignore
            run.Clear()
    for i in ids do
        if i < 0 || i >= v.Size then invalidArg "ids" (sprintf "compact id %d is outside 0..%d" i (v.Size - 1))
        if v.IsSpecial i then
            flush ()
            if not skipSpecials then sb.Append(SpecialNames[i - v.BaseIds.Length]) |> ignore
        else run.Add v.BaseIds[i]
    flush ()
    sb.ToString()

/// Fraction of corpus tokens (given as base-id counts) that the vocabulary keeps (that do not become `[UNK]`).
let coverageOfCounts (v: CompactVocab) (counts: int64[]) : float =
    if counts.Length <> v.BaseVocabSize then invalidArg "counts" (sprintf "%d counts for a base of %d ids" counts.Length v.BaseVocabSize)
    let total = Array.sum counts
    if total = 0L then nan
    else
        let kept = v.BaseIds |> Array.sumBy (fun b -> counts[b])
        float kept / float total

/// Fraction of compact tokens that are not `[UNK]`, over ordinary tokens and `[UNK]` only (other specials are
/// not corpus tokens and are ignored). NaN for no tokens.
let coverage (v: CompactVocab) (ids: int seq) : float =
    let mutable unk = 0L
    let mutable total = 0L
    for i in ids do
        if i = v.Unk then
            unk <- unk + 1L
            total <- total + 1L
        elif not (v.IsSpecial i) then
            total <- total + 1L
    if total = 0L then nan else float (total - unk) / float total

// ---------------------------------------------------------------------------------------------- JSON

/// The JSON object of a vocabulary (see the module comment for its shape).
let toJson (v: CompactVocab) : JsonObject =
    let specials = JsonObject()
    SpecialNames |> Array.iteri (fun i n -> specials[n] <- JsonValue.Create(v.BaseIds.Length + i))
    let ids = JsonArray()
    for b in v.BaseIds do ids.Add(JsonValue.Create b)
    JsonObject(
        [ Collections.Generic.KeyValuePair("kind", JsonValue.Create "compact" :> JsonNode)
          Collections.Generic.KeyValuePair("version", JsonValue.Create 1)
          Collections.Generic.KeyValuePair("base", JsonValue.Create v.Base)
          Collections.Generic.KeyValuePair("base_vocab_size", JsonValue.Create v.BaseVocabSize)
          Collections.Generic.KeyValuePair("size", JsonValue.Create v.Size)
          Collections.Generic.KeyValuePair("base_ids", ids)
          Collections.Generic.KeyValuePair("specials", specials) ])

let private getInt (source: string) (field: string) (e: JsonElement) =
    match e.ValueKind with
    | JsonValueKind.Number ->
        match e.TryGetInt32() with
        | true, i -> i
        | _ -> raise (CompactVocabError(source, field, sprintf "%s is not a 32-bit integer" (e.GetRawText())))
    | k -> raise (CompactVocabError(source, field, sprintf "expected an integer, found %O" k))

let private prop (source: string) (o: JsonElement) (name: string) =
    match o.TryGetProperty name with
    | true, p -> p
    | _ -> raise (CompactVocabError(source, name, "missing"))

/// Reads and validates a vocabulary from a parsed JSON element; `source` names the file in errors.
let ofJsonElement (source: string) (root: JsonElement) : CompactVocab =
    let fail field problem = raise (CompactVocabError(source, field, problem))
    if root.ValueKind <> JsonValueKind.Object then fail "(root)" (sprintf "expected a JSON object, found %O" root.ValueKind)
    let kind = prop source root "kind"
    if kind.ValueKind <> JsonValueKind.String || kind.GetString() <> "compact" then
        fail "kind" (sprintf "expected \"compact\", found %s" (kind.GetRawText()))
    match root.TryGetProperty "version" with
    | true, ver ->
        let n = getInt source "version" ver
        if n <> 1 then fail "version" (sprintf "version %d is not supported (this library reads version 1)" n)
    | _ -> ()
    let baseE = prop source root "base"
    if baseE.ValueKind <> JsonValueKind.String then fail "base" (sprintf "expected a string, found %O" baseE.ValueKind)
    let baseVocabSize = getInt source "base_vocab_size" (prop source root "base_vocab_size")
    if baseVocabSize <= 0 then fail "base_vocab_size" (sprintf "%d is not positive" baseVocabSize)
    let size = getInt source "size" (prop source root "size")
    let idsE = prop source root "base_ids"
    if idsE.ValueKind <> JsonValueKind.Array then fail "base_ids" (sprintf "expected an array, found %O" idsE.ValueKind)
    let ids = [| for i, e in Seq.indexed (idsE.EnumerateArray()) -> getInt source (sprintf "base_ids[%d]" i) e |]
    if size <> ids.Length + 4 then fail "size" (sprintf "%d, but base_ids holds %d ids (+4 specials = %d)" size ids.Length (ids.Length + 4))
    let specials = prop source root "specials"
    if specials.ValueKind <> JsonValueKind.Object then fail "specials" (sprintf "expected an object, found %O" specials.ValueKind)
    let names = [ for p in specials.EnumerateObject() -> p.Name ]
    for n in names do
        if not (Array.contains n SpecialNames) then fail "specials" (sprintf "unknown special %A (expected %s)" n (String.Join(", ", SpecialNames)))
    SpecialNames |> Array.iteri (fun i n ->
        let id = getInt source (sprintf "specials.%s" n) (prop source specials n)
        if id <> ids.Length + i then fail (sprintf "specials.%s" n) (sprintf "is %d, expected %d (specials are the last four ids)" id (ids.Length + i)))
    try ofBaseIds (baseE.GetString()) baseVocabSize ids
    with CompactVocabError(_, field, problem) -> fail field problem

/// Parses and validates JSON text; `source` names the file in errors.
let ofJsonText (source: string) (json: string) : CompactVocab =
    let doc =
        try JsonDocument.Parse json
        with :? JsonException as e -> raise (CompactVocabError(source, "(root)", sprintf "not valid JSON: %s" e.Message))
    use doc = doc
    ofJsonElement source doc.RootElement

/// Writes the vocabulary as JSON, atomically.
let save (path: string) (v: CompactVocab) =
    Transcoders.Files.AtomicFile.writeAllText path (toJson(v).ToJsonString(JsonSerializerOptions(Encoder = Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping)))

/// Reads and validates a vocabulary file.
let load (path: string) : CompactVocab =
    if not (File.Exists path) then raise (FileNotFoundException(sprintf "compact vocabulary file not found: %s" path, path))
    ofJsonText path (File.ReadAllText path)
