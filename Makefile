# Two commands on a fresh machine: `make demo` and `make test`. Each does its own set-up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup system jars demo test lint typecheck unit clean

setup: system $(VENV)/.installed jars

system:
	@scripts/install-system-deps

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# Apache Kafka's jars, fetched by Maven once into .cache/kafka (ignored) and reused.
jars: $(VENV)/.installed
	@$(BIN)/python -c 'from creditgate.devstack import default_jars_cache_dir as d, ensure_kafka_jars as e; print("kafka jars:", e(d()))'

demo: setup
	$(BIN)/creditgate demo

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(VENV)/.installed
	$(BIN)/mypy

test: setup lint typecheck
	$(BIN)/python -m pytest

unit: $(VENV)/.installed
	$(BIN)/python -m pytest tests/unit

clean:
	rm -rf $(VENV) .devstack .pytest_cache .mypy_cache .ruff_cache
