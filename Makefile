# The two commands of the README: `make run` and `make test`. Everything installs into .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
PYTEST_ARGS ?=
# A worker per core, plus one: a third of the suite waits (for processes to start, for windows that
# must expire) more than it computes, and on a 2-core machine a third worker fills those waits.
# Measured there in one session: 447 and 471 s of pytest with two workers, 391 and 406 s with three,
# 438 s with four (vLLM loads and the cluster at once overran the cores). At most four: in a
# container limited by a CPU quota, nproc counts the host's cores.
PYTEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1); \
	echo $$(( n + 1 < 4 ? n + 1 : 4 )))
# Set-up steps that do not depend on each other (the vLLM install, the endpoint package's own venv,
# RabbitMQ, Chromium) run side by side.
MAKEFLAGS += --jobs=4

.PHONY: run test lint install install-dev rabbitmq chromium model bench clean

# uv installs the venv's packages: it resolves and unpacks the same versions as pip, but the
# whole set (vLLM and torch included) took 60 s against pip's 200 s on a 2-core machine.
# --compile-bytecode, as pip does: without the .pyc files, the suite's first vLLM processes
# spent minutes compiling vLLM's and torch's modules at import, all at once.
UV := $(VENV)/bin/uv
UV_INSTALL := $(UV) pip install -q --compile-bytecode

$(PY):
	python3 -m venv $(VENV)

$(UV): | $(PY)
	$(PY) -m pip install -q uv

# Stamps make re-runs fast: the installer runs again only when pyproject.toml changed.
$(VENV)/.hotq-installed: pyproject.toml | $(UV)
	@echo "== installing hotq into $(VENV)"
	$(UV_INSTALL) --python $(PY) -e .
	@touch $@

# After `install`: two installs must never write to one venv at once.
$(VENV)/.hotq-dev-installed: pyproject.toml $(VENV)/.hotq-installed | install
	@echo "== installing test dependencies"
	$(UV_INSTALL) --python $(PY) -e '.[dev]'
	@touch $@

install: $(VENV)/.hotq-installed
	@bash ops/install_vllm.sh $(VENV)

# The Globus Compute endpoint package pins an older click than vLLM's dependencies accept,
# so the endpoint-config test loads our templates with it from a venv of its own.
SITES_VENV ?= .venv-sites
$(SITES_VENV)/.installed: | $(UV)
	@echo "== installing the Globus Compute endpoint package into $(SITES_VENV) (template test)"
	python3 -m venv $(SITES_VENV)
	$(UV_INSTALL) --python $(SITES_VENV)/bin/python globus-compute-endpoint pyyaml
	@touch $@

install-dev: install $(VENV)/.hotq-dev-installed $(SITES_VENV)/.installed

rabbitmq:
	@bash ops/ensure_rabbitmq.sh

chromium:
	@bash ops/ensure_chromium.sh

model: install
	@$(PY) -m hpc_agents.embedded_model

run: install rabbitmq
	$(VENV)/bin/hotq up --port $(PORT)

# Style and types first: a lint failure ends `make test` (and CI) before the slow suite starts.
lint: install-dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: lint rabbitmq chromium
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadscope --no-loadscope-reorder $(PYTEST_ARGS)

bench: install-dev rabbitmq
	$(PY) -m bench.core_path

clean:
	rm -rf $(VENV) $(SITES_VENV) .hotq .pytest_cache
