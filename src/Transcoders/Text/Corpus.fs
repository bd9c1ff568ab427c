/// TinyStories-style text corpora: files of stories separated by `<|endoftext|>`, read as a stream; a
/// deterministic train/validation split by story; tokenization; corpus statistics.
module Transcoders.Text.Corpus

open System
open System.IO
open System.IO.Compression
open System.Text

/// A clear error naming the corpus file and what is wrong (with a byte offset for bad UTF-8).
exception CorpusError of path: string * problem: string with
    override this.Message = sprintf "%s: %s" this.path this.problem

/// The story delimiter of TinyStories' text files.
[<Literal>]
let Delimiter = "<|endoftext|>"

/// One story and where it came from.
type Story =
    { /// The file it was read from.
      Source: string
      /// Its 0-based position among the file's stories.
      Index: int
      Text: string }

let private openMaybeGzip (path: string) : Stream =
    if not (File.Exists path) then raise (FileNotFoundException(sprintf "corpus file not found: %s" path, path))
    let fs = File.OpenRead path
    let magic = Array.zeroCreate<byte> 2
    let n = fs.Read(magic, 0, 2)
    fs.Position <- 0L
    if n = 2 && magic[0] = 0x1fuy && magic[1] = 0x8buy then new GZipStream(fs, CompressionMode.Decompress) :> Stream
    else fs :> Stream

/// The lines of a UTF-8 text file (gzip detected by its magic bytes, so `.txt` and `.txt.gz` both work),
/// streamed. `\n` and `\r\n` end lines. Invalid UTF-8 raises `CorpusError` with the byte offset (in the
/// decompressed text) and line number.
let readLines (path: string) : seq<string> =
    seq {
        use stream = openMaybeGzip path
        let decoder = UTF8Encoding(false, true).GetDecoder()
        let bytes = Array.zeroCreate<byte> (1 <<< 16)
        let chars = Array.zeroCreate<char> (Encoding.UTF8.GetMaxCharCount bytes.Length + 4)
        let line = StringBuilder()
        let mutable offset = 0L
        let mutable lineNo = 1L
        let mutable fin = false
        while not fin do
            let n =
                try stream.Read(bytes, 0, bytes.Length)
                with :? InvalidDataException as e -> raise (CorpusError(path, sprintf "corrupt gzip data after %d bytes of text: %s" offset e.Message))
            fin <- n = 0
            let charCount =
                try decoder.GetChars(bytes, 0, n, chars, 0, fin)
                with :? DecoderFallbackException as e ->
                    let at = max 0 (min n e.Index)
                    let newlines = bytes |> Seq.take at |> Seq.filter ((=) 10uy) |> Seq.length
                    raise (CorpusError(path, sprintf "invalid UTF-8 at byte offset %d (line %d)%s" (offset + int64 e.Index) (lineNo + int64 newlines)
                                                  (if path.EndsWith ".gz" then " of the decompressed text" else "")))
            offset <- offset + int64 n
            for i in 0 .. charCount - 1 do
                match chars[i] with
                | '\n' ->
                    if line.Length > 0 && line[line.Length - 1] = '\r' then line.Length <- line.Length - 1
                    yield line.ToString()
                    line.Clear() |> ignore
                    lineNo <- lineNo + 1L
                | c -> line.Append c |> ignore
        if line.Length > 0 then
            if line[line.Length - 1] = '\r' then line.Length <- line.Length - 1
            yield line.ToString()
    }

/// The stories of one file, streamed: text between `<|endoftext|>` delimiters (on their own line as in
/// TinyStories, or inside a line), lines joined with `\n`, trimmed; empty stories are skipped. A file without
/// delimiters (e.g. `ts_v1_valid_head`) is one story.
let readStories (path: string) : seq<Story> =
    seq {
        let current = StringBuilder()
        let index = ref 0
        let flush () =
            let s = current.ToString().Trim()
            current.Clear() |> ignore
            if s.Length > 0 then
                let story = { Source = path; Index = index.Value; Text = s }
                index.Value <- index.Value + 1
                Some story
            else None
        for line in readLines path do
            let parts = line.Split(Delimiter)
            for i in 0 .. parts.Length - 1 do
                if i > 0 then
                    match flush () with
                    | Some s -> yield s
                    | None -> ()
                if i = 0 && current.Length > 0 then current.Append('\n') |> ignore
                current.Append(parts[i]) |> ignore
        match flush () with
        | Some s -> yield s
        | None -> ()
    }

/// The stories of several files, in file order.
let readAllStories (paths: string seq) : seq<Story> = paths |> Seq.collect readStories

/// The shipped TinyStories files (`data/tinystories/*.txt.gz`), sorted by name.
let shippedFiles () : string list =
    let dir = Transcoders.Files.Paths.data "tinystories"
    if not (Directory.Exists dir) then raise (DirectoryNotFoundException(sprintf "TinyStories folder not found: %s" dir))
    Directory.GetFiles(dir, "*.txt*") |> Array.sort |> Array.toList

/// The shipped file that serves as validation text by default (HF's V1 validation split, head).
let shippedValidationFile = "ts_v1_valid_head.txt.gz"

// ---------------------------------------------------------------------------------------------- split

/// Train or validation.
type Split =
    | Train
    | Validation
    member s.Name = match s with Train -> "train" | Validation -> "validation"

/// How stories are assigned to a split.
type SplitRule =
    /// Stories of files whose name (or full path) is listed go to validation, all others to training.
    | ByFile of validationFiles: string list
    /// Each story goes to validation with probability `fraction`, decided by a seeded hash of its text: the
    /// same story lands in the same split whatever the file order, and duplicates stay together.
    | HeldOut of fraction: float * seed: int64
    member r.Describe =
        match r with
        | ByFile files -> sprintf "by-file(%s)" (String.Join(",", files))
        | HeldOut(f, s) -> sprintf "held-out(fraction=%g, seed=%d, hash=fnv1a64+splitmix64 of UTF-8 text)" f s

/// SplitMix64's finaliser: a bijective 64-bit mix.
let mix64 (x: uint64) =
    let mutable z = x + 0x9E3779B97F4A7C15UL
    z <- (z ^^^ (z >>> 30)) * 0xBF58476D1CE4E5B9UL
    z <- (z ^^^ (z >>> 27)) * 0x94D049BB133111EBUL
    z ^^^ (z >>> 31)

/// FNV-1a 64 over the UTF-8 bytes of `text`.
let fnv1a64 (text: string) =
    let mutable h = 0xcbf29ce484222325UL
    for b in Encoding.UTF8.GetBytes text do
        h <- (h ^^^ uint64 b) * 0x100000001b3UL
    h

/// A story's position in [0, 1) under a seed: `mix64(fnv1a64(text) xor mix64(seed)) / 2^64`.
let storyUnit (seed: int64) (text: string) =
    float (mix64 (fnv1a64 text ^^^ mix64 (uint64 seed)) >>> 11) / 9007199254740992.0

/// The split a story belongs to.
let assign (rule: SplitRule) (story: Story) : Split =
    match rule with
    | ByFile files ->
        let name = Path.GetFileName story.Source
        let full = Path.GetFullPath story.Source
        if files |> List.exists (fun f -> f = name || Path.GetFullPath f = full) then Validation else Train
    | HeldOut(fraction, seed) ->
        if not (fraction >= 0.0 && fraction <= 1.0) then invalidArg "fraction" (sprintf "held-out fraction %g is outside [0, 1]" fraction)
        if storyUnit seed story.Text < fraction then Validation else Train

// ---------------------------------------------------------------------------------------------- tokenize

/// Token ids of each story in order, `encode` run in parallel over chunks of `chunk` stories.
let tokenizeParallel (encode: string -> int[]) (chunk: int) (stories: seq<string>) : seq<int[]> =
    stories
    |> Seq.chunkBySize (max 1 chunk)
    |> Seq.collect (fun c -> Array.Parallel.map encode c)

/// Documents of stories: `Tokenizer.encodeDocument` (BOS/EOS as asked), in parallel, in order.
let tokenize (tokenizer: Tokenizer) (addBos: bool) (addEos: bool) (stories: seq<string>) : seq<int[]> =
    tokenizeParallel (Tokenizer.encodeDocument tokenizer addBos addEos) 256 stories

/// What `stats` reports.
type CorpusStats =
    { Files: int
      Stories: int64
      /// UTF-16 characters of story text.
      Characters: int64
      /// Tokens of the stories' text (no BOS/EOS).
      Tokens: int64
      DistinctTokens: int
      /// For a compact vocabulary: the fraction of tokens that are not `[UNK]`.
      Coverage: float option }

/// Stories, characters, tokens, distinct tokens (and compact-vocabulary coverage) of corpus files.
let stats (tokenizer: Tokenizer) (files: string seq) : CorpusStats =
    let files = Seq.toList files
    let counts = Array.zeroCreate<int64> (Tokenizer.vocabSize tokenizer)
    let stories = ref 0L
    let chars = ref 0L
    let texts =
        readAllStories files
        |> Seq.map (fun s ->
            stories.Value <- stories.Value + 1L
            chars.Value <- chars.Value + int64 s.Text.Length
            s.Text)
    for doc in tokenize tokenizer false false texts do
        for id in doc do counts[id] <- counts[id] + 1L
    let tokens = Array.sum counts
    { Files = files.Length
      Stories = stories.Value
      Characters = chars.Value
      Tokens = tokens
      DistinctTokens = counts |> Array.sumBy (fun c -> if c > 0L then 1 else 0)
      Coverage =
        match tokenizer with
        | Compact(v, _) -> Some(if tokens = 0L then nan else 1.0 - float counts[v.Unk] / float tokens)
        | _ -> None }

/// GPT-2 token counts of corpus files (for choosing a compact vocabulary).
let gpt2Counts (gpt2: Gpt2Tokenizer.Gpt2Bpe) (files: string seq) : int64[] =
    readAllStories files
    |> Seq.map (fun s -> s.Text)
    |> tokenizeParallel (Gpt2Tokenizer.encode gpt2) 256
    |> CompactVocab.countTokens Gpt2Tokenizer.VocabSize

/// A K-id compact vocabulary of the files' most frequent GPT-2 tokens (`<|endoftext|>` is never kept).
let buildCompactVocab (gpt2: Gpt2Tokenizer.Gpt2Bpe) (k: int) (files: string seq) : CompactVocab.CompactVocab =
    CompactVocab.ofCounts "gpt2" k [ Gpt2Tokenizer.EndOfTextId ] (gpt2Counts gpt2 files)
