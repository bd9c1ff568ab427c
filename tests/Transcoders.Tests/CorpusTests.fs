/// Reading TinyStories files, the train/validation split, statistics, and token shards on disk.
module Transcoders.Tests.CorpusTests

open System
open System.IO
open System.IO.Compression
open System.Text
open Expecto
open FsCheck
open FsCheck.FSharp
open Transcoders.Files
open Transcoders.Text
open Transcoders.Tests.Fixtures

let private config n = { FsCheckConfig.defaultConfig with maxTest = n }

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

let private writeGzip (path: string) (bytes: byte[]) =
    use f = File.Create path
    use g = new GZipStream(f, CompressionLevel.Fastest)
    g.Write(bytes, 0, bytes.Length)

let private texts (stories: seq<Corpus.Story>) = stories |> Seq.map (fun s -> s.Text) |> Seq.toList

// ---------------------------------------------------------------------------------------------- reading

/// Story text: valid Unicode with no delimiter and no carriage return, trimmed.
let private storyText = TokenizerTests.validText |> Gen.map (fun s -> s.Replace("<|", "< |").Replace("\r", "").Trim())

let private readingTests =
    testList "reading" [
        test "stories split at <|endoftext|> lines, trimmed, empty ones skipped, CRLF and inline delimiters" {
            use dir = new TempDir()
            let text =
                "\n  Once upon a time.\n\nThe end.  \n<|endoftext|>\n<|endoftext|>\n   \n<|endoftext|>\r\n"
                + "Tom ran.\r\nHe fell.\r\n<|endoftext|>Lily sang.<|endoftext|>Ben\n\ndanced."
            let expected = [ "Once upon a time.\n\nThe end."; "Tom ran.\nHe fell."; "Lily sang."; "Ben\n\ndanced." ]
            let plain = dir.File "s.txt"
            File.WriteAllText(plain, text, UTF8Encoding false)
            Expect.equal (texts (Corpus.readStories plain)) expected "plain text"
            let gz = dir.File "s.txt.gz"
            writeGzip gz (UTF8Encoding(false).GetBytes text)
            Expect.equal (texts (Corpus.readStories gz)) expected "gzipped"
            Expect.equal (Corpus.readStories plain |> Seq.map (fun s -> s.Index) |> Seq.toList) [ 0; 1; 2; 3 ] "indices"
        }
        test "a file without delimiters is one story; an empty file has none" {
            use dir = new TempDir()
            File.WriteAllText(dir.File "a.txt", "Spot. Spot saw the car.\n\nIt was red.\n")
            Expect.equal (texts (Corpus.readStories (dir.File "a.txt"))) [ "Spot. Spot saw the car.\n\nIt was red." ] "one story"
            File.WriteAllText(dir.File "e.txt", "")
            Expect.isEmpty (texts (Corpus.readStories (dir.File "e.txt"))) "no story"
        }
        testPropertyWithConfig (config 100) "stories written with delimiters read back" <| Prop.forAll (Arb.fromGen (Gen.listOf storyText)) (fun stories ->
                use dir = new TempDir()
                let path = dir.File "p.txt"
                File.WriteAllText(path, String.Join("", stories |> List.map (fun s -> s + "\n<|endoftext|>\n")), UTF8Encoding false)
                texts (Corpus.readStories path) = (stories |> List.filter (fun s -> s <> "")))
        test "the shipped files hold the story counts SOURCES.md lists" {
            let counts = Corpus.shippedFiles () |> List.map (fun f -> Path.GetFileName f, Seq.length (Corpus.readStories f))
            Expect.equal counts
                [ "ts_train_sample_a.txt.gz", 3115; "ts_train_sample_b.txt.gz", 3115; "ts_v1_train_head.txt.gz", 2308
                  "ts_v1_valid_head.txt.gz", 1; "ts_v2_valid_head_part1.txt.gz", 3228; "ts_v2_valid_head_part2.txt.gz", 3228 ] "stories per file"
        }
        test "invalid UTF-8 is an error naming the file and the byte offset" {
            use dir = new TempDir()
            for offset in [ 5; 70_000; 131_071 ] do
                let bytes = Array.init (offset + 100) (fun i -> if i % 50 = 49 then 10uy else 97uy)
                bytes[offset] <- 0xFFuy
                let path = dir.File(sprintf "bad%d.txt" offset)
                File.WriteAllBytes(path, bytes)
                let line = bytes[.. offset - 1] |> Array.filter ((=) 10uy) |> Array.length |> (+) 1
                expectThrowsMessage (fun () -> Corpus.readStories path |> Seq.iter ignore) [ path; sprintf "byte offset %d " offset; sprintf "line %d)" line ] "plain"
                let gz = path + ".gz"
                writeGzip gz bytes
                expectThrowsMessage (fun () -> Corpus.readStories gz |> Seq.iter ignore) [ gz; sprintf "byte offset %d " offset; "decompressed" ] "gzip"
            let cut = dir.File "cut.txt"
            File.WriteAllBytes(cut, [| 97uy; 98uy; 0xE6uy; 0x9Duy |])
            expectThrowsMessage (fun () -> Corpus.readStories cut |> Seq.iter ignore) [ cut; "byte offset 2 " ] "a character cut at the end"
        }
        test "a missing file is an error naming it" {
            expectThrowsMessage (fun () -> Corpus.readStories "/nonexistent/stories.txt" |> Seq.iter ignore) [ "/nonexistent/stories.txt"; "not found" ] "missing"
        }
    ]

// ---------------------------------------------------------------------------------------------- split and stats

let private story src i text : Corpus.Story = { Source = src; Index = i; Text = text }

let private splitTests =
    testList "split and stats" [
        testProperty "held-out split is a function of the story text and seed" <| fun (texts: NonNull<string> list) (seed: int64) ->
            let rule = Corpus.HeldOut(0.3, seed)
            let a = texts |> List.mapi (fun i t -> Corpus.assign rule (story "a.txt" i t.Get))
            let b = texts |> List.rev |> List.mapi (fun i t -> Corpus.assign rule (story "b.txt" i t.Get)) |> List.rev
            a = b
        test "held-out fraction is respected on many stories; a new seed gives another split" {
            let stories = [ for i in 0 .. 19_999 -> story "x" i (sprintf "story number %d" i) ]
            let valid seed frac = stories |> List.filter (fun s -> Corpus.assign (Corpus.HeldOut(frac, seed)) s = Corpus.Validation)
            let v = valid 1L 0.1
            Expect.isTrue (abs (float v.Length / 20_000.0 - 0.1) < 0.01) (sprintf "%d of 20000 near 10%%" v.Length)
            Expect.notEqual (valid 2L 0.1) v "other seed"
            Expect.isEmpty (valid 1L 0.0) "fraction 0"
            Expect.equal (valid 1L 1.0).Length 20_000 "fraction 1"
        }
        test "by-file split sends the named files to validation" {
            let rule = Corpus.ByFile [ "ts_v1_valid_head.txt.gz" ]
            Expect.equal (Corpus.assign rule (story "/d/ts_v1_valid_head.txt.gz" 0 "x")) Corpus.Validation "named"
            Expect.equal (Corpus.assign rule (story "/d/ts_v1_train_head.txt.gz" 0 "x")) Corpus.Train "other"
        }
        test "stats count stories, tokens, distinct tokens and compact coverage" {
            use dir = new TempDir()
            let a = dir.File "a.txt"
            File.WriteAllText(a, "the cat\n<|endoftext|>\nthe dog the end\n<|endoftext|>\n")
            let g = Gpt2Tokenizer.get ()
            let t1, t2 = Gpt2Tokenizer.encode g "the cat", Gpt2Tokenizer.encode g "the dog the end"
            let s = Corpus.stats (Tokenizer.gpt2 ()) [ a ]
            Expect.equal (s.Files, s.Stories, s.Characters) (1, 2L, 22L) "files, stories, characters"
            Expect.equal s.Tokens (int64 (t1.Length + t2.Length)) "tokens"
            Expect.equal s.DistinctTokens (Array.append t1 t2 |> Array.distinct |> Array.length) "distinct"
            Expect.isNone s.Coverage "no coverage for GPT-2"
            // keep only "the" and " the"; the coverage is counted here by hand
            let all = Array.append t1 t2
            let keepIds = [| all[0]; t2[2] |] |> Array.distinct
            let v = CompactVocab.ofBaseIds "gpt2" 50257 keepIds
            let sc = Corpus.stats (Tokenizer.compact v) [ a ]
            let keptCount = all |> Array.filter (fun i -> Array.contains i keepIds) |> Array.length
            Expect.equal sc.Tokens (int64 all.Length) "same token count"
            Expect.floatClose Accuracy.veryHigh sc.Coverage.Value (float keptCount / float all.Length) "coverage"
        }
        test "a compact vocabulary built from a corpus keeps its most frequent tokens" {
            let slice = TokenizerTests.tinyStories 60
            use dir = new TempDir()
            let f = dir.File "slice.txt"
            File.WriteAllText(f, String.Join("", slice |> Array.map (fun s -> s + "\n<|endoftext|>\n")))
            let g = Gpt2Tokenizer.get ()
            let v = Corpus.buildCompactVocab g 54 [ f ]
            let counts = slice |> Array.collect (Gpt2Tokenizer.encode g) |> Array.countBy id |> Array.sortBy (fun (id, c) -> -c, id)
            Expect.sequenceEqual v.BaseIds (counts |> Array.take 50 |> Array.map fst) "top 50 by count then id"
            Expect.equal (Gpt2Tokenizer.decode g [| v.BaseIds[0] |]) "." "the most frequent token of TinyStories is '.' (as in tinymodel)"
        }
    ]

// ---------------------------------------------------------------------------------------------- shards

let private toyTokenizer vocab =
    // A compact vocabulary over GPT-2 ids with `vocab` ids: any size up to 50,257 + 4.
    Tokenizer.compact (CompactVocab.ofBaseIds "gpt2" 50257 [| 0 .. vocab - 5 |])

let private info split : TokenShards.ShardInfo = { Split = split; SplitRule = "test"; Bos = true; Eos = false; Sources = [] }

/// Documents over a small (uint16) or GPT-2-sized vocabulary, and a shard size.
let private shardDocs =
    gen {
        let! big = Gen.elements [ false; true ]
        let vocab = if big then 50_000 else 300
        let! docs = Gen.listOf (Gen.arrayOf (Gen.choose (0, vocab - 1)))
        let! perShard = Gen.choose (1, 50)
        return vocab, List.toArray docs, perShard
    }

let private shardTests =
    testList "token shards" [
        testPropertyWithConfig (config 40) "write → read gives the same stream, counts and dtype" <| Prop.forAll (Arb.fromGen shardDocs) (fun (vocab, docs, perShard) ->
                use dir = new TempDir()
                let t = if vocab = 50_000 then Tokenizer.gpt2 () else toyTokenizer vocab
                let folder = dir.File "train"
                let meta = TokenShards.write folder t (info "train") (int64 perShard) docs
                let back, tokens = TokenShards.read folder
                let stream = Array.concat docs
                tokens = stream && back = meta && meta.Documents = int64 docs.Length && meta.Tokens = int64 stream.Length
                && meta.DType = TokenShards.UInt16
                && meta.Shards.Length = (stream.Length + perShard - 1) / perShard
                && Directory.GetFiles(dir.Path) |> Array.isEmpty && Directory.GetDirectories(dir.Path) = [| folder |])
        test "vocabularies over 65,536 ids use int32" {
            use dir = new TempDir()
            let t = Tokenizer.Llama2c(Llama2cTokenizer.create "toy" (Array.init 70_000 (fun i -> if i >= 3 && i < 259 then sprintf "<0x%02X>" (i - 3) else sprintf "p%d" i)) (Array.zeroCreate 70_000) 8)
            let docs = [| [| 0; 69_999; 65_536 |]; [| 5 |] |]
            let meta = TokenShards.write (dir.File "s") t (info "train") 2L docs
            Expect.equal meta.DType TokenShards.Int32 "dtype"
            Expect.sequenceEqual (TokenShards.readTokens (dir.File "s")) (Array.concat docs) "tokens"
            Expect.equal (FileInfo(dir.File "s/shard_00000.bin").Length) (32L + 2L * 4L) "header + 2 int32"
        }
        test "the meta records the tokenizer so the folder is self-contained" {
            use dir = new TempDir()
            let t = Tokenizer.Llama2c(Llama2cTokenizer.load (Paths.data "models/stories260K/tok512.bin") 512)
            let meta = TokenShards.write (dir.File "s") t (info "validation") 100L [ Tokenizer.encodeDocument t true false "Once upon a time." ]
            let t2 = TokenShards.tokenizerOf (TokenShards.readMeta (dir.File "s"))
            Expect.equal (Tokenizer.decode t2 (TokenShards.readTokens (dir.File "s"))) "Once upon a time." "decoded with the recorded tokenizer"
            Expect.equal meta.Split "validation" "split"
        }
        test "rewriting replaces the old shards; a foreign folder is never replaced" {
            use dir = new TempDir()
            let t = toyTokenizer 100
            TokenShards.write (dir.File "s") t (info "train") 2L [ [| 1; 2; 3; 4; 5; 6 |] ] |> ignore
            TokenShards.write (dir.File "s") t (info "train") 2L [ [| 7 |] ] |> ignore
            Expect.sequenceEqual (Directory.GetFiles(dir.File "s") |> Array.map Path.GetFileName |> Array.sort) [| "meta.json"; "shard_00000.bin" |] "old shards gone"
            Expect.sequenceEqual (TokenShards.readTokens (dir.File "s")) [| 7 |] "new tokens"
            Directory.CreateDirectory(dir.File "mine") |> ignore
            File.WriteAllText(dir.File "mine/notes.txt", "keep me")
            expectThrowsMessage (fun () -> TokenShards.write (dir.File "mine") t (info "train") 2L [ [| 1 |] ] |> ignore) [ "mine"; "refusing" ] "foreign folder"
            Expect.isTrue (File.Exists(dir.File "mine/notes.txt")) "untouched"
            expectThrowsMessage (fun () -> TokenShards.write (dir.File "x") t (info "train") 2L [ [| 1; 100 |] ] |> ignore) [ "100"; "0..99" ] "id outside the vocabulary"
            Expect.isFalse (Directory.Exists(dir.File "x")) "nothing left behind by a failed write"
            Expect.isEmpty (Directory.GetDirectories(dir.Path) |> Array.filter (fun d -> d.Contains ".tmp-")) "no temporary folder left"
        }
        test "corrupt shards get errors naming the file" {
            use dir = new TempDir()
            let t = toyTokenizer 100
            let folder = dir.File "s"
            let write () = TokenShards.write folder t (info "train") 4L [ [| 1; 2; 3; 4; 5; 6 |] ] |> ignore
            let shard = Path.Combine(folder, "shard_00001.bin")
            let corrupt (f: byte[] -> byte[]) (expected: string) =
                write ()
                File.WriteAllBytes(shard, f (File.ReadAllBytes shard))
                expectThrowsMessage (fun () -> TokenShards.read folder |> ignore) [ shard; expected ] expected
            corrupt (fun b -> b[.. b.Length - 2]) "bytes, expected"
            corrupt (fun b -> (b[0] <- 88uy); b) "magic"
            corrupt (fun b -> (b[8] <- 9uy); b) "version 9"
            corrupt (fun b -> (b[12] <- 4uy); b) "4 bytes per token"
            corrupt (fun b -> (b[16] <- 3uy); b) "counts 3 tokens"
            corrupt (fun b -> (b[24] <- 0uy); b) "starts at token 0, expected 4"
            corrupt (fun b -> (b[32] <- 200uy); b) "outside the vocabulary"
            write ()
            File.Delete shard
            expectThrowsMessage (fun () -> TokenShards.read folder |> ignore) [ shard; "missing" ] "missing shard"
        }
        test "corrupt meta.json gets errors naming the file and field" {
            use dir = new TempDir()
            let folder = dir.File "s"
            TokenShards.write folder (toyTokenizer 100) (info "train") 4L [ [| 1; 2; 3; 4; 5; 6 |] ] |> ignore
            let metaPath = Path.Combine(folder, "meta.json")
            let good = File.ReadAllText metaPath
            let cases =
                [ good.Replace("\"tokens\": 6", "\"tokens\": 7"), "tokens"
                  good.Replace("\"tokens\": 6", "\"tokens\": \"6\""), "tokens"
                  good.Replace("\"dtype\": \"uint16\"", "\"dtype\": \"float32\""), "dtype"
                  good.Replace("\"bos\": true", "\"bos\": 1"), "bos"
                  good.Replace("shard_00001.bin", "../../etc/passwd"), "shards[1].file"
                  good.Replace("\"version\": 1", "\"version\": 2"), "version"
                  good.Replace("\"split\": \"train\",", ""), "split"
                  "{", "JSON" ]
            for text, field in cases do
                File.WriteAllText(metaPath, text)
                expectThrowsMessage (fun () -> TokenShards.read folder |> ignore) [ metaPath; field ] field
            File.Delete metaPath
            expectThrowsMessage (fun () -> TokenShards.read folder |> ignore) [ folder; "meta.json" ] "no meta"
        }
        test "prepare splits a corpus slice into train and validation shards that decode to the stories" {
            use dir = new TempDir()
            let stories = TokenizerTests.tinyStories 120
            let a, b = dir.File "a.txt", dir.File "b.txt.gz"
            File.WriteAllText(a, String.Join("", stories[.. 99] |> Array.map (fun s -> s + "\n<|endoftext|>\n")))
            writeGzip b (Encoding.UTF8.GetBytes(String.Join("", stories[100 ..] |> Array.map (fun s -> s + "\n<|endoftext|>\n"))))
            let g = Tokenizer.gpt2 ()
            let opts = { TokenShards.PrepareOptions.Default with Split = Corpus.ByFile [ "b.txt.gz" ]; TokensPerShard = 5000L }
            let train, valid = TokenShards.prepare g [ a; b ] opts (dir.File "out")
            Expect.equal (train.Documents, valid.Documents) (100L, 20L) "documents per split"
            Expect.equal train.Sources [ { TokenShards.SourceFile.Path = a; Bytes = FileInfo(a).Length }; { TokenShards.SourceFile.Path = b; Bytes = FileInfo(b).Length } ] "sources with sizes"
            let docs = TokenShards.readTokens (dir.File "out/train") |> Batches.splitDocuments 50256
            Expect.equal docs.Length 100 "one BOS per document"
            Expect.sequenceEqual (docs |> Array.map (fun d -> Tokenizer.decode g d[1..])) stories[.. 99] "train decodes to the stories, in order"
            Expect.isGreaterThan train.Shards.Length 1 "several shards"
            let held = TokenShards.prepare g [ a; b ] { opts with Split = Corpus.HeldOut(0.25, 7L) } (dir.File "out2")
            Expect.equal ((fst held).Documents + (snd held).Documents) 120L "held-out split keeps every story"
        }
    ]

let tests = testList "Text.Corpus" [ readingTests; splitTests; shardTests ]
