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
	@$(ENV) ruff check effvla_ros test benchmarks launch scripts && echo "ruff: ok"

typecheck: setup
	@$(ENV) mypy effvla_ros && echo "mypy: ok"

pytest: setup
	@# one pytest process per test file: run in one process, the node tests saw multi-second stalls
	@# of their harness after the other files' tests (cause not found; see README "Tests")
	@$(ENV) fails=""; for f in test/test_*.py; do python -m pytest -q $$f || fails="$$fails $$f"; done; \
	  if [ -n "$$fails" ]; then echo "FAILED files:$$fails"; exit 1; fi; echo "pytest: all files passed"

test: lint typecheck pytest

bench: setup
	@$(ENV) for b in benchmarks/bench_*.py; do echo "== $$b"; python $$b || exit 1; done

clean:
	rm -rf build install log $(VENV)
