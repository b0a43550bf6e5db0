# The two commands of the README: `make bench` and `make test`. Both create or reuse .venv first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmreduce-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False
export TOKENIZERS_PARALLELISM := false

.PHONY: setup bench compare panel before latency lmms test test-quick clean-venv

setup: $(STAMP)

# Re-runs only when the pins or the package metadata change (idempotent).
$(STAMP): requirements.txt constraints.txt pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -c constraints.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

# The side-by-side comparison (baseline, random, FastV, PyramidDrop at 33/22/11% of the vision tokens) on the
# bundled tiny-llava-shapes, with the oracle as upper reference; writes runs/bench/results.{json,md} and
# accuracy_vs_flops.png.
bench: setup
	$(PY) -m mmreduce.cli bench --model tiny-llava-shapes --dataset shapes --samples 200 --seed 0 --oracle --out runs/bench

# Rank analysis, G-Search, P-Sigmoid and the equal-budget comparison on shapes (README "Schedule search").
compare: setup
	$(PY) -m mmreduce.cli compare --model tiny-llava-shapes --dataset shapes --budgets 0.333 0.222 0.15 0.111 \
		--calibration-samples 64 --samples 200 --seed 0 --oracle --out runs/compare-shapes

# The same comparison on the three versions of tiny-llava-shapes, with the baselines that embarrass methods and the
# oracle; panel.{json,md,png}: each model's accuracy and the mean with a bootstrap 95% interval (RESULTS "Panel").
panel: setup
	$(PY) -m mmreduce.cli compare --panel tiny-llava-shapes-v1 tiny-llava-shapes-v2 tiny-llava-shapes --dataset shapes \
		--budgets 0.333 0.222 0.15 --calibration-samples 64 --samples 200 --seed 0 --with pool stride visionzip tome \
		--oracle --out runs/panel-shapes
	$(PY) -m mmreduce.cli compare --panel tiny-llava-next-docs tiny-internvl-docs --dataset docs \
		--budgets 0.333 0.222 0.15 --calibration-samples 64 --samples 200 --seed 0 --with pool stride visionzip tome tcc \
		--oracle --out runs/panel-docs

# Before-the-LLM methods against the baselines that embarrass methods (pooling, a uniform per-panel stride), random,
# the in-LLM methods and the oracle (an upper reference, not a method), at 33 / 22 / 11% of the vision tokens:
# shapes on tiny-llava-shapes, docs on the two cropping models; video (frames, AIM across frames) on tiny-llava-video
# at 50 / 25% (docs/RESULTS.md "Before the LLM").
BUDGETS := 0.333 0.222 0.111
BEFORE_SPECS = $(foreach b,$(BUDGETS),pool:equivalent=$(b) stride:equivalent=$(b) visionzip:equivalent=$(b) \
	tome:equivalent=$(b) random:layer=1,equivalent=$(b) pdrop:equivalent=$(b) fastv:layer=1,equivalent=$(b))
before: setup
	$(PY) -m mmreduce.cli bench --model tiny-llava-shapes --dataset shapes --samples 200 --seed 0 --oracle \
		--methods baseline $(BEFORE_SPECS) $(foreach b,$(BUDGETS),aim:start_layer=4,equivalent=$(b)) \
		--out runs/before-shapes
	for model in tiny-llava-next-docs tiny-internvl-docs; do \
		$(PY) -m mmreduce.cli bench --model $$model --dataset docs --samples 200 --seed 0 --oracle \
			--methods baseline $(BEFORE_SPECS) $(foreach b,$(BUDGETS),tcc:equivalent=$(b)) \
			--out runs/before-docs-$$model || exit 1; \
	done
	$(PY) -m mmreduce.cli bench --model tiny-llava-video --dataset video --samples 200 --seed 0 --oracle --methods \
		baseline frames:keep_ratio=0.5 frames:keep_ratio=0.25 $(foreach b,0.5 0.25,aim:start_layer=4,equivalent=$(b) \
		aim:start_layer=4,frame_similarity=0.9,equivalent=$(b) pdrop:layers=1+3+5,equivalent=$(b) \
		random:layer=1,equivalent=$(b) stride:equivalent=$(b) pool:equivalent=$(b) visionzip:equivalent=$(b) \
		tome:equivalent=$(b)) aim:merge_ratio=0.25,start_layer=4,step=0.125 aim:merge_ratio=1.0,start_layer=4,frame_similarity=0.9 \
		aim:merge_ratio=1.0,start_layer=6,frame_similarity=0.9 --out runs/before-video

# Prefill/decode latency of baseline vs FastV vs PyramidDrop on a random-weight model with LLaVA-1.5's token counts.
latency: setup
	$(PY) -m mmreduce.cli latency --preset cpu --out runs/latency-cpu.json

# Optional: lmms-eval 0.7.3 beside the stack (it needs av 15.1.0 and filelock 3.32.7 instead of the pins above);
# then `lmms-eval --model mmreduce --model_args pretrained=PATH,method=pdrop,keep_ratio=0.5 --tasks ...`.
lmms: setup
	$(PY) -m pip install --quiet --disable-pip-version-check lmms-eval==0.7.3 av==15.1.0 filelock==3.32.7

test: setup
	$(PY) -m pytest -q

# The quick loop while developing: every test not marked slow (make test still runs them all).
test-quick: setup
	$(PY) -m pytest -q -m "not slow"

clean-venv:
	rm -rf $(VENV)
