/// GPT-2's byte-level BPE (50,257 ids; also the GPT-Neo / TinyStories tokenizer), through
/// Microsoft.ML.Tokenizers' `BpeTokenizer` with GPT-2's pre-tokenizer regex (extended so that .NET's
/// UTF-16 regex engine classifies letters and digits outside the BMP as tiktoken's code-point engine does).
///
/// `encode` matches tiktoken's `encode_ordinary`: the text `<|endoftext|>` is ordinary text (it becomes
/// `<`, `|`, `endoftext`, `|`, `>`). `encodeAllowingSpecial` matches tiktoken's
/// `encode(text, allowed_special={"<|endoftext|>"})`: each occurrence becomes id 50256 and the text between
/// occurrences is encoded ordinarily. Text holding a lone UTF-16 surrogate (which no UTF-8 file can hold)
/// is encoded as if the surrogate were U+FFFD, as tiktoken does with Python's surrogates.
module Transcoders.Text.Gpt2Tokenizer

open System
open System.Collections.Generic
open System.IO
open System.IO.Compression
open System.Text
open System.Text.Json
open System.Text.RegularExpressions
open Microsoft.ML.Tokenizers

/// GPT-2's pre-tokenizer regex as written for code-point regex engines (openai/gpt-2 `encoder.py` with
/// Python's `regex`, tiktoken `r50k_base` with Rust's `fancy-regex`).
[<Literal>]
let PreTokenizerPattern = @"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

/// .NET's regex engine matches UTF-16 code units, so in `PreTokenizerPattern` a letter or digit outside the
/// Basic Multilingual Plane (𝐀, 𠀀, 𝟙: a surrogate pair, category Cs per unit) would fall into the "other"
/// class and split words differently from tiktoken. This builds the same pattern with the classes extended
/// by surrogate-pair alternations for supplementary letters and numbers (from .NET's Unicode tables), so the
/// splits are those of a code-point engine. Lone surrogates count as "other" (tiktoken reads them as U+FFFD).
let preTokenizerPatternUtf16 () : string =
    let pairsOf (pick: Globalization.UnicodeCategory -> bool) =
        let byHigh = SortedDictionary<int, ResizeArray<int>>()
        for cp in 0x10000 .. 0x10FFFF do
            if pick (Rune.GetUnicodeCategory(Rune cp)) then
                let hi, lo = 0xD800 + ((cp - 0x10000) >>> 10), 0xDC00 + ((cp - 0x10000) &&& 0x3FF)
                match byHigh.TryGetValue hi with
                | true, l -> l.Add lo
                | _ -> byHigh[hi] <- ResizeArray [ lo ]
        let ranges (los: ResizeArray<int>) =
            let sb = StringBuilder()
            let mutable i = 0
            while i < los.Count do
                let mutable j = i
                while j + 1 < los.Count && los[j + 1] = los[j] + 1 do j <- j + 1
                if j = i then sb.AppendFormat("\\u{0:X4}", los[i]) |> ignore
                else sb.AppendFormat("\\u{0:X4}-\\u{1:X4}", los[i], los[j]) |> ignore
                i <- j + 1
            sb.ToString()
        let alts = [ for KeyValue(hi, los) in byHigh -> sprintf "\\u%04X[%s]" hi (ranges los) ]
        // The lookahead makes every BMP character fail fast (without it matching runs ~3x slower).
        @"(?=[\uD800-\uDBFF])(?:" + String.Join("|", alts) + ")"
    let isLetter (c: Globalization.UnicodeCategory) = c <= Globalization.UnicodeCategory.OtherLetter
    let isNumber (c: Globalization.UnicodeCategory) =
        c = Globalization.UnicodeCategory.DecimalDigitNumber || c = Globalization.UnicodeCategory.LetterNumber
        || c = Globalization.UnicodeCategory.OtherNumber
    let l2 = pairsOf isLetter
    let n2 = pairsOf isNumber
    let pair = @"[\uD800-\uDBFF][\uDC00-\uDFFF]"
    let lone = @"[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]"
    String.concat "" [
        @"'s|'t|'re|'ve|'m|'ll|'d"
        @"| ?(?:\p{L}|" + l2 + ")+"
        @"| ?(?:\p{N}|" + n2 + ")+"
        @"| ?(?:[^\s\p{L}\p{N}\uD800-\uDFFF]|(?!" + l2 + "|" + n2 + ")" + pair + "|" + lone + ")+"
        @"|\s+(?!\S)|\s+" ]

/// The compiled pre-tokenizer regex (see `preTokenizerPatternUtf16`).
let preTokenizerRegex = lazy (Regex(preTokenizerPatternUtf16 (), RegexOptions.Compiled ||| RegexOptions.CultureInvariant))

/// The end-of-text token's text and id.
[<Literal>]
let EndOfText = "<|endoftext|>"

[<Literal>]
let EndOfTextId = 50256

/// Number of ids: 50,000 merges + 256 bytes + `<|endoftext|>`.
[<Literal>]
let VocabSize = 50257

/// GPT-2's reversible map from bytes to printable characters (`bytes_to_unicode` in openai/gpt-2), in which
/// encoder.json spells its tokens.
let internal byteToChar : char[] =
    let printable = [ yield! [ 33 .. 126 ]; yield! [ 161 .. 172 ]; yield! [ 174 .. 255 ] ] |> set
    let table = Array.zeroCreate 256
    let mutable n = 0
    for b in 0 .. 255 do
        if printable.Contains b then table[b] <- char b
        else
            table[b] <- char (256 + n)
            n <- n + 1
    table

let internal charToByte : IReadOnlyDictionary<char, byte> =
    byteToChar |> Array.mapi (fun b c -> KeyValuePair(c, byte b)) |> Dictionary :> _

/// A loaded GPT-2 tokenizer. Thread-safe (the BPE cache inside is locked).
[<Sealed>]
type Gpt2Bpe internal (bpe: BpeTokenizer, tokenBytes: byte[][], source: string) =
    /// The underlying Microsoft.ML.Tokenizers object.
    member _.Bpe = bpe
    /// Where the vocabulary and merges were read from.
    member _.Source = source
    /// Raw UTF-8 bytes of every token, indexed by id.
    member internal _.TokenBytes = tokenBytes
    override _.ToString() = sprintf "GPT-2 BPE (%d ids, from %s)" VocabSize source

/// Reads a text file, decompressing it when it starts with the gzip magic bytes (so `x.json` and `x.json.gz` both work).
let private readText (path: string) =
    if not (File.Exists path) then raise (FileNotFoundException(sprintf "GPT-2 tokenizer file not found: %s" path, path))
    use f = File.OpenRead path
    let magic = Array.zeroCreate<byte> 2
    let n = f.Read(magic, 0, 2)
    f.Position <- 0L
    let s : Stream = if n = 2 && magic[0] = 0x1fuy && magic[1] = 0x8buy then new GZipStream(f, CompressionMode.Decompress) else f
    use r = new StreamReader(s, UTF8Encoding(false, true))
    try r.ReadToEnd()
    with :? DecoderFallbackException as e -> failwithf "%s: not valid UTF-8 (%s)" path e.Message

/// Loads GPT-2 from an `encoder.json` (token → id) and a `vocab.bpe` (merges), either possibly gzipped.
/// Validates that the vocabulary holds exactly ids 0..50256, spelled with GPT-2's byte alphabet.
let load (encoderJson: string) (vocabBpe: string) : Gpt2Bpe =
    let vocab =
        try JsonSerializer.Deserialize<Dictionary<string, int>>(readText encoderJson)
        with :? JsonException as e -> failwithf "%s: not a JSON object from token to id (%s)" encoderJson e.Message
    if isNull vocab || vocab.Count <> VocabSize then
        failwithf "%s: expected %d tokens, found %d" encoderJson VocabSize (if isNull vocab then 0 else vocab.Count)
    let tokenBytes = Array.zeroCreate<byte[]> VocabSize
    for KeyValue(token, id) in vocab do
        if id < 0 || id >= VocabSize then failwithf "%s: token %A has id %d outside 0..%d" encoderJson token id (VocabSize - 1)
        if not (isNull tokenBytes[id]) then failwithf "%s: id %d is used twice" encoderJson id
        tokenBytes[id] <-
            token.ToCharArray()
            |> Array.map (fun c ->
                match charToByte.TryGetValue c with
                | true, b -> b
                | _ -> failwithf "%s: token %A (id %d) has the character U+%04X outside GPT-2's byte alphabet" encoderJson token id (int c))
    if vocab[EndOfText] <> EndOfTextId then failwithf "%s: %s must have id %d" encoderJson EndOfText EndOfTextId
    let lines = (readText vocabBpe).Split('\n')
    let merges =
        lines
        |> Array.mapi (fun i l -> i, l.TrimEnd('\r'))
        |> Array.filter (fun (i, l) -> l <> "" && not (i = 0 && l.StartsWith "#version"))
        |> Array.map (fun (i, l) ->
            let parts = l.Split(' ')
            if parts.Length <> 2 then failwithf "%s: line %d is not a merge 'left right': %A" vocabBpe (i + 1) l
            if not (vocab.ContainsKey(parts[0] + parts[1])) then
                failwithf "%s: line %d merges into %A, which is not in %s" vocabBpe (i + 1) (parts[0] + parts[1]) encoderJson
            l)
    if merges.Length <> VocabSize - 257 then failwithf "%s: expected %d merges, found %d" vocabBpe (VocabSize - 257) merges.Length
    let pre = RegexPreTokenizer(preTokenizerRegex.Force(), null)
    let options = BpeOptions(vocab, Merges = merges, ByteLevel = true, PreTokenizer = pre)
    Gpt2Bpe(BpeTokenizer.Create options, tokenBytes, encoderJson)

let private shared =
    lazy (load (Transcoders.Files.Paths.data "tokenizers/gpt2/encoder.json.gz") (Transcoders.Files.Paths.data "tokenizers/gpt2/vocab.bpe.gz"))

/// The shipped GPT-2 tokenizer (`data/tokenizers/gpt2`), loaded once and cached.
let get () : Gpt2Bpe = shared.Force()

/// `text` with every lone UTF-16 surrogate (a high one not followed by a low one, a low one not preceded by a
/// high one) replaced by U+FFFD, as tiktoken's `encode` does (it round-trips Python's surrogates through UTF-16
/// with errors="replace"). Text without lone surrogates is returned as it is.
let replaceLoneSurrogates (text: string) : string =
    if isNull text || text.AsSpan().IndexOfAnyInRange(char 0xD800, char 0xDFFF) < 0 then text
    else
        let chars = text.ToCharArray()
        let mutable i = 0
        while i < chars.Length do
            if Char.IsHighSurrogate chars[i] && i + 1 < chars.Length && Char.IsLowSurrogate chars[i + 1] then i <- i + 2
            else
                if Char.IsSurrogate chars[i] then chars[i] <- char 0xFFFD
                i <- i + 1
        String(chars)

/// Token ids of `text`, with `<|endoftext|>` treated as plain text (tiktoken's `encode_ordinary`). A lone
/// surrogate is encoded as U+FFFD (bytes EF BF BD), as tiktoken does.
let encode (t: Gpt2Bpe) (text: string) : int[] =
    if String.IsNullOrEmpty text then [||]
    else
        t.Bpe.EncodeToIds(replaceLoneSurrogates text) |> Seq.toArray

/// Token ids of `text` where each `<|endoftext|>` becomes id 50256 (tiktoken's `encode` with it allowed).
let encodeAllowingSpecial (t: Gpt2Bpe) (text: string) : int[] =
    if String.IsNullOrEmpty text then [||]
    else
        let parts = text.Split(EndOfText)
        [| for i in 0 .. parts.Length - 1 do
               if i > 0 then yield EndOfTextId
               yield! encode t parts[i] |]

/// `encodeAllowingSpecial` when `allowSpecial`, else `encode`.
let encodeWith (t: Gpt2Bpe) (allowSpecial: bool) (text: string) : int[] =
    if allowSpecial then encodeAllowingSpecial t text else encode t text

let private checkIds (ids: int seq) =
    for id in ids do
        if id < 0 || id >= VocabSize then invalidArg "ids" (sprintf "GPT-2 token id %d is outside 0..%d" id (VocabSize - 1))

/// The raw bytes of token `id` (a token can be part of a multi-byte UTF-8 character).
let tokenBytes (t: Gpt2Bpe) (id: int) : byte[] =
    checkIds [ id ]
    Array.copy t.TokenBytes[id]

/// The concatenated bytes of `ids`.
let decodeBytes (t: Gpt2Bpe) (ids: int[]) : byte[] =
    checkIds ids
    let out = ResizeArray<byte>(ids.Length * 4)
    for id in ids do out.AddRange t.TokenBytes[id]
    out.ToArray()

/// The text of `ids` (50256 decodes to `<|endoftext|>`). Bytes that do not form valid UTF-8 (a sequence cut
/// inside a character) become U+FFFD, as tiktoken's `decode` does.
let decode (t: Gpt2Bpe) (ids: int[]) : string =
    checkIds ids
    if ids.Length = 0 then "" else t.Bpe.Decode ids

/// The text of one token, for display (partial UTF-8 characters show as U+FFFD).
let tokenText (t: Gpt2Bpe) (id: int) : string = Encoding.UTF8.GetString(tokenBytes t id)
