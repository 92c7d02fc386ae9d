# The two commands of the README: `make run` and `make test`. Everything installs into .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: run test install install-dev rabbitmq model bench clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Stamps make re-runs fast: pip runs again only when pyproject.toml changed.
$(VENV)/.hotq-installed: pyproject.toml | $(PY)
	@echo "== installing hotq into $(VENV)"
	$(PY) -m pip install -q -e .
	@touch $@

$(VENV)/.hotq-dev-installed: pyproject.toml $(VENV)/.hotq-installed
	@echo "== installing test dependencies"
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

install: $(VENV)/.hotq-installed
	@bash ops/install_vllm.sh $(VENV)

install-dev: install $(VENV)/.hotq-dev-installed

rabbitmq:
	@bash ops/ensure_rabbitmq.sh

model: install
	@$(PY) -m hpc_agents.embedded_model

run: install rabbitmq
	$(VENV)/bin/hotq up --port $(PORT)

test: install-dev rabbitmq
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install-dev rabbitmq
	$(PY) -m bench.core_path

clean:
	rm -rf $(VENV) .hotq .pytest_cache
