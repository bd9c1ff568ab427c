/// llama2.c's SentencePiece tokenizer (`tokenizer.bin`, `tok512.bin`), encoding and decoding exactly like
/// karpathy/llama2.c `run.c`.
///
/// File format (little-endian): int32 `max_token_length`, then for each of `vocab_size` pieces (the count
/// comes from the model header, not the file) a float32 merge score, an int32 byte length and that many UTF-8
/// bytes. Ids: 0 `<unk>`, 1 BOS, 2 EOS, 3..258 the byte pieces `<0x00>`..`<0xFF>`, then merged pieces (with
/// SentencePiece's "▁" already turned into a space).
///
/// Encoding (run.c `encode`): prepend a dummy space (non-empty text only), look each UTF-8 character up as a
/// piece, falling back to its bytes (id = byte + 3), then repeatedly merge the adjacent pair whose
/// concatenation is a piece with the highest score (the leftmost pair on ties; scores must exceed −1e10, as
/// in run.c). run.c rescans all pairs after each merge (quadratic); here a priority queue with the same
/// order (score descending, then position) gives the same result in O(n log n). Differences from run.c,
/// both outside what C can express: a NUL character is encoded (as `<0x00>`) instead of ending the text, and
/// a lone UTF-16 surrogate is read as U+FFFD.
module Transcoders.Text.Llama2cTokenizer

open System
open System.Collections.Generic
open System.IO
open System.Text
open System.Text.Json
open System.Text.Json.Nodes

[<Literal>]
let Unk = 0

[<Literal>]
let Bos = 1

[<Literal>]
let Eos = 2

/// First byte-fallback id: byte b is id b + 3.
[<Literal>]
let ByteOffset = 3

/// A clear error naming the file (or "<json>") and what is wrong.
exception Llama2cTokenizerError of source: string * problem: string with
    override this.Message = sprintf "%s: %s" this.source this.problem

/// A loaded llama2.c vocabulary: pieces, merge scores and the header's `max_token_length`.
[<Sealed>]
type Llama2cVocab internal (pieces: string[], scores: float32[], maxTokenLength: int, source: string) =
    let lookup =
        let d = Dictionary<string, int>(pieces.Length, StringComparer.Ordinal)
        // Duplicated pieces (none in llama2.c's files) resolve to the lowest id.
        pieces |> Array.iteri (fun i p -> d.TryAdd(p, i) |> ignore)
        d
    let byteValue =
        pieces |> Array.map (fun p ->
            if p.Length = 6 && p.StartsWith "<0x" && p.EndsWith ">" then
                match Byte.TryParse(p.AsSpan(3, 2), Globalization.NumberStyles.AllowHexSpecifier, Globalization.CultureInfo.InvariantCulture) with
                | true, b -> int b
                | _ -> -1
            else -1)
    let pieceBytes = pieces |> Array.map (fun p -> Encoding.UTF8.GetBytes p)
    // (left id, right id) → id of the concatenated piece, or −1; filled on demand.
    let pairs = Collections.Concurrent.ConcurrentDictionary<int64, int>()
    let pairId (a: int) (b: int) =
        let key = (int64 a <<< 32) ||| int64 (uint32 b)
        match pairs.TryGetValue key with
        | true, id -> id
        | _ ->
            let id = match lookup.TryGetValue(pieces[a] + pieces[b]) with | true, id -> id | _ -> -1
            pairs[key] <- id
            id
    member _.Pieces = pieces
    member _.Scores = scores
    member _.MaxTokenLength = maxTokenLength
    member _.VocabSize = pieces.Length
    /// Where the vocabulary came from (a file path, or the JSON it was embedded in).
    member _.Source = source
    member internal _.Lookup = lookup
    /// The raw byte a `<0xHH>` piece stands for, or −1.
    member internal _.ByteValue = byteValue
    member internal _.PieceBytes = pieceBytes
    /// Ids of the one-character pieces, by code point (ASCII and Latin-1 precomputed; others looked up).
    member val internal RuneIds =
        let d = Collections.Concurrent.ConcurrentDictionary<int, int>()
        for c in 0 .. 255 do
            d[c] <- match lookup.TryGetValue(string (char c)) with | true, id -> id | _ -> -1
        d
    /// The id of the piece spelled by pieces `a` then `b`, or −1.
    member internal _.PairId(a, b) = pairId a b
    override _.ToString() = sprintf "llama2.c SentencePiece (%d pieces, from %s)" pieces.Length source

let private strictUtf8 = UTF8Encoding(false, true)

/// Builds a vocabulary from pieces and scores, validating llama2.c's fixed layout (ids 0..258).
let create (source: string) (pieces: string[]) (scores: float32[]) (maxTokenLength: int) : Llama2cVocab =
    let fail p = raise (Llama2cTokenizerError(source, p))
    if pieces.Length <> scores.Length then fail (sprintf "%d pieces but %d scores" pieces.Length scores.Length)
    if pieces.Length < 259 then fail (sprintf "vocabulary size %d is below 259 (<unk>, BOS, EOS and 256 byte pieces)" pieces.Length)
    if maxTokenLength <= 0 then fail (sprintf "max_token_length %d is not positive" maxTokenLength)
    for b in 0 .. 255 do
        let expected = sprintf "<0x%02X>" b
        if pieces[b + ByteOffset] <> expected then fail (sprintf "piece %d is %A, expected the byte piece %s" (b + ByteOffset) pieces[b + ByteOffset] expected)
    pieces |> Array.iteri (fun i p ->
        if isNull p then fail (sprintf "piece %d is missing" i)
        let n = Encoding.UTF8.GetByteCount p
        if n > maxTokenLength then fail (sprintf "piece %d (%A) is %d bytes, longer than max_token_length %d" i p n maxTokenLength))
    Llama2cVocab(Array.copy pieces, Array.copy scores, maxTokenLength, source)

/// Reads a llama2.c tokenizer file holding `vocabSize` pieces (take it from the model header).
let load (path: string) (vocabSize: int) : Llama2cVocab =
    let fail p = raise (Llama2cTokenizerError(path, p))
    if not (File.Exists path) then raise (FileNotFoundException(sprintf "llama2.c tokenizer file not found: %s" path, path))
    if vocabSize <= 0 then fail (sprintf "vocabulary size %d is not positive" vocabSize)
    let bytes = File.ReadAllBytes path
    let mutable pos = 0
    let need n what =
        if pos + n > bytes.Length then
            fail (sprintf "file ends at byte %d while reading %s (needs %d more bytes); is the vocabulary size %d right?" bytes.Length what (pos + n - bytes.Length) vocabSize)
    need 4 "max_token_length"
    let maxLen = BitConverter.ToInt32(bytes, 0)
    pos <- 4
    let pieces = Array.zeroCreate vocabSize
    let scores = Array.zeroCreate vocabSize
    for i in 0 .. vocabSize - 1 do
        need 8 (sprintf "the score and length of piece %d" i)
        scores[i] <- BitConverter.ToSingle(bytes, pos)
        let len = BitConverter.ToInt32(bytes, pos + 4)
        pos <- pos + 8
        if len < 0 then fail (sprintf "piece %d has negative length %d (at byte %d)" i len (pos - 4))
        need len (sprintf "the %d bytes of piece %d" len i)
        pieces[i] <-
            try strictUtf8.GetString(bytes, pos, len)
            with :? DecoderFallbackException -> fail (sprintf "piece %d (bytes %d..%d) is not valid UTF-8" i pos (pos + len - 1))
        pos <- pos + len
    if pos <> bytes.Length then
        fail (sprintf "%d bytes are left after %d pieces: the vocabulary size (from the model header) does not match this file" (bytes.Length - pos) vocabSize)
    create path pieces scores maxLen

// ---------------------------------------------------------------------------------------------- encode

/// The ids of each UTF-8 character of `text` (byte fallback for characters that are not pieces).
let private characterIds (v: Llama2cVocab) (text: string) (out: ResizeArray<int>) =
    let buf = Array.zeroCreate<byte> 4
    for r in text.EnumerateRunes() do
        let id =
            match v.RuneIds.TryGetValue r.Value with
            | true, id -> id
            | _ ->
                let id = match v.Lookup.TryGetValue(r.ToString()) with | true, id -> id | _ -> -1
                v.RuneIds[r.Value] <- id
                id
        if id >= 0 then out.Add id
        else
            let n = r.EncodeToUtf8(Span buf)
            for i in 0 .. n - 1 do out.Add(int buf[i] + ByteOffset)

[<Struct; CustomComparison; CustomEquality>]
type private Priority =
    { Score: float32; Left: int }
    interface IComparable<Priority> with
        // Smaller = popped first: higher score first, then the leftmost pair.
        member a.CompareTo b = let c = b.Score.CompareTo a.Score in if c <> 0 then c else a.Left.CompareTo b.Left
    override a.Equals o = match o with :? Priority as b -> a.Score = b.Score && a.Left = b.Left | _ -> false
    override a.GetHashCode() = HashCode.Combine(a.Score, a.Left)

/// run.c's `best_score` starts at −1e10 and a pair must beat it.
let private minScore = -1e10f

/// Greedy best-score BPE over initial ids, in place of run.c's quadratic loop (same merges, same order).
let private mergeAll (v: Llama2cVocab) (ids: ResizeArray<int>) : int[] =
    let n = ids.Count
    if n < 2 then ids.ToArray()
    else
        let tok = ids.ToArray()
        let next = Array.init n (fun i -> if i + 1 < n then i + 1 else -1)
        let prev = Array.init n (fun i -> i - 1)
        let alive = Array.create n true
        let queue = PriorityQueue<struct (int * int * int * int * int), Priority>(Comparer<Priority>.Default)
        let push left =
            let right = next[left]
            if right >= 0 then
                let merged = v.PairId(tok[left], tok[right])
                if merged >= 0 && v.Scores[merged] > minScore then
                    queue.Enqueue(struct (left, right, tok[left], tok[right], merged), { Score = v.Scores[merged]; Left = left })
        for i in 0 .. n - 2 do push i
        let mutable entry = Unchecked.defaultof<struct (int * int * int * int * int)>
        let mutable pri = Unchecked.defaultof<Priority>
        while queue.TryDequeue(&entry, &pri) do
            let struct (left, right, leftTok, rightTok, merged) = entry
            // Stale when either side has changed since the pair was queued (a node's piece only grows).
            if alive[left] && alive[right] && next[left] = right && tok[left] = leftTok && tok[right] = rightTok then
                tok[left] <- merged
                alive[right] <- false
                next[left] <- next[right]
                if next[right] >= 0 then prev[next[right]] <- left
                if prev[left] >= 0 then push prev[left]
                push left
        [| let mutable i = 0
           while i >= 0 do
               yield tok[i]
               i <- next[i] |]

/// Token ids of `text` as run.c's `encode(t, text, bos, eos, ...)` gives them.
let encodeWith (v: Llama2cVocab) (bos: bool) (eos: bool) (text: string) : int[] =
    let ids = ResizeArray<int>(text.Length + 2)
    if bos then ids.Add Bos
    if text.Length > 0 then
        match v.Lookup.TryGetValue " " with
        | true, space -> ids.Add space
        | _ -> ids.Add(int ' ' + ByteOffset)
        characterIds v text ids
    let merged = mergeAll v ids
    if eos then Array.append merged [| Eos |] else merged

/// Token ids of `text`, without BOS or EOS.
let encode (v: Llama2cVocab) (text: string) : int[] = encodeWith v false false text

/// run.c's encode transcribed literally (rescan every adjacent pair after each merge). Quadratic: a
/// reference for tests, not for corpora.
let encodeReference (v: Llama2cVocab) (bos: bool) (eos: bool) (text: string) : int[] =
    let tokens = ResizeArray<int>()
    if bos then tokens.Add Bos
    if text.Length > 0 then
        tokens.Add(match v.Lookup.TryGetValue " " with | true, s -> s | _ -> int ' ' + ByteOffset)
        characterIds v text tokens
    let mutable go = true
    while go do
        let mutable bestScore = minScore
        let mutable bestId = -1
        let mutable bestIdx = -1
        for i in 0 .. tokens.Count - 2 do
            match v.Lookup.TryGetValue(v.Pieces[tokens[i]] + v.Pieces[tokens[i + 1]]) with
            | true, id when v.Scores[id] > bestScore ->
                bestScore <- v.Scores[id]
                bestId <- id
                bestIdx <- i
            | _ -> ()
        if bestIdx = -1 then go <- false
        else
            tokens[bestIdx] <- bestId
            tokens.RemoveAt(bestIdx + 1)
    if eos then tokens.Add Eos
    tokens.ToArray()

// ---------------------------------------------------------------------------------------------- decode

let private checkId (v: Llama2cVocab) (id: int) =
    if id < 0 || id >= v.VocabSize then invalidArg "ids" (sprintf "llama2.c token id %d is outside 0..%d" id (v.VocabSize - 1))

/// The bytes token `id` prints after token `prev` (run.c's `decode(t, prev, id)`): a leading space is dropped
/// after BOS, and `<0xHH>` pieces give their raw byte.
let pieceBytesAfter (v: Llama2cVocab) (prev: int) (id: int) : byte[] =
    checkId v id
    match v.ByteValue[id] with
    | b when b >= 0 -> [| byte b |]
    | _ ->
        let bytes = v.PieceBytes[id]
        if prev = Bos && bytes.Length > 0 && bytes[0] = byte ' ' then bytes[1..] else bytes

/// The text of `ids` as SentencePiece decodes it: BOS and EOS print nothing, `<unk>` prints " ⁇ ", the leading
/// space of the first piece of the sequence and of the first piece after each BOS is dropped (undoing the dummy
/// prefix), byte pieces are joined into UTF-8 (invalid sequences become U+FFFD).
let decode (v: Llama2cVocab) (ids: int[]) : string =
    let out = ResizeArray<byte>(ids.Length * 4)
    let mutable prev = Bos
    for id in ids do
        checkId v id
        if id = Bos || id = Eos then ()
        elif id = Unk then out.AddRange(Encoding.UTF8.GetBytes " \u2047 ")
        else out.AddRange(pieceBytesAfter v prev id)
        prev <- id
    Encoding.UTF8.GetString(out.ToArray())

/// The piece of one token, for display (byte pieces as written, e.g. `<0x0A>`).
let pieceText (v: Llama2cVocab) (id: int) : string =
    checkId v id
    v.Pieces[id]

// ---------------------------------------------------------------------------------------------- JSON

/// `{"kind":"llama2c","version":1,"max_token_length":7,"pieces":[...],"scores":[...]}`: the whole vocabulary,
/// so a model folder holding it needs no tokenizer file.
let toJson (v: Llama2cVocab) : JsonObject =
    let pieces = JsonArray()
    for p in v.Pieces do pieces.Add(JsonValue.Create p)
    let scores = JsonArray()
    for s in v.Scores do scores.Add(JsonValue.Create s)
    let o = JsonObject()
    o["kind"] <- JsonValue.Create "llama2c"
    o["version"] <- JsonValue.Create 1
    o["max_token_length"] <- JsonValue.Create v.MaxTokenLength
    o["pieces"] <- pieces
    o["scores"] <- scores
    o

/// Reads and validates an embedded vocabulary; `source` names the file in errors.
let ofJsonElement (source: string) (root: JsonElement) : Llama2cVocab =
    let fail field problem = raise (Llama2cTokenizerError(source, sprintf "field '%s': %s" field problem))
    if root.ValueKind <> JsonValueKind.Object then fail "(root)" (sprintf "expected an object, found %O" root.ValueKind)
    let get (name: string) =
        match root.TryGetProperty name with
        | true, p -> p
        | _ -> fail name "missing"
    let kind = get "kind"
    if kind.ValueKind <> JsonValueKind.String || kind.GetString() <> "llama2c" then fail "kind" (sprintf "expected \"llama2c\", found %s" (kind.GetRawText()))
    match root.TryGetProperty "version" with
    | true, ver when not (ver.ValueKind = JsonValueKind.Number && ver.GetRawText() = "1") ->
        fail "version" (sprintf "%s is not supported (this library reads version 1)" (ver.GetRawText()))
    | _ -> ()
    let mtl = get "max_token_length"
    let maxLen =
        match mtl.ValueKind, (if mtl.ValueKind = JsonValueKind.Number then mtl.TryGetInt32() else (false, 0)) with
        | JsonValueKind.Number, (true, n) -> n
        | _ -> fail "max_token_length" (sprintf "expected an integer, found %s" (mtl.GetRawText()))
    let arr name =
        let a = get name
        if a.ValueKind <> JsonValueKind.Array then fail name (sprintf "expected an array, found %O" a.ValueKind)
        a.EnumerateArray() |> Seq.toArray
    let pieces =
        arr "pieces" |> Array.mapi (fun i e ->
            if e.ValueKind <> JsonValueKind.String then fail (sprintf "pieces[%d]" i) (sprintf "expected a string, found %O" e.ValueKind)
            e.GetString())
    let scores =
        arr "scores" |> Array.mapi (fun i e ->
            match e.ValueKind with
            | JsonValueKind.Number -> e.GetSingle()
            | k -> fail (sprintf "scores[%d]" i) (sprintf "expected a number, found %O" k))
    create source pieces scores maxLen
