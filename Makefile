# effvla_ros: the two commands of the README, plus helpers. Every target runs the (idempotent) setup.
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
ENV := source $(VENV)/env.sh &&

.PHONY: setup demo test lint typecheck pytest bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	@$(ENV) python -m effvla_ros.cli demo

lint: setup
	@$(ENV) ruff check effvla_ros test benchmarks launch scripts

typecheck: setup
	@$(ENV) mypy effvla_ros/core

pytest: setup
	@$(ENV) python -m pytest -q test --ignore=test/test_executor_node.py
	@# the executor node tests time a 100 Hz stream: in their own pytest process (after the rest of
	@# the suite in the same process they saw multi-second stalls of the test harness)
	@$(ENV) python -m pytest -q test/test_executor_node.py

test: setup
	@$(ENV) ruff check effvla_ros test benchmarks launch scripts && echo "ruff: ok"
	@$(ENV) mypy effvla_ros/core && echo "mypy: ok"
	@$(ENV) python -m pytest -q test --ignore=test/test_executor_node.py
	@# the executor node tests time a 100 Hz stream: in their own pytest process (after the rest of
	@# the suite in the same process they saw multi-second stalls of the test harness)
	@$(ENV) python -m pytest -q test/test_executor_node.py

bench: setup
	@$(ENV) for b in benchmarks/bench_*.py; do echo "== $$b"; python $$b || exit 1; done

clean:
	rm -rf build install log $(VENV)
