#!/usr/bin/env bash
# How the shipped default model (data/models/tinystories-gpt) and its coders (data/coders/tinystories-gpt) were made,
# command by command. On 2 CPU cores the model takes about 30 minutes of idle machine (it took 2 h 40 min here, shared
# with other work), the coders about as long. Resumable: rerun the same command after an interruption.
#
#   bash scripts/make-default-model.sh [WORK]        (WORK: scratch folder, default runs/default-model)
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-runs/default-model}"
cli() { dotnet run --project src/Transcoders.Cli -c Release --no-build -- "$@"; }
dotnet tool restore && dotnet build src/Transcoders.Cli -c Release

# 1. The GPT: GPT-2 architecture, 4 layers, d_model 256, 8 heads, context 256, the compact 4,096-token vocabulary of
#    the shipped TinyStories text; 1,200 steps of 16 × 256 tokens (4.9M tokens, 1.6 epochs), AdamW, warm-up + cosine.
cli train-lm --layers 4 --d-model 256 --heads 8 --ctx 256 --batch 16 --steps 1200 --lr 2e-3 --warmup 60 \
    --eval-every 200 --checkpoint-every 100 --seed 1 --out "$work/lm" --resume

# 2. Its coders from one activation stream (the same seed gives the same batches in both commands): per-layer
#    transcoders, skip transcoders and a cross-layer transcoder, then SAEs on hook_mlp_out; TopK (k 32), 2,048
#    features each (8 × d_model), the recipe of CoderDefaults.topK (tied start, 20-step dead window, AuxK 1,024 at 1/4).
cli train-coder "$work/lm/model" --kind transcoder skip-transcoder clt --width 2048 --k 32 \
    --steps 1000 --batch 1024 --checkpoint-every 250 --out "$work/coders"
cli train-coder "$work/lm/model" --kind sae --width 2048 --k 32 \
    --steps 1000 --batch 1024 --checkpoint-every 250 --out "$work/coders-sae"

# 3. Into data/: the model as trained (float32, 17 MB), the coders in float16.
mkdir -p data/models/tinystories-gpt
cp "$work"/lm/model/* data/models/tinystories-gpt/
cp "$work"/lm/metrics.jsonl data/models/tinystories-gpt/
dotnet fsi scripts/ship-coders.fsx "$work/coders" data/coders/tinystories-gpt
dotnet fsi scripts/ship-coders.fsx "$work/coders-sae" data/coders/tinystories-gpt

# 4. The shipped (float16) coders evaluated: dead features over 1M held-out tokens (the training stream past what the
#    coders read), L0, FVU, and the spliced model on 32,768 validation tokens; the table ships beside them.
coders=$(ls -d data/coders/tinystories-gpt/*/)
cli eval-coder data/models/tinystories-gpt --coders $coders --activation-tokens 1000000 --activation-text train \
    --train-offset 1200000 --validation-tokens 32768 --out data/coders/tinystories-gpt
