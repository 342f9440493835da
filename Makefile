# effvla_ros: the two commands of the README, plus helpers. Every target runs the (idempotent) setup.
# DISTRO=kilted (default: .venv, CPython 3.11) or DISTRO=jazzy (.venv-jazzy, CPython 3.12); `make test-jazzy`
# is `make DISTRO=jazzy pytest` on the Jazzy test set.
SHELL := /bin/bash
DISTRO = kilted
VENV ?= $(CURDIR)/$(if $(filter kilted,$(DISTRO)),.venv,.venv-$(DISTRO))
ENV := source $(VENV)/env.sh &&
# Humble (and JetPack 6) run Python 3.10: no syntax or stdlib newer than that anywhere (vermin).
PY310_PATHS ?= effvla_ros test benchmarks launch scripts bin
# The Jazzy venv has no torch (no CPU build for CPython 3.12 here, see README "Distros"): the tests that
# need none: rclpy compat, interfaces and parameters over DDS, the executor (core and node), the bag writer,
# the node entry points, the simulation bridge, the colcon build with Jazzy's rosidl, the 3.10 check.
JAZZY_TESTS ?= test/test_compat.py test/test_py310_check.py test/test_foundation_ros.py test/test_param_bridge.py \
	test/test_executor_core.py test/test_executor_node.py test/test_record_writer.py test/test_node_common.py \
	test/test_sim_bridge_node.py test/test_sim_follower.py test/test_sim_task.py test/test_colcon_build.py
PYTEST_FILES ?= $(if $(filter kilted,$(DISTRO)),test/test_*.py,$(JAZZY_TESTS))

.PHONY: setup setup-jazzy demo test test-jazzy lint py310 py310-check typecheck pytest bench clean

setup:
	@EFFVLA_ROS_DISTRO=$(DISTRO) EFFVLA_VENV=$(VENV) bash scripts/setup.sh

setup-jazzy:
	@$(MAKE) --no-print-directory DISTRO=jazzy setup

demo: setup
	@$(ENV) python -m effvla_ros.cli demo

lint: setup
	@$(ENV) ruff check effvla_ros test benchmarks launch scripts && echo "ruff: ok"
	@$(MAKE) --no-print-directory py310-check

py310: setup
	@$(MAKE) --no-print-directory py310-check

# no setup: run by lint after it, and by test/test_py310_check.py with PY310_PATHS=<dir> VENV=<its venv>
py310-check:
	@$(ENV) out=$$(vermin -t=3.10- --no-tips --violations $(PY310_PATHS) 2>&1) \
	  || { echo "$$out"; echo "py310: FAILED: the code above needs Python > 3.10 (Humble and JetPack 6 run 3.10)"; exit 1; }; \
	  echo "py310: ok (vermin: nothing needs Python > 3.10)"

typecheck: setup
	@$(ENV) mypy effvla_ros && echo "mypy: ok"

pytest: setup
	@# one pytest process per test file: run in one process, the node tests saw multi-second stalls
	@# of their harness after the other files' tests (cause not found; see README "Tests")
	@$(ENV) fails=""; for f in $(PYTEST_FILES); do python -m pytest -q $$f || fails="$$fails $$f"; done; \
	  if [ -n "$$fails" ]; then echo "FAILED files ($(DISTRO)):$$fails"; exit 1; fi; echo "pytest ($(DISTRO)): all files passed"

test: lint typecheck pytest

# Jazzy (CPython 3.12): the torch-free tests above; lint and typecheck are the same code, run by `make test`.
test-jazzy:
	@$(MAKE) --no-print-directory DISTRO=jazzy pytest

bench: setup
	@$(ENV) for b in benchmarks/bench_*.py; do echo "== $$b"; python $$b || exit 1; done

clean:
	rm -rf build install log $(VENV) $(CURDIR)/.venv-jazzy
