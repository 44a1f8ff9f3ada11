# Developer entry points. `make test` is the command CI runs (see README).
PY ?= python

.PHONY: test lint bench bench-quick bench-micro gpu-check

test:
	TRITON_INTERPRET=1 $(PY) -m pytest tests -p no:cacheprovider --benchmark-disable

lint:
	$(PY) -m ruff check radd_fast tests benchmarks train.py sample.py eval.py

bench-quick:
	TRITON_INTERPRET=1 $(PY) -m benchmarks.run --quick

bench:
	$(PY) -m benchmarks.run

gpu-check:
	bash benchmarks/gpu_check

bench-micro:
	$(PY) -m pytest benchmarks/test_micro_kernels.py -p no:cacheprovider --benchmark-group-by=group
