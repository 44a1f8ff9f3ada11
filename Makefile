# Developer entry points. `make test` is the command CI runs (see README).
PY ?= python

.PHONY: test lint bench bench-quick bench-micro gpu-check mutate

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

# Mutation testing (not part of `test`: minutes per module). Needs mutmut (pip install mutmut==3.8.1).
# make mutate                                      the core modules (tools/mutate.py CORE_MODULES)
# make mutate MODULE=radd_fast/noise.py            one module
# make mutate REPORT=benchmarks/results/mutation_<date>.md   also write the markdown report
MODULE ?=
REPORT ?=
mutate:
	TRITON_INTERPRET=1 $(PY) tools/mutate.py $(if $(MODULE),$(MODULE),--all) $(if $(REPORT),--report $(REPORT),)
