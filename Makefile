# Verbs only. Every target first makes sure .venv exists (the stamp target below installs it).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU results are bit-for-bit reproducible only at a fixed thread count.
THREADS ?= 2
export OMP_NUM_THREADS := $(THREADS)
export MKL_NUM_THREADS := $(THREADS)
# OpenMP's default wait policy (workers spin briefly, then sleep): forcing PASSIVE measured 2.5-3x
# slower on the small products of a BCOP training step. Only run one 2-thread job at a time.

# Datasets root: a pre-filled folder when there is one (CI), else torchvision downloads.
ifneq ($(wildcard ../shared/data),)
LIPSORT_DATA ?= $(abspath ../shared/data)
export LIPSORT_DATA
endif

.PHONY: book test golden bench clean

# torch first and pinned: a looser request pulls multi-GB CUDA wheels on CPU machines.
# torchattacks without its dependencies: it pins an old requests.
$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[book,test]'
	$(BIN)/pip install --no-deps torchattacks==3.5.1
	touch $@

## book: execute every chapter at the quick profile, then build the HTML book into _build/html
book: $(STAMP)
	$(BIN)/python -m lipsort.reproduce --profile quick
	$(BIN)/jupyter-book build . --toc book/_toc.yml -W --keep-going

## test: unit tests and doctests, then nbval re-executes the golden notebooks
## (numbers compared exactly on the CPU model that wrote them, masked on another: lipsort/book/golden.py)
test: $(STAMP)
	$(BIN)/python -m pytest tests lipsort --doctest-modules
	$(BIN)/python -m lipsort.book.golden tests/golden

## golden: regenerate the nbval references (quick profile) in tests/golden
golden: $(STAMP)
	$(BIN)/python -m lipsort.reproduce --profile quick --output tests/golden

## bench: benchmarks against peer implementations
bench: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m lipsort.bench

## clean: remove build outputs (keeps .venv, results and goldens)
clean:
	rm -rf _build book/chapters .pytest_cache .hypothesis
	find . -path ./.venv -prune -o -name __pycache__ -type d -exec rm -rf {} +
