# make setup | make demo [METHOD=ffc] | make test | make bench      (GPU=1 for the CUDA build)
SHELL := /bin/bash
PY := .venv/bin/python
GPU ?= 0
METHOD ?= pfc
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test bench clean

setup:
	@GPU=$(GPU) bash tools/setup_env.sh

demo: setup
	@source .venv/bin/activate && METHOD=$(METHOD) bash tools/demo.sh

test: setup
	@source .venv/bin/activate && python -m pytest

bench: setup
	@source .venv/bin/activate && bash tools/bench_all.sh

clean:
	rm -rf .venv .pytest_cache demo_output
