#!/usr/bin/env bash
# Reproduces every TokenUnify number in tokenizers_visual/README.md (run from the repository root).
# Batch 32 (the CLI default); next-only gets as many steps as the two TokenUnify stages together.
set -euo pipefail
TV="${PYTHON:-.venv/bin/python} -m mmreduce.tokenizers_visual tokenizer"
C=tokenizers_visual/checkpoints
R=tokenizers_visual/results
T="--threads ${THREADS:-1}"
rm -f $R/tokenunify.train.jsonl
$TV train tokenunify $T --objective masked --steps 600 --seed 0 --out $C/tokenunify-stage1 --log $R/tokenunify.train.jsonl
$TV train tokenunify $T --objective tokenunify --init $C/tokenunify-stage1 --steps 600 --seed 0 --out $C/tokenunify-tu --log $R/tokenunify.train.jsonl
$TV train tokenunify $T --objective masked --init $C/tokenunify-stage1 --steps 600 --seed 0 --out $C/tokenunify-masked --log $R/tokenunify.train.jsonl
$TV train tokenunify $T --objective next --steps 1200 --seed 0 --out $C/tokenunify-next --log $R/tokenunify.train.jsonl
$TV eval tokenunify $T --what prediction --checkpoints masked=$C/tokenunify-masked next=$C/tokenunify-next tokenunify=$C/tokenunify-tu --json $R/tokenunify-prediction.json
$TV eval tokenunify $T --what rollout --checkpoints next=$C/tokenunify-next tokenunify=$C/tokenunify-tu --json $R/tokenunify-rollout.json
$TV eval tokenunify $T --what segmentation --checkpoints scratch=scratch masked=$C/tokenunify-masked tokenunify=$C/tokenunify-tu --seeds 0 1 2 --finetune-steps 200 --json $R/tokenunify-segmentation.json
