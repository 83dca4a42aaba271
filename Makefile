# voice2music — `make demo` runs the main job on embedded defaults; `make test` runs the test suite.
# Both create the environment first (.venv, Python >= 3.11) and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Local state lives under .v2m/ (see shared/notes/conventions.md); telemetry stays off.
export PREFECT_HOME := $(CURDIR)/.v2m/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: demo test setup sysdeps bench clean gpu-wheelhouse

# Its last lines are each backend's champion and comparison report (`v2m retrain` prints them last). The same
# tracks as finished songs, separated by the pipeline: README "Three ways in" (v2m data demo --mixes).
demo: setup
	$(BIN)/v2m data demo --out data/raw
	$(BIN)/v2m retrain

# Three xdist workers on CI's 2 cores: the team tests wait on servers, heartbeats and polls, and a third worker
# runs in those waits. On a clean clone (2 cores): 1112 s wall with -n 3 against 1275 s with -n 2, and less CPU
# (1886 against 1966 CPU-s: fewer spinning waits), every test passing in both.
test: setup
	$(BIN)/python -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder

bench: setup
	$(BIN)/python bench/data_prep.py
	$(BIN)/python bench/cached_inputs.py --backend musicgen
	$(BIN)/python bench/cached_inputs.py --backend audioldm
	$(BIN)/python bench/eval_throughput.py
	$(BIN)/python bench/retrain_rerun.py
	$(BIN)/python bench/serve.py --backend musicgen
	$(BIN)/python bench/serve.py --backend audioldm

setup: $(STAMP)

# torch: the CPU wheel of 2.13.0 (0.75 GB installed) rather than the newest in pyproject's range, which this
# registry serves as 2.14.1's CUDA build (4.4 GB with its nvidia-* wheels). GPU hosts install a CUDA build.
$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory sysdeps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[render,ml,serve,dev,datasets]'
	touch $(STAMP)

# System packages: espeak-ng sings the demo vocals and libfluidsynth3 renders the accompaniment (without them
# the demo builder falls back to pure-Python synths); chromium renders the comparison report in the tests;
# ffmpeg decodes MUSDB18's .stem.mp4 files (`v2m data import --format musdb`, through stempeg).
# A failure here (no root, no apt) is reported, not fatal.
sysdeps:
	@missing=""; \
	command -v espeak-ng >/dev/null || missing="$$missing espeak-ng"; \
	ldconfig -p 2>/dev/null | grep -q libfluidsynth || missing="$$missing libfluidsynth3"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v ffmpeg >/dev/null || missing="$$missing ffmpeg"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
	      || echo "warning: could not install$$missing; the demo will use the pure-Python synths"; \
	  else echo "note:$$missing not installed; the demo will use the pure-Python synths"; fi; \
	fi

# The wheels the lent GPU image lacks (bench/gpu_wheels.txt), for its CPython 3.12 on x86-64 Linux: that machine
# reaches no registry, so bench/gpu_acceptance.sh installs them from here. Must stay under 64 MiB (what travels).
WHEELHOUSE ?= .wheelhouse
GPU_PYTHON_VERSION ?= 3.12
gpu-wheelhouse:
	rm -rf $(WHEELHOUSE) && mkdir -p $(WHEELHOUSE)
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON_VERSION) \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d $(WHEELHOUSE) -r bench/gpu_wheels.txt
	@size=$$(du -sm $(WHEELHOUSE) | cut -f1); ls $(WHEELHOUSE); echo "$(WHEELHOUSE): $$size MiB"; \
	  test $$size -lt 64 || { echo "$(WHEELHOUSE) is over 64 MiB: it would not travel to the GPU machine"; exit 1; }

clean:
	rm -rf data/validated data/normalized data/labelled data/split data/segments .v2m/prefect
