#!/usr/bin/env bash
# Reproduces the "Roll-out on predictable data" numbers of tokenizers_visual/README.md (run from the repository
# root): next-only and the TokenUnify mixture, 1600 steps each, training seeds 0-4, on moving-disc volumes.
# Runs go to runs/tu-vol (ignored by git); the summary to tokenizers_visual/results/.
set -euo pipefail
STUDY="${PYTHON:-.venv/bin/python} -m mmreduce.tokenizers_visual.tokenunify.rollout_study"
SEEDS="${SEEDS:-0 1 2 3 4}"
mkdir -p runs/tu-vol
for s in $SEEDS; do
  $STUDY train --data volumes --objective next --steps 1600 --seed "$s" --out runs/tu-vol/next-s"$s"
  $STUDY train --data volumes --objective tokenunify --steps 1600 --seed "$s" --out runs/tu-vol/tu-s"$s"
done
list() { local out=""; for s in $SEEDS; do out="$out,runs/tu-vol/$1-s$s"; done; echo "${out#,}"; }
$STUDY eval --runs next="$(list next)" tokenunify="$(list tu)" --json tokenizers_visual/results/tokenunify-volumes-rollout.json
$STUDY table tokenizers_visual/results/tokenunify-volumes-rollout.json
