/// GPT-2 BPE (golden ids from tiktoken), llama2.c's SentencePiece (llama2.c's own greedy sample), the compact
/// vocabulary and the Tokenizer union: exact ids, round trips, JSON save/load and clear errors.
module Transcoders.Tests.TokenizerTests

open System
open System.IO
open System.Text
open System.Text.Json
open Expecto
open FsCheck
open FsCheck.FSharp
open Transcoders.Files
open Transcoders.Text
open Transcoders.Tests.Fixtures

// ---------------------------------------------------------------------------------------------- generators

/// Valid UTF-16 text (no lone surrogates): ASCII, whitespace runs, controls, accents, CJK, emoji (surrogate
/// pairs), any other scalar value, contractions and the literal `<|endoftext|>`.
let private codePoint =
    Gen.frequency [
        6, Gen.choose (32, 126)
        2, Gen.elements [ 9; 10; 11; 12; 13; 32; 0x85; 0xA0; 0x1680; 0x2000; 0x2028; 0x202F; 0x3000; 0x200B; 0xFEFF ]
        1, Gen.choose (0, 31)
        2, Gen.choose (0x80, 0x36F)
        1, Gen.choose (0x4E00, 0x9FFF)
        2, Gen.choose (0x1F300, 0x1FAFF)
        1, Gen.choose (0, 0x10FFFF) |> Gen.filter (fun c -> c < 0xD800 || c > 0xDFFF) ]

let private chunk =
    Gen.frequency [
        8, codePoint |> Gen.map Char.ConvertFromUtf32
        2, Gen.zip (Gen.elements [ " "; "\t"; "\n"; "\r\n"; "\u00A0" ]) (Gen.choose (2, 12)) |> Gen.map (fun (s, n) -> String.replicate n s)
        1, Gen.elements [ "'s"; "'t"; "'re"; "'ve"; "'m"; "'ll"; "'d"; "<|endoftext|>"; " the"; "Once upon a time"; "1234567"; "<0x41>" ] ]

let validText = Gen.listOf chunk |> Gen.map String.Concat
let private validTextArb = Arb.fromGen validText

let private config n = { FsCheckConfig.defaultConfig with maxTest = n }

// ---------------------------------------------------------------------------------------------- fixtures

type private GoldenCase = { Text: string; Ids: int[]; Special: bool }

let private golden =
    lazy (
        use doc = JsonDocument.Parse(File.ReadAllText(fixture "gpt2_tokenizer_golden.json"))
        [ for e in doc.RootElement.EnumerateArray() ->
              { Text = e.GetProperty("text").GetString()
                Ids = [| for i in e.GetProperty("ids").EnumerateArray() -> i.GetInt32() |]
                Special = (match e.TryGetProperty "special" with | true, s -> s.GetBoolean() | _ -> false) } ])

let private stories260K (name: string) = Paths.data (Path.Combine("models", "stories260K", name))

let private tok512 = lazy (Llama2cTokenizer.load (stories260K "tok512.bin") 512)

let private referenceGreedy =
    lazy (
        use doc = JsonDocument.Parse(File.ReadAllText(stories260K "reference_greedy.json"))
        let r = doc.RootElement
        [| for i in r.GetProperty("greedy_token_ids").EnumerateArray() -> i.GetInt32() |],
        r.GetProperty("greedy_text").GetString(),
        r.GetProperty("header").GetProperty("vocab_size").GetInt32(),
        r.GetProperty("start_token").GetInt32())

/// The first `n` stories of a shipped TinyStories file.
let tinyStories n = Corpus.readStories (Paths.data "tinystories/ts_v1_train_head.txt.gz") |> Seq.truncate n |> Seq.map (fun s -> s.Text) |> Seq.toArray

let private expectThrowsMessage (f: unit -> unit) (parts: string list) (what: string) =
    let msg =
        try
            f ()
            failtestf "%s: expected an exception" what
        with
        | :? AssertException -> reraise ()
        | e -> e.Message
    for p in parts do
        Expect.stringContains msg p (sprintf "%s: the message names %A" what p)

// ---------------------------------------------------------------------------------------------- GPT-2

let private gpt2Tests =
    testList "GPT-2 BPE" [
        test "encodes every golden string exactly as tiktoken" {
            let g = Gpt2Tokenizer.get ()
            Expect.isGreaterThan golden.Value.Length 10 "golden file read"
            for c in golden.Value do
                let ids = if c.Special then Gpt2Tokenizer.encodeAllowingSpecial g c.Text else Gpt2Tokenizer.encode g c.Text
                Expect.sequenceEqual ids c.Ids (sprintf "ids of %A" c.Text)
        }
        test "decodes every golden id list back to its string" {
            let g = Gpt2Tokenizer.get ()
            for c in golden.Value do
                Expect.equal (Gpt2Tokenizer.decode g c.Ids) c.Text (sprintf "text of %A" c.Ids)
        }
        test "letters and digits outside the BMP split like a code-point regex engine" {
            // Ids from openai/gpt-2's encoder.py algorithm run with Python's `regex` (a code-point engine, as
            // tiktoken's); that script reproduces every case of gpt2_tokenizer_golden.json. .NET's regex sees
            // surrogate pairs, which the plain pattern would misclassify.
            let g = Gpt2Tokenizer.get ()
            let cases =
                [ "The 𝐁𝐨𝐥𝐝 word and 𝟙𝟚𝟛 digits",
                  [| 464; 220; 47728; 238; 223; 47728; 238; 101; 47728; 238; 98; 47728; 238; 251; 1573; 290; 220; 47728; 253; 247; 47728; 253; 248; 47728; 253; 249; 19561 |]
                  "Gothic 𐌰𐌱𐌲 and 𠀀𠀁 ext-B",
                  [| 38; 849; 291; 220; 172; 238; 234; 108; 172; 238; 234; 109; 172; 238; 234; 110; 290; 220; 172; 254; 222; 222; 172; 254; 222; 223; 1070; 12; 33 |]
                  "mixed a𝐀b 1𝟙2 x😀y",
                  [| 76; 2966; 257; 47728; 238; 222; 65; 352; 47728; 253; 247; 17; 2124; 47249; 222; 88 |] ]
            for text, ids in cases do
                Expect.sequenceEqual (Gpt2Tokenizer.encode g text) ids (sprintf "ids of %A" text)
            let rx = Gpt2Tokenizer.preTokenizerRegex.Force()
            Expect.sequenceEqual [ for m in rx.Matches "a𝐀b 1𝟙2" -> m.Value ] [ "a𝐀b"; " 1𝟙2" ] "pieces"
        }
        testPropertyWithConfig (config 300) "on BMP text the extended pattern splits exactly like GPT-2's plain pattern" <| Prop.forAll validTextArb (fun s ->
            let bmp = String(s.ToCharArray() |> Array.filter (Char.IsSurrogate >> not))
            let plain = Text.RegularExpressions.Regex(Gpt2Tokenizer.PreTokenizerPattern)
            [ for m in plain.Matches bmp -> m.Value ] = [ for m in Gpt2Tokenizer.preTokenizerRegex.Force().Matches bmp -> m.Value ])
        test "<|endoftext|> is ordinary text unless special tokens are allowed" {
            let g = Gpt2Tokenizer.get ()
            let plain = Gpt2Tokenizer.encode g "a<|endoftext|>b"
            Expect.isFalse (Array.contains Gpt2Tokenizer.EndOfTextId plain) "encode_ordinary never emits 50256"
            Expect.sequenceEqual plain [| 64; 27; 91; 437; 1659; 5239; 91; 29; 65 |] "tiktoken's encode_ordinary ids"
            Expect.sequenceEqual (Gpt2Tokenizer.encodeAllowingSpecial g "<|endoftext|><|endoftext|>") [| 50256; 50256 |] "two specials"
        }
        testPropertyWithConfig (config 300) "decode (encode s) = s for valid Unicode text" <| Prop.forAll validTextArb (fun s ->
            let g = Gpt2Tokenizer.get ()
            let ids = Gpt2Tokenizer.encode g s
            Gpt2Tokenizer.decode g ids = s
            && ids |> Array.forall (fun i -> i >= 0 && i < Gpt2Tokenizer.EndOfTextId)
            && Gpt2Tokenizer.decode g (Gpt2Tokenizer.encodeAllowingSpecial g s) = s)
        testPropertyWithConfig (config 200) "token bytes concatenate to the UTF-8 of the text" <| Prop.forAll validTextArb (fun s ->
            let g = Gpt2Tokenizer.get ()
            Gpt2Tokenizer.decodeBytes g (Gpt2Tokenizer.encode g s) = Encoding.UTF8.GetBytes s)
        testPropertyWithConfig (config 300) "decoding any ids equals replacement-decoding their bytes (tiktoken's errors='replace')" <|
            Prop.forAll (Arb.fromGen (Gen.arrayOf (Gen.oneof [ Gen.choose (0, 255); Gen.choose (0, 50256) ]))) (fun ids ->
                let g = Gpt2Tokenizer.get ()
                Gpt2Tokenizer.decode g ids = Encoding.UTF8.GetString(Gpt2Tokenizer.decodeBytes g ids))
        test "a lone surrogate is encoded as U+FFFD (text a file can hold never has one)" {
            let g = Gpt2Tokenizer.get ()
            // Built at run time: the F# compiler turns a surrogate escape in a string literal into U+FFFD already.
            let text (parts: obj list) =
                String.Concat [ for p in parts -> match p with :? int as c -> string (char c) | p -> string p ]
            let cases =
                [ text [ "x"; 0xD800; "y" ], "x\uFFFDy"; text [ 0xDC00 ], "\uFFFD"; text [ "ab"; 0xD83D ], "ab\uFFFD"
                  text [ 0xDE00; 0xD83D ], "\uFFFD\uFFFD"                          // a low then a high: two lone ones
                  text [ "a"; 0xD83D; 0xDE00; 0xDC00; " b" ], "a\U0001F600\uFFFD b" ] // a pair kept, the extra low replaced
            for s, replaced in cases do
                Expect.isTrue (s |> Seq.exists Char.IsSurrogate) (sprintf "%A really holds a surrogate" s)
                Expect.equal (Gpt2Tokenizer.replaceLoneSurrogates s) replaced "replaced as tiktoken does"
                let ids = Gpt2Tokenizer.encode g s
                Expect.sequenceEqual ids (Gpt2Tokenizer.encode g replaced) (sprintf "%A" s)
                Expect.sequenceEqual (Gpt2Tokenizer.decodeBytes g ids) (Encoding.UTF8.GetBytes replaced) "the bytes of U+FFFD, EF BF BD"
            // tiktoken encodes "x\ud800y" as the text "x\ufffdy": bytes x, EF BF BD, y
            let lone = Gpt2Tokenizer.encode g (text [ "x"; 0xD800; "y" ])
            Expect.sequenceEqual (Gpt2Tokenizer.decodeBytes g lone) [| 0x78uy; 0xEFuy; 0xBFuy; 0xBDuy; 0x79uy |] "x EF BF BD y"
            Expect.sequenceEqual (Gpt2Tokenizer.encodeAllowingSpecial g (text [ 0xD800; "<|endoftext|>"; 0xDFFF ])) (Gpt2Tokenizer.encodeAllowingSpecial g "\uFFFD<|endoftext|>\uFFFD") "around a special token"
        }
        test "ids outside the vocabulary are refused by name" {
            let g = Gpt2Tokenizer.get ()
            expectThrowsMessage (fun () -> Gpt2Tokenizer.decode g [| 1; 50257 |] |> ignore) [ "50257"; "0..50256" ] "decode"
        }
        test "a wrong or missing vocabulary file gets an error naming it" {
            use dir = new TempDir()
            let enc = dir.File "encoder.json"
            File.WriteAllText(enc, """{"a": 0, "b": 1}""")
            expectThrowsMessage (fun () -> Gpt2Tokenizer.load enc (Paths.data "tokenizers/gpt2/vocab.bpe.gz") |> ignore) [ enc; "50257" ] "short vocabulary"
            File.WriteAllText(enc, "[1, 2")
            expectThrowsMessage (fun () -> Gpt2Tokenizer.load enc (Paths.data "tokenizers/gpt2/vocab.bpe.gz") |> ignore) [ enc; "JSON" ] "bad JSON"
            expectThrowsMessage (fun () -> Gpt2Tokenizer.load (dir.File "nope.json") enc |> ignore) [ "nope.json" ] "missing file"
        }
    ]

// ---------------------------------------------------------------------------------------------- llama2.c

/// Text made of tok512's merged pieces mixed with arbitrary text: many competing merges and ties.
let private pieceText =
    let pieces = Gen.elements (Llama2cTokenizer.load (stories260K "tok512.bin") 512).Pieces[259..]
    // Runs of one character ("lll", "oooo") make equal-score pairs: the leftmost must merge first.
    let runs = Gen.zip (Gen.elements [ "l"; "o"; "p"; "e"; " "; "a" ]) (Gen.choose (2, 7)) |> Gen.map (fun (c, n) -> String.replicate n c)
    Gen.oneof [ validText; Gen.listOf (Gen.oneof [ pieces; chunk; runs ]) |> Gen.map String.Concat ]

let private llamaTests =
    testList "llama2.c tokenizer" [
        test "decoding llama2.c's greedy sample of stories260K gives its text" {
            let ids, text, vocab, start = referenceGreedy.Value
            Expect.equal vocab 512 "header vocab size"
            Expect.equal ids[0] start "the sample starts with BOS"
            let v = Llama2cTokenizer.load (stories260K "tok512.bin") vocab
            Expect.equal (Llama2cTokenizer.decode v ids) text "decoded text"
        }
        test "encoding the sample's text with BOS gives the sample's ids" {
            let ids, text, _, _ = referenceGreedy.Value
            Expect.sequenceEqual (Llama2cTokenizer.encodeWith tok512.Value true false text) ids "run.c encode"
        }
        test "special ids and piece layout" {
            let v = tok512.Value
            Expect.equal v.VocabSize 512 "size"
            Expect.equal v.MaxTokenLength 7 "max_token_length"
            Expect.equal (Llama2cTokenizer.pieceText v 1) "\n<s>\n" "BOS piece"
            Expect.equal (Llama2cTokenizer.pieceText v (0x41 + 3)) "<0x41>" "byte piece"
            Expect.sequenceEqual (Llama2cTokenizer.encodeWith v true true "") [| 1; 2 |] "empty text: BOS, EOS only (no dummy space)"
            Expect.equal (Llama2cTokenizer.decode v [| 1; 0x41 + 3; 2 |]) "A" "byte piece decodes to its byte"
        }
        test "encode → decode round-trips TinyStories stories" {
            let v = tok512.Value
            for s in tinyStories 40 do
                Expect.equal (Llama2cTokenizer.decode v (Llama2cTokenizer.encodeWith v true true s)) s "story"
        }
        testPropertyWithConfig (config 300) "decode (encode s) = s for valid Unicode text (byte fallback)" <| Prop.forAll validTextArb (fun s ->
            let v = tok512.Value
            let ids = Llama2cTokenizer.encode v s
            Llama2cTokenizer.decode v ids = s && ids |> Array.forall (fun i -> i >= 3 && i < 512))
        testPropertyWithConfig (config 150) "the priority-queue merge equals run.c's rescanning loop" <| Prop.forAll (Arb.fromGen pieceText) (fun s ->
            let v = tok512.Value
            Llama2cTokenizer.encodeWith v true false s = Llama2cTokenizer.encodeReference v true false s)
        test "equal-score pairs merge leftmost first, as in run.c" {
            let v = tok512.Value
            for text in [ "lll"; "ooo"; "ppp"; "bllll"; "xooooy"; "Holll ppp" ] do
                Expect.sequenceEqual (Llama2cTokenizer.encode v text) (Llama2cTokenizer.encodeReference v false false text) text
            // In " blll" (dummy space first) " b" merges, then the two "ll" pairs tie: leftmost first ends
            // "ll" "l", rightmost first would end "l" "ll".
            let ll, l = Array.IndexOf(v.Pieces, "ll"), Array.IndexOf(v.Pieces, "l")
            let ids = Llama2cTokenizer.encode v "blll"
            Expect.sequenceEqual ids[ids.Length - 2 ..] [| ll; l |] "leftmost merge"
        }
        test "a vocabulary size that does not match the file is an error naming it" {
            let path = stories260K "tok512.bin"
            expectThrowsMessage (fun () -> Llama2cTokenizer.load path 500 |> ignore) [ path; "bytes are left" ] "too small"
            expectThrowsMessage (fun () -> Llama2cTokenizer.load path 513 |> ignore) [ path; "piece 512" ] "too large"
        }
        test "a truncated or corrupt file is an error naming it" {
            use dir = new TempDir()
            let bytes = File.ReadAllBytes(stories260K "tok512.bin")
            let cut = dir.File "cut.bin"
            File.WriteAllBytes(cut, bytes[.. bytes.Length - 3])
            expectThrowsMessage (fun () -> Llama2cTokenizer.load cut 512 |> ignore) [ cut; "ends" ] "truncated"
            let neg = dir.File "neg.bin"
            let b = Array.copy bytes
            BitConverter.TryWriteBytes(Span(b, 8, 4), -5) |> ignore
            File.WriteAllBytes(neg, b)
            expectThrowsMessage (fun () -> Llama2cTokenizer.load neg 512 |> ignore) [ neg; "negative length" ] "negative length"
            expectThrowsMessage (fun () -> Llama2cTokenizer.load (dir.File "missing.bin") 512 |> ignore) [ "missing.bin" ] "missing"
        }
    ]

// ---------------------------------------------------------------------------------------------- compact vocabulary

/// Base-id corpora over a small base vocabulary.
let private smallCorpus =
    gen {
        let! baseSize = Gen.choose (8, 60)
        let! docs = Gen.listOf (Gen.arrayOf (Gen.choose (0, baseSize - 1)))
        let! k = Gen.choose (5, baseSize + 4)
        return baseSize, List.toArray docs, k
    }

let private compactTests =
    testList "compact vocabulary" [
        test "a hand-counted corpus: order by count, ties by base id, the rest [UNK], specials last" {
            // counts: 5→3, 3→2, 9→2, 7→1, 2→1, 11→1; K = 8 keeps 4 tokens: 5 (3), 3 and 9 (2, tie → lower id first), 2 (1; beats 7 and 11 on id).
            let docs = [| [| 5; 3; 5; 7 |]; [| 3; 5; 9; 9 |]; [| 2; 11 |] |]
            let counts = CompactVocab.countTokens 12 docs
            let v = CompactVocab.ofCounts "toy" 8 [] counts
            Expect.sequenceEqual v.BaseIds [| 5; 3; 9; 2 |] "kept base ids in compact order"
            Expect.equal (v.Size, v.Begin, v.End, v.Pad, v.Unk) (8, 4, 5, 6, 7) "specials are the last four ids"
            Expect.sequenceEqual (CompactVocab.toCompact v [| 5; 7; 9; 2; 11; 0 |]) [| 0; 7; 2; 3; 7; 7 |] "unkept tokens → [UNK]"
            Expect.floatClose Accuracy.veryHigh (CompactVocab.coverageOfCounts v counts) (8.0 / 10.0) "8 of 10 tokens are kept"
            let compactDocs = docs |> Array.map (CompactVocab.encodeDocument v true)
            Expect.sequenceEqual compactDocs[0] [| 4; 0; 1; 0; 7; 5 |] "[BEGIN] 5 3 5 [UNK] [END]"
            Expect.floatClose Accuracy.veryHigh (CompactVocab.coverage v (Array.concat compactDocs)) (8.0 / 10.0) "coverage ignores [BEGIN]/[END]"
        }
        test "excluded ids are never kept; unseen tokens fill by base id" {
            let counts = CompactVocab.countTokens 10 [ [| 9; 9; 9; 1 |] ]
            let v = CompactVocab.ofCounts "toy" 8 [ 9 ] counts
            Expect.sequenceEqual v.BaseIds [| 1; 0; 2; 3 |] "9 excluded; zero counts in id order"
            Expect.equal (CompactVocab.toCompact v [| 9 |]) [| v.Unk |] "excluded → [UNK]"
        }
        testProperty "selection: sorted by (count desc, id asc), and no unkept token beats a kept one" <| Prop.forAll (Arb.fromGen smallCorpus) (fun (baseSize, docs, k) ->
            let counts = CompactVocab.countTokens baseSize docs
            let keep = min (k - 4) baseSize
            let k = keep + 4
            let v = CompactVocab.ofCounts "toy" k [] counts
            // Independent count of the corpus.
            let hand = docs |> Array.concat |> Array.countBy id |> Map.ofArray
            let c i = Map.tryFind i hand |> Option.defaultValue 0 |> int64
            let kept = set v.BaseIds
            let sorted = v.BaseIds |> Array.pairwise |> Array.forall (fun (a, b) -> c a > c b || (c a = c b && a < b))
            let dominated =
                [ 0 .. baseSize - 1 ] |> List.filter (kept.Contains >> not)
                |> List.forall (fun u -> v.BaseIds |> Array.forall (fun kid -> c kid > c u || (c kid = c u && kid < u)))
            let total = docs |> Array.sumBy Array.length
            let unk = docs |> Array.concat |> Array.filter (kept.Contains >> not) |> Array.length
            let cov = CompactVocab.coverage v (docs |> Array.collect (CompactVocab.toCompact v))
            v.BaseIds.Length = keep && sorted && dominated
            && (total = 0 || abs (cov - float (total - unk) / float total) < 1e-12))
        testProperty "toBase inverts toCompact on kept tokens" <| Prop.forAll (Arb.fromGen smallCorpus) (fun (baseSize, docs, k) ->
            let v = CompactVocab.ofCounts "toy" (min k (baseSize + 4)) [] (CompactVocab.countTokens baseSize docs)
            let ids = v.BaseIds
            CompactVocab.toBase v (CompactVocab.toCompact v ids) = ids)
        test "decoding goes through GPT-2 and shows specials by name" {
            let g = Gpt2Tokenizer.get ()
            let text = "Once upon a time, there was a little girl named Lily."
            let baseIds = Gpt2Tokenizer.encode g text
            let v = CompactVocab.ofCounts "gpt2" 100 [ Gpt2Tokenizer.EndOfTextId ] (CompactVocab.countTokens Gpt2Tokenizer.VocabSize [ baseIds ])
            let t = Tokenizer.compact v
            let doc = Tokenizer.encodeDocument t true true text
            Expect.equal doc[0] v.Begin "[BEGIN] first"
            Expect.equal (Array.last doc) v.End "[END] last"
            Expect.equal (Tokenizer.decode t doc) ("[BEGIN]" + text + "[END]") "decoded"
            Expect.equal (CompactVocab.decodeWith (Gpt2Tokenizer.decode g) true v doc) text "specials skipped"
            let unknown = (Gpt2Tokenizer.encode g " zebra").Length
            Expect.equal (Tokenizer.decode t (Tokenizer.encode t " a little girl zebra")) (" a little girl" + String.replicate unknown "[UNK]") "unknown word"
        }
        testProperty "JSON save → load gives the same vocabulary" <| Prop.forAll (Arb.fromGen smallCorpus) (fun (baseSize, docs, k) ->
            use dir = new TempDir()
            let v = CompactVocab.ofCounts "toy" (min k (baseSize + 4)) [] (CompactVocab.countTokens baseSize docs)
            CompactVocab.save (dir.File "v.json") v
            CompactVocab.load (dir.File "v.json") = v)
        test "the JSON is self-describing" {
            let v = CompactVocab.ofBaseIds "gpt2" 50257 [| 13; 11; 262 |]
            let json = (CompactVocab.toJson v).ToJsonString()
            Expect.equal json """{"kind":"compact","version":1,"base":"gpt2","base_vocab_size":50257,"size":7,"base_ids":[13,11,262],"specials":{"[BEGIN]":3,"[END]":4,"[PAD]":5,"[UNK]":6}}""" "shape"
        }
        test "corrupt vocabulary files get errors naming the file and field" {
            use dir = new TempDir()
            let path = dir.File "vocab.json"
            let good = """{"kind":"compact","base":"gpt2","base_vocab_size":50257,"size":7,"base_ids":[13,11,262],"specials":{"[BEGIN]":3,"[END]":4,"[PAD]":5,"[UNK]":6}}"""
            File.WriteAllText(path, good)
            Expect.sequenceEqual (CompactVocab.load path).BaseIds [| 13; 11; 262 |] "the good file loads"
            let cases =
                [ good.Replace("[13,11,262]", "[13,11,13]"), "base_ids", "twice"
                  good.Replace("[13,11,262]", "[13,11,50257]"), "base_ids", "outside"
                  good.Replace("[13,11,262]", "[13,\"11\",262]"), "base_ids[1]", "integer"
                  good.Replace("\"size\":7", "\"size\":\"7\""), "size", "integer"
                  good.Replace("\"size\":7", "\"size\":8"), "size", "base_ids holds 3"
                  good.Replace("\"[PAD]\":5", "\"[PAD]\":6"), "specials.[PAD]", "expected 5"
                  good.Replace("\"kind\":\"compact\"", "\"kind\":\"bpe\""), "kind", "compact"
                  good.Replace("\"base\":\"gpt2\",", ""), "base", "missing"
                  "{\"kind\":", "(root)", "JSON" ]
            for text, field, problem in cases do
                File.WriteAllText(path, text)
                expectThrowsMessage (fun () -> CompactVocab.load path |> ignore) [ path; field; problem ] (sprintf "%s / %s" field problem)
        }
    ]

// ---------------------------------------------------------------------------------------------- Tokenizer union

let private unionTests =
    testList "Tokenizer" [
        test "special ids and sizes per kind" {
            let g = Tokenizer.gpt2 ()
            Expect.equal (Tokenizer.vocabSize g, Tokenizer.bos g, Tokenizer.eos g, Tokenizer.pad g) (50257, Some 50256, Some 50256, None) "gpt2"
            let l = Tokenizer.Llama2c tok512.Value
            Expect.equal (Tokenizer.vocabSize l, Tokenizer.bos l, Tokenizer.eos l, Tokenizer.unk l) (512, Some 1, Some 2, Some 0) "llama2c"
            let c = Tokenizer.compact (CompactVocab.ofBaseIds "gpt2" 50257 [| 13; 11 |])
            Expect.equal (Tokenizer.vocabSize c, Tokenizer.bos c, Tokenizer.eos c, Tokenizer.pad c, Tokenizer.unk c) (6, Some 2, Some 3, Some 4, Some 5) "compact"
        }
        test "save → load keeps each kind and its encoding" {
            use dir = new TempDir()
            let text = "Once upon a time, Lily saw a dog."
            let v = CompactVocab.ofCounts "gpt2" 64 [ 50256 ] (CompactVocab.countTokens 50257 [ Gpt2Tokenizer.encode (Gpt2Tokenizer.get ()) text ])
            for t in [ Tokenizer.gpt2 (); Tokenizer.compact v; Tokenizer.Llama2c tok512.Value ] do
                let path = dir.File(Tokenizer.describe t + ".json")
                Tokenizer.save path t
                let back = Tokenizer.load path
                Expect.equal (Tokenizer.describe back) (Tokenizer.describe t) "kind"
                Expect.sequenceEqual (Tokenizer.encode back text) (Tokenizer.encode t text) (Tokenizer.describe t)
                Expect.equal (Tokenizer.decode back (Tokenizer.encode t text)) (Tokenizer.decode t (Tokenizer.encode t text)) "decode"
            match Tokenizer.load (dir.File "llama2c(512).json") with
            | Tokenizer.Llama2c w ->
                Expect.sequenceEqual w.Pieces tok512.Value.Pieces "pieces embedded"
                Expect.sequenceEqual w.Scores tok512.Value.Scores "scores embedded exactly"
            | other -> failtestf "loaded %s" (Tokenizer.describe other)
        }
        test "corrupt tokenizer JSON gets errors naming the file and field" {
            use dir = new TempDir()
            let path = dir.File "tokenizer.json"
            Tokenizer.save path (Tokenizer.Llama2c tok512.Value)
            let good = File.ReadAllText path
            let cases =
                [ """{"vocab_size":50257}""", "kind"
                  """{"kind":"sentencepiece"}""", "sentencepiece"
                  """{"kind":3}""", "kind"
                  """{"kind":"gpt2","vocab_size":50000}""", "vocab_size"
                  good.Replace("\"max_token_length\":7", "\"max_token_length\":\"7\""), "max_token_length"
                  good.Replace("\"scores\":[", "\"scores\":[\"x\","), "scores[0]"
                  good.Replace("\"pieces\":[\"<unk>\",", "\"pieces\":["), "pieces"
                  "[]", "object" ]
            for text, field in cases do
                File.WriteAllText(path, text)
                expectThrowsMessage (fun () -> Tokenizer.load path |> ignore) [ path; field ] field
        }
    ]

/// GPT-2's shipped encoder.json and vocab.bpe rewritten as a Hugging Face tokenizer.json (no added tokens besides
/// `<|endoftext|>`), so the tokenizer.json reader can be checked against the GPT-2 tokenizer's golden ids.
let private gpt2AsTokenizerJson =
    lazy (
        let read (name: string) =
            use f = File.OpenRead(Paths.data (Path.Combine("tokenizers", "gpt2", name)))
            use z = new IO.Compression.GZipStream(f, IO.Compression.CompressionMode.Decompress)
            use r = new StreamReader(z)
            r.ReadToEnd()
        let vocab = Nodes.JsonNode.Parse(read "encoder.json.gz")
        let merges = Nodes.JsonArray()
        for line in (read "vocab.bpe.gz").Split('\n') do
            let line = line.TrimEnd('\r')
            if line <> "" && not (line.StartsWith "#version") then merges.Add(Nodes.JsonValue.Create line)
        let root = Nodes.JsonObject()
        root["added_tokens"] <- Nodes.JsonNode.Parse """[{"id":50256,"content":"<|endoftext|>","special":true}]"""
        root["normalizer"] <- null
        root["pre_tokenizer"] <- Nodes.JsonNode.Parse """{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true}"""
        let model = Nodes.JsonObject()
        model["type"] <- Nodes.JsonValue.Create "BPE"
        model["vocab"] <- vocab
        model["merges"] <- merges
        root["model"] <- model
        ByteLevelBpe.ofJsonElement "gpt2-tokenizer.json" (JsonDocument.Parse(root.ToJsonString()).RootElement))

let private neoxTokenizer = lazy (Tokenizer.huggingFace (fixture "hf-neox-tiny/tokenizer.json"))

let private hfTests =
    testList "Hugging Face tokenizer.json" [
        testCase "GPT-2 written as a tokenizer.json reproduces the golden ids of every ordinary case" <| fun () ->
            let t = gpt2AsTokenizerJson.Force()
            Expect.equal t.VocabSize Gpt2Tokenizer.VocabSize "ids"
            let cases = golden.Force() |> List.filter (fun c -> not c.Special)
            Expect.isGreaterThan cases.Length 5 "golden cases"
            for c in cases do Expect.sequenceEqual (ByteLevelBpe.encode t c.Text) c.Ids (sprintf "%A" c.Text)

        testPropertyWithConfig (config 200) "GPT-2 as a tokenizer.json encodes any text as the GPT-2 tokenizer does, and decodes it back" <| Prop.forAll validTextArb (fun text ->
                let t = gpt2AsTokenizerJson.Force()
                let ids = ByteLevelBpe.encode t text
                Expect.sequenceEqual ids (Gpt2Tokenizer.encode (Gpt2Tokenizer.get ()) text) "same ids"
                Expect.equal (ByteLevelBpe.decode t ids) text "round trip")

        testCase "GPT-NeoX's shape: merges, runs of spaces as added tokens (leftmost longest), NFC, specials as text" <| fun () ->
            let t = neoxTokenizer.Force()
            let id (piece: string) =
                match t with
                | HfBpe b -> (b.Bpe.Vocabulary: Collections.Generic.IReadOnlyDictionary<string, int>)[piece]
                | _ -> failtest "a tokenizer.json tokenizer"
            Expect.equal (Tokenizer.vocabSize t) 270 "ids"
            Expect.equal (Tokenizer.bos t, Tokenizer.eos t, Tokenizer.pad t, Tokenizer.unk t) (Some 0, Some 0, Some 1, None) "specials"
            Expect.sequenceEqual (Tokenizer.encode t "hello") [| id "hello" |] "merged word"
            Expect.sequenceEqual (Tokenizer.encode t "hello cat") [| id "hello"; id "\u0120cat" |] "merged words"
            // 2 and 3 spaces are added tokens 269 and 268; 4 spaces = 3 (longest first) then the space of " on"
            Expect.sequenceEqual (Tokenizer.encode t "hello  on") [| id "hello"; 269; id "on" |] "two spaces"
            Expect.sequenceEqual (Tokenizer.encode t "hello    on") [| id "hello"; 268; id "\u0120on" |] "four spaces"
            // e + combining acute is NFC-normalised to é (two bytes, two byte tokens)
            Expect.equal (Tokenizer.decode t (Tokenizer.encode t "cafe\u0301")) "caf\u00e9" "NFC"
            Expect.isFalse (Array.contains 0 (Tokenizer.encode t "a<|endoftext|>b")) "<|endoftext|> is ordinary text"
            Expect.sequenceEqual (Tokenizer.encodeDocument t true true "hello") [| 0; id "hello"; 0 |] "document markers"
            Expect.equal (Tokenizer.decode t [| 0 |]) "<|endoftext|>" "special decodes to its content"
            // ids of a padded model vocabulary beyond the tokenizer's decode to nothing; negative ids are refused
            Expect.equal (Tokenizer.decode t [| id "hello"; 300; id "\u0120cat" |]) "hello cat" "padding id"
            Expect.equal (Tokenizer.tokenText t 319) "" "padding id alone"
            expectThrowsMessage (fun () -> Tokenizer.decode t [| -1 |] |> ignore) [ "token id -1" ] "negative id"

        testPropertyWithConfig (config 100) "GPT-NeoX's shape: NFC text decodes back; saved as JSON it encodes the same" <| Prop.forAll validTextArb (fun text ->
                let t = neoxTokenizer.Force()
                let ids = Tokenizer.encode t text
                Expect.equal (Tokenizer.decode t ids) (text.Normalize(NormalizationForm.FormC)) "round trip"
                let again = Tokenizer.ofJsonElement "saved" (JsonSerializer.SerializeToElement(Tokenizer.toJson t))
                Expect.sequenceEqual (Tokenizer.encode again text) ids "same ids after save/load"
                true)

        testCase "the Pythia-shaped fixture folder finds its own tokenizer.json; damaged files fail naming the field" <| fun () ->
            let t = Transcoders.Models.ModelTokenizer.find (fixture "hf-neox-tiny")
            Expect.equal (Tokenizer.describe t) "tokenizer.json(270)" "the folder's tokenizer"
            use dir = new TempDir()
            let original = File.ReadAllText(fixture "hf-neox-tiny/tokenizer.json")
            let damaged (edit: Nodes.JsonObject -> unit) =
                let o = Nodes.JsonNode.Parse(original).AsObject()
                edit o
                File.WriteAllText(dir.File "tokenizer.json", o.ToJsonString())
                fun () -> ByteLevelBpe.load (dir.File "tokenizer.json") |> ignore
            expectThrowsMessage (damaged (fun o -> o["model"].AsObject().Remove("merges") |> ignore)) [ dir.File "tokenizer.json"; "'model.merges'" ] "no merges"
            expectThrowsMessage (damaged (fun o -> o["model"].AsObject().["vocab"].AsObject().Remove("a") |> ignore)) [ "'model.vocab'"; "byte 97" ] "a byte missing"
            expectThrowsMessage (damaged (fun o -> o["model"].AsObject().["type"] <- Nodes.JsonValue.Create("WordPiece"))) [ "'model.type' is 'WordPiece'" ] "not BPE"
            expectThrowsMessage (damaged (fun o -> o["pre_tokenizer"].AsObject().["add_prefix_space"] <- Nodes.JsonValue.Create(true))) [ "'pre_tokenizer.add_prefix_space'" ] "prefix space"
            expectThrowsMessage (damaged (fun o -> o["normalizer"] <- Nodes.JsonNode.Parse """{"type":"Lowercase"}""")) [ "'normalizer'"; "Lowercase" ] "other normalizer"
            expectThrowsMessage (damaged (fun o -> o["model"].AsObject().["merges"].AsArray().Add(Nodes.JsonValue.Create("x y")))) [ "'model.merges'"; "\"xy\"" ] "merge into nothing"
    ]

let tests = testList "Text.Tokenizers" [ gpt2Tests; llamaTests; compactTests; unionTests; hfTests ]
