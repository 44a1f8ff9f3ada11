# Developer entry points: `make setup` once, then `make test` (what CI runs, see README).
VENV ?= .venv
# The project's interpreter: the virtual environment's once `make setup` has made it.
PY ?= $(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,python3)
# The torch build `make setup` installs when none is there: CUDA wheels from PyPI where a GPU driver
# answers, else the CPU-only wheels (a plain `pip install torch` on a CPU box downloads GBs of CUDA).
TORCH ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch --index-url https://download.pytorch.org/whl/cpu)
# Commands run with the environment's bin/ first on PATH, as if activated (torchrun, python).
RUN = PATH="$(abspath $(VENV))/bin:$$PATH"

.PHONY: setup test lint bench bench-quick bench-micro gpu-check mutate

# Idempotent: a second run finds the environment and torch in place and only refreshes the package.
setup:
	@test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	@$(VENV)/bin/python -c "import torch" 2>/dev/null && echo "torch: already installed" \
		|| $(VENV)/bin/python -m pip install --quiet $(TORCH)
	$(VENV)/bin/python -m pip install --quiet -e ".[dev]"
	@$(VENV)/bin/python -c "import torch, radd_fast; print('ready: torch', torch.__version__, '| cuda', torch.cuda.is_available())"

test:
	$(RUN) TRITON_INTERPRET=1 $(PY) -m pytest tests -p no:cacheprovider --benchmark-disable

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
