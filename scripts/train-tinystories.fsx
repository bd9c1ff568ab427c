// Trains a small GPT on the shipped TinyStories and generates a story: the language-model pipeline as a script.
// Build once, then run:   dotnet build src/Transcoders -c Release && dotnet fsi scripts/train-tinystories.fsx [steps] [file]
// With a TinyStories-format file, the script trains on it (a 512-token vocabulary, shards beside the run) instead of
// the shipped stories (the tests pass a small one).
#load "load.fsx"

open System.IO
open Transcoders.Models
open Transcoders.Tensors
open Transcoders.Text
open Transcoders.Training

let steps, files, vocab, folder =
    match fsi.CommandLineArgs |> Array.tail with
    | [| n; file |] -> int n, [ file ], 512, Path.Combine("runs", "train-tinystories", "corpus")
    | [| n |] -> int n, Corpus.shippedFiles (), 4096, TinyStories.defaultFolder (Some 4096)
    | _ -> 300, Corpus.shippedFiles (), 4096, TinyStories.defaultFolder (Some 4096)
let device = Device.resolve Device.Auto
Device.seed 0L

// text → tokens: a compact 4,096-token vocabulary counted on the training stories, shards in the cache folder
let corpus = TinyStories.prepare files (Some vocab) folder
let train, validation = TinyStories.tokens corpus
printfn "%d training tokens, %d validation tokens, %s" train.Length validation.Length (Tokenizer.describe corpus.Tokenizer)

// a GPT-2-style model, 4 layers of width 128
let config =
    { TransformerConfig.gpt2 with
        DModel = 128; NLayers = 4; NHeads = 4; NKvHeads = 4; DMlp = 512; NCtx = 128
        VocabSize = Tokenizer.vocabSize corpus.Tokenizer }
use model = Transformer.create config device

let training =
    { LmTraining.LmTrainConfig.Default with
        BatchSize = 16
        Ctx = 128
        Train =
            { Trainer.TrainConfig.Default with
                Steps = steps
                Schedule = Schedule.WarmupCosine(2e-3, min 100 (steps / 10), steps, 0.1)
                EvalEvery = max 1 (steps / 3)
                OutputDir = Path.Combine("runs", "train-tinystories")
                Resume = Trainer.Latest } }

let result = LmTraining.train model corpus.Tokenizer train validation training
match result.ModelDir with
| Some dir -> printfn "validation loss %.4f after %d steps; model in %s" (defaultArg result.ValidationLoss nan) result.Run.FinalStep dir
| None -> failwithf "training diverged after %d steps: no final model (checkpoint to use: %s)" result.Run.FinalStep (defaultArg result.Run.BestCheckpoint "none")

// generate: sampled, reproducible by seed
let story =
    Generation.generate model
        { Generation.GenerateOptions.Greedy with MaxNewTokens = 100; Temperature = 0.8; TopK = Some 40; Seed = Some 0L }
        [| (Tokenizer.bos corpus.Tokenizer).Value |]
printfn "%s" (Tokenizer.decode corpus.Tokenizer story.Tokens)
