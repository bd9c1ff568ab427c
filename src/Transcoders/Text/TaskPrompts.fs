/// Prompt sets of known interpretability tasks, built from a tokenizer alone (no data file): the greater-than task of
/// Hanna, Liu & Variengien (NeurIPS 2023, arXiv 2305.00586), which the transcoder paper studies on GPT-2 small.
module Transcoders.Text.TaskPrompts

open System

/// One greater-than prompt: "The {Noun} lasted from the year {Century}{Year} to the year {Century}"; the model
/// should put its probability on two-digit tokens greater than `Year`.
type GreaterThanPrompt =
    { Text: string
      /// The same sentence with the start year set to `{Century}01` (the "01" corrupted prompt).
      Corrupted: string
      Noun: string
      /// The first two digits, XX (10..18).
      Century: int
      /// The last two digits, YY (02..98).
      Year: int }

/// The 120 nouns of the authors' `potential_nouns.txt` (restated as data).
let greaterThanNouns =
    [| "abduction"; "accord"; "affair"; "agreement"; "appraisal"; "assaults"; "assessment"; "attack"; "attempts"; "campaign"
       "captivity"; "case"; "challenge"; "chaos"; "clash"; "collaboration"; "coma"; "competition"; "confrontation"; "consequence"
       "conspiracy"; "construction"; "consultation"; "contact"; "contract"; "convention"; "cooperation"; "custody"; "deal"; "decline"
       "decrease"; "demonstrations"; "development"; "disagreement"; "disorder"; "dispute"; "domination"; "dynasty"; "effect"; "effort"
       "employment"; "endeavor"; "engagement"; "epidemic"; "evaluation"; "exchange"; "existence"; "expansion"; "expedition"; "experiments"
       "fall"; "fame"; "flights"; "friendship"; "growth"; "hardship"; "hostility"; "illness"; "impact"; "imprisonment"
       "improvement"; "incarceration"; "increase"; "insurgency"; "invasion"; "investigation"; "journey"; "kingdom"; "marriage"; "modernization"
       "negotiation"; "notoriety"; "obstruction"; "operation"; "order"; "outbreak"; "outcome"; "overhaul"; "patrols"; "pilgrimage"
       "plague"; "plan"; "practice"; "process"; "program"; "progress"; "project"; "pursuit"; "quest"; "raids"
       "reforms"; "reign"; "relationship"; "retaliation"; "riot"; "rise"; "rivalry"; "romance"; "rule"; "sanctions"
       "shift"; "siege"; "slump"; "stature"; "stint"; "strikes"; "study"; "test"; "testing"; "tests"
       "therapy"; "tour"; "tradition"; "treaty"; "trial"; "trip"; "unemployment"; "voyage"; "warfare"; "work" |]

/// The sentence for a noun, century XX and year YY.
let greaterThanText (noun: string) (century: int) (year: int) =
    sprintf "The %s lasted from the year %02d%02d to the year %02d" noun century year century

/// The ids of the 100 two-digit tokens "00".."99"; fails when the tokenizer does not have each as one token.
let yearTokens (tokenizer: Tokenizer) : int[] =
    Array.init 100 (fun y ->
        let text = sprintf "%02d" y
        match Tokenizer.encode tokenizer text with
        | [| id |] when Tokenizer.decode tokenizer [| id |] = text -> id
        | ids ->
            invalidArg "tokenizer"
                (sprintf "the greater-than task needs \"%s\" as one token, but %s makes %d token(s) of it (an unknown token counts as none): use a GPT-2-vocabulary model (GPT-2 small, Pythia)"
                    text (Tokenizer.describe tokenizer) ids.Length))

/// The (century, year) pairs of 1000..1899 whose " " + year is exactly two tokens, " XX" and a two-character "YY",
/// with YY in 02..98 (the authors' filter).
let greaterThanYears (tokenizer: Tokenizer) : (int * int) list =
    [ for full in 1000 .. 1899 do
        let century, year = full / 100, full % 100
        if year >= 2 && year <= 98 then
            match Tokenizer.encode tokenizer (sprintf " %d" full) with
            | [| _; last |] when Tokenizer.decode tokenizer [| last |] = sprintf "%02d" year -> yield century, year
            | _ -> () ]

/// `n` greater-than prompts: YY cycles through 02..98 (skipping years the tokenizer splits differently, see
/// `greaterThanYears`), each with a seeded choice of century among its valid ones and of noun.
let greaterThan (tokenizer: Tokenizer) (n: int) (seed: int) : GreaterThanPrompt[] =
    if n < 1 then invalidArg "n" (sprintf "n must be at least 1, got %d" n)
    yearTokens tokenizer |> ignore
    let byYear = greaterThanYears tokenizer |> List.groupBy snd |> List.map (fun (y, cs) -> y, cs |> List.map fst |> Array.ofList) |> Array.ofList
    if byYear.Length = 0 then
        invalidArg "tokenizer" (sprintf "%s splits no year of 1000..1899 into \" XX\" and \"YY\"" (Tokenizer.describe tokenizer))
    let rng = Random seed
    Array.init n (fun i ->
        let year, centuries = byYear[i % byYear.Length]
        let century = centuries[rng.Next centuries.Length]
        let noun = greaterThanNouns[rng.Next greaterThanNouns.Length]
        { Text = greaterThanText noun century year
          Corrupted = greaterThanText noun century 1
          Noun = noun
          Century = century
          Year = year })

/// The probability difference Σ_{y > year} p(y) − Σ_{y ≤ year} p(y) over the two-digit tokens, from next-token
/// probabilities over the vocabulary. `restricted`: renormalise over the 100 tokens first (the transcoder paper's
/// variant); otherwise the probabilities are taken as they are (Hanna et al.'s).
let probabilityDifference (restricted: bool) (years: int[]) (year: int) (probs: float[]) : float =
    if years.Length <> 100 then invalidArg "years" (sprintf "expected the 100 two-digit token ids, got %d" years.Length)
    if year < 0 || year > 99 then invalidArg "year" (sprintf "year must be 0..99, got %d" year)
    let p = years |> Array.map (fun id -> probs[id])
    let total = if restricted then Array.sum p else 1.0
    let above = p |> Array.indexed |> Array.sumBy (fun (y, v) -> if y > year then v else 0.0)
    let below = p |> Array.indexed |> Array.sumBy (fun (y, v) -> if y <= year then v else 0.0)
    (above - below) / total
