namespace Transcoders.Text

open System
open System.IO
open System.Text.Json
open System.Text.Json.Nodes
open Transcoders.Text.Gpt2Tokenizer
open Transcoders.Text.CompactVocab
open Transcoders.Text.Llama2cTokenizer
open Transcoders.Text.ByteLevelBpe

/// The tokenizers a model can use.
type Tokenizer =
    /// GPT-2's byte-level BPE (50,257 ids; also GPT-Neo's and the TinyStories models').
    | Gpt2 of Gpt2Bpe
    /// A compact vocabulary over GPT-2 ids (tinymodel style): the K−4 most frequent tokens and four specials.
    | Compact of CompactVocab * Gpt2Bpe
    /// llama2.c's SentencePiece BPE (e.g. the 512-piece vocabulary of stories260K).
    | Llama2c of Llama2cVocab
    /// A byte-level BPE from a Hugging Face tokenizer.json (GPT-NeoX / Pythia's).
    | HfBpe of ByteLevelBpe

/// Which tokenizer file a JSON description failed on, and why.
exception TokenizerJsonError of source: string * problem: string with
    override this.Message = sprintf "%s: tokenizer description: %s" this.source this.problem

/// Encoding, decoding, special ids and saving of every `Tokenizer`.
///
/// Special ids: GPT-2 uses `<|endoftext|>` (50256) as both BOS and EOS (as Hugging Face's GPT-2 config does);
/// a compact vocabulary has `[BEGIN]`, `[END]`, `[PAD]`, `[UNK]`; llama2.c has BOS 1, EOS 2, `<unk>` 0; a tokenizer.json
/// uses its special `<|endoftext|>` as BOS and EOS (GPT-NeoX's bos_token_id = eos_token_id = 0) and `<|padding|>` as pad.
[<RequireQualifiedAccess>]
module Tokenizer =

    /// The shipped GPT-2 tokenizer.
    let gpt2 () = Gpt2(Gpt2Tokenizer.get ())

    /// A llama2.c tokenizer file with `vocabSize` pieces (from the model header).
    let llama2c (path: string) (vocabSize: int) = Llama2c(Llama2cTokenizer.load path vocabSize)

    /// A Hugging Face tokenizer.json (byte-level BPE).
    let huggingFace (path: string) = HfBpe(ByteLevelBpe.load path)

    let private special (b: ByteLevelBpe) (content: string) =
        match b.Specials.TryGetValue content with
        | true, id -> Some id
        | _ -> None

    /// A compact vocabulary over the shipped GPT-2.
    let compact (vocab: CompactVocab) =
        if vocab.Base <> "gpt2" || vocab.BaseVocabSize <> Gpt2Tokenizer.VocabSize then
            invalidArg "vocab" (sprintf "compact vocabulary over base %s with %d ids: only gpt2 (%d ids) is supported" vocab.Base vocab.BaseVocabSize Gpt2Tokenizer.VocabSize)
        Compact(vocab, Gpt2Tokenizer.get ())

    /// Number of ids (the embedding's row count).
    let vocabSize = function
        | Gpt2 _ -> Gpt2Tokenizer.VocabSize
        | Compact(v, _) -> v.Size
        | Llama2c v -> v.VocabSize
        | HfBpe b -> b.VocabSize

    /// The id that starts a document, if the tokenizer has one.
    let bos = function
        | Gpt2 _ -> Some Gpt2Tokenizer.EndOfTextId
        | Compact(v, _) -> Some v.Begin
        | Llama2c _ -> Some Llama2cTokenizer.Bos
        | HfBpe b -> special b "<|endoftext|>"

    /// The id that ends a document, if the tokenizer has one.
    let eos = function
        | Gpt2 _ -> Some Gpt2Tokenizer.EndOfTextId
        | Compact(v, _) -> Some v.End
        | Llama2c _ -> Some Llama2cTokenizer.Eos
        | HfBpe b -> special b "<|endoftext|>"

    /// The padding id, if the tokenizer has one.
    let pad = function
        | Compact(v, _) -> Some v.Pad
        | HfBpe b -> special b "<|padding|>"
        | Gpt2 _ | Llama2c _ -> None

    /// The unknown-token id, if the tokenizer has one.
    let unk = function
        | Compact(v, _) -> Some v.Unk
        | Llama2c _ -> Some Llama2cTokenizer.Unk
        | Gpt2 _ | HfBpe _ -> None

    /// The ids of plain text, with no document markers. GPT-2 treats the text `<|endoftext|>` as text
    /// (tiktoken's `encode_ordinary`), so only `encodeDocument` ever emits BOS/EOS.
    let encode (t: Tokenizer) (text: string) : int[] =
        match t with
        | Gpt2 g -> Gpt2Tokenizer.encode g text
        | Compact(v, g) -> CompactVocab.toCompact v (Gpt2Tokenizer.encode g text)
        | Llama2c v -> Llama2cTokenizer.encode v text
        | HfBpe b -> ByteLevelBpe.encode b text

    /// A document's ids: BOS (when `addBos` and the tokenizer has one), the text's ids, then EOS (when `addEos`).
    let encodeDocument (t: Tokenizer) (addBos: bool) (addEos: bool) (text: string) : int[] =
        let body = encode t text
        [| if addBos then yield! Option.toList (bos t)
           yield! body
           if addEos then yield! Option.toList (eos t) |]

    /// The text of ids. GPT-2 prints `<|endoftext|>` for 50256; a compact vocabulary prints its specials by name
    /// (`[BEGIN]`...); llama2.c drops BOS/EOS and the dummy-prefix space, like SentencePiece.
    let decode (t: Tokenizer) (ids: int[]) : string =
        match t with
        | Gpt2 g -> Gpt2Tokenizer.decode g ids
        | Compact(v, g) -> CompactVocab.decodeWith (Gpt2Tokenizer.decode g) false v ids
        | Llama2c v -> Llama2cTokenizer.decode v ids
        | HfBpe b -> ByteLevelBpe.decode b ids

    /// The text of one token, for display (tokens that hold part of a UTF-8 character show U+FFFD).
    let tokenText (t: Tokenizer) (id: int) : string =
        match t with
        | Gpt2 g -> Gpt2Tokenizer.tokenText g id
        | Compact(v, g) ->
            match CompactVocab.specialName v id with
            | Some n -> n
            | None -> Gpt2Tokenizer.tokenText g (CompactVocab.toBase v [| id |]).[0]
        | Llama2c v -> Llama2cTokenizer.pieceText v id
        | HfBpe b -> ByteLevelBpe.tokenText b id

    /// A short description: "gpt2", "compact(gpt2, 4096)", "llama2c(512)".
    let describe = function
        | Gpt2 _ -> "gpt2"
        | Compact(v, _) -> sprintf "compact(%s, %d)" v.Base v.Size
        | Llama2c v -> sprintf "llama2c(%d)" v.VocabSize
        | HfBpe b -> sprintf "tokenizer.json(%d)" b.VocabSize

    /// The self-describing JSON of a tokenizer: `{"kind":"gpt2"}`, the compact vocabulary's JSON, or the
    /// llama2.c vocabulary with all its pieces and scores (so a model folder needs no other file).
    let toJson (t: Tokenizer) : JsonObject =
        match t with
        | Gpt2 _ ->
            let o = JsonObject()
            o["kind"] <- JsonValue.Create "gpt2"
            o["vocab_size"] <- JsonValue.Create Gpt2Tokenizer.VocabSize
            o
        | Compact(v, _) -> CompactVocab.toJson v
        | Llama2c v -> Llama2cTokenizer.toJson v
        | HfBpe b ->
            let o = JsonObject()
            o["kind"] <- JsonValue.Create "hf_tokenizer_json"
            o["tokenizer"] <- JsonNode.Parse(b.Json.GetRawText())
            o

    /// Rebuilds a tokenizer from its JSON (GPT-2 ones use the shipped GPT-2 files); `source` names the file in errors.
    let ofJsonElement (source: string) (root: JsonElement) : Tokenizer =
        if root.ValueKind <> JsonValueKind.Object then
            raise (TokenizerJsonError(source, sprintf "expected a JSON object, found %O" root.ValueKind))
        match root.TryGetProperty "kind" with
        | true, k when k.ValueKind = JsonValueKind.String ->
            match k.GetString() with
            | "gpt2" ->
                match root.TryGetProperty "vocab_size" with
                | true, n when not (n.ValueKind = JsonValueKind.Number && n.GetRawText() = string Gpt2Tokenizer.VocabSize) ->
                    raise (TokenizerJsonError(source, sprintf "field 'vocab_size': GPT-2 has %d ids, found %s" Gpt2Tokenizer.VocabSize (n.GetRawText())))
                | _ -> gpt2 ()
            | "compact" ->
                let v = CompactVocab.ofJsonElement source root
                if v.Base <> "gpt2" || v.BaseVocabSize <> Gpt2Tokenizer.VocabSize then
                    raise (CompactVocabError(source, "base", sprintf "%s with %d ids: only gpt2 (%d ids) is supported" v.Base v.BaseVocabSize Gpt2Tokenizer.VocabSize))
                compact v
            | "llama2c" -> Llama2c(Llama2cTokenizer.ofJsonElement source root)
            | "hf_tokenizer_json" ->
                match root.TryGetProperty "tokenizer" with
                | true, t -> HfBpe(ByteLevelBpe.ofJsonElement source t)
                | _ -> raise (TokenizerJsonError(source, "field 'tokenizer': missing (the tokenizer.json object)"))
            | other -> raise (TokenizerJsonError(source, sprintf "field 'kind': unknown tokenizer kind %A (expected gpt2, compact, llama2c or hf_tokenizer_json)" other))
        | true, k -> raise (TokenizerJsonError(source, sprintf "field 'kind': expected a string, found %O" k.ValueKind))
        | _ -> raise (TokenizerJsonError(source, "field 'kind': missing"))

    /// Writes `toJson` to a file, atomically.
    let save (path: string) (t: Tokenizer) =
        Transcoders.Files.AtomicFile.writeAllText path ((toJson t).ToJsonString(JsonSerializerOptions(Encoder = Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping)))

    /// Reads a tokenizer file written by `save`, validating it.
    let load (path: string) : Tokenizer =
        if not (File.Exists path) then raise (FileNotFoundException(sprintf "tokenizer file not found: %s" path, path))
        let doc =
            try JsonDocument.Parse(File.ReadAllText path)
            with :? JsonException as e -> raise (TokenizerJsonError(path, sprintf "not valid JSON: %s" e.Message))
        use doc = doc
        ofJsonElement path doc.RootElement
