# Two entry points on a fresh machine (see README.md):
#   make reproduce   set up .venv, fetch the missing dataset files (make data), then execute every
#                    notebook on its CPU defaults (figures -> figures/)
#   make test        set up .venv, run the unit tests, then re-execute the notebooks with nbval
#                    (two notebook lanes side by side)
#   make test-portable  the numeric tests and the notebooks that check numbers, under two other
#                    processors' kernels (emulated; docs/testing.md)
# and, for working interactively (docs/notebooks.md):
#   make lab         JupyterLab from .venv (kernel "Python 3 (ipykernel)" = .venv's Python)
#   make nb-02 P="-p epochs 3"   one notebook, papermill parameters passed through
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Real datasets: $NFPI_DATA when set (CI sets it), else a fallback directory when it holds files,
# else ./data (see docs/data.md).
export NFPI_DATA ?= $(if $(wildcard ../shared/data/*.npz),$(abspath ../shared/data),$(abspath data))
export HF_HUB_OFFLINE := 1
export PYTHONHASHSEED := 0
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.py))
EXECUTED := $(NOTEBOOKS:.py=.ipynb)
NB_IDS := $(foreach nb,$(NOTEBOOKS),$(firstword $(subst _, ,$(notdir $(nb)))))
# papermill options for nb-NN / reproduce, e.g. P="-p config ../configs/mnist_cpu.yaml". With P
# set, the executed copy and its figures go to runs/notebooks/ (gitignored): the tracked .ipynb
# and figures/ always hold the defaults.
P ?=
LAB_ARGS ?=

.PHONY: venv test test-portable lint quick unit tables nbval nbval-long nbval-rest data reproduce lab bench clean $(addprefix nb-,$(NB_IDS))
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[notebooks,test,bench]' 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -c "import nfpi, torch, torchvision, timm, papermill, jupytext, nbval"
	touch $@

# The unit tests first (they read the committed results, which the notebooks rewrite), then the
# notebooks in two lanes side by side on the 2 cores: notebook 06 (about 13 of nbval's 19
# minutes) alone, the others one after another (01-05, 07, 08: 08 retrains two ~1-minute runs
# for its check, which keeps that lane shorter than 06's); the lane beside prints when both are done.
test: lint unit
	@mkdir -p runs; \
	$(MAKE) --no-print-directory nbval-long > runs/nbval-long.log 2>&1 & long=$$!; \
	$(MAKE) --no-print-directory nbval-rest; rest=$$?; \
	wait $$long; long_status=$$?; \
	echo "--- $(LONG_NB), run beside the other notebooks ---"; cat runs/nbval-long.log; \
	test $$rest -eq 0 && test $$long_status -eq 0

# Another processor's kernels, emulated on this one: ATen's scalar kernels, then AVX2 with
# oneDNN capped at AVX2 (a comma stands for a space within one machine). The numeric tests
# (recomputed results, shipped flows, legacy checkpoint, the measured spread) and the notebooks
# whose checked cells print computed floats (01) or re-evaluate the shipped flows (07).
PORTABLE_ISAS := ATEN_CPU_CAPABILITY=default ATEN_CPU_CAPABILITY=avx2,ONEDNN_MAX_CPU_ISA=AVX2
PORTABLE_TESTS := tests/test_results.py tests/test_pretrained.py tests/test_legacy_checkpoint.py \
	tests/test_portability.py
PORTABLE_NOTEBOOKS := 01_toy_2d_fpi.ipynb 07_full_data.ipynb
test-portable: venv
	@for isa in $(PORTABLE_ISAS); do \
		machine=$$(echo $$isa | tr , ' '); echo "=== $$machine"; \
		env $$machine $(BIN)/python -m pytest $(PORTABLE_TESTS) -q -p no:cacheprovider || exit 1; \
		(cd notebooks && env $$machine $(NBVAL) $(PORTABLE_NOTEBOOKS)) || exit 1; \
	done

# ruff (configured in pyproject.toml): the lint rules and the formatting, over the whole tree.
lint: venv
	$(BIN)/ruff check nfpi tests notebooks benchmarks scripts
	$(BIN)/ruff format --check nfpi tests notebooks benchmarks scripts

unit: venv
	$(BIN)/python -m pytest tests nfpi --doctest-modules -q

# The quick loop while editing: everything but the tests marked slow (under 2 minutes).
quick: venv
	$(BIN)/python -m pytest tests nfpi --doctest-modules -q -m "not slow"

# The generated results tables (<!-- results: ... --> blocks) of the README and docs/ from the
# committed CSVs; tests/test_readme.py checks that they agree.
tables: venv
	@for f in README.md $$(grep -l -- "<!-- results: " docs/*.md); do $(BIN)/python -m nfpi.repro $$f || exit 1; done

# nbval re-executes the committed notebooks and compares the cells marked NBVAL_CHECK_OUTPUT.
# Progress as one line per epoch, as `make reproduce` ran them (widget bars would flood nbval's
# message loop, which gives up after 5 s without a message). A cell may take up to an hour:
# notebook 06's study (13 minutes alone) outgrew nbval's default 2,000 s on 2 cores shared by
# two test runs.
NBVAL := NFPI_PROGRESS=log ../$(BIN)/python -m pytest --nbval-lax --nbval-sanitize-with sanitize.cfg \
	--nbval-cell-timeout 3600 -p no:cacheprovider -q
LONG_NB := 06_nf_augmentation.ipynb
nbval: venv
	cd notebooks && $(NBVAL) $(notdir $(EXECUTED))
nbval-long: venv
	cd notebooks && $(NBVAL) $(LONG_NB)
nbval-rest: venv
	cd notebooks && $(NBVAL) $(filter-out $(LONG_NB),$(notdir $(EXECUTED)))

# The dataset files the notebooks read (07 re-evaluates the shipped MNIST and CIFAR-10 flows),
# fetched when missing and verified (docs/data.md). Present files cost a header check; offline with
# files missing, one line names them before any notebook runs. `nfpi data check`: the full sums.
REPRO_DATA := mnist cifar10
data: venv
	@$(BIN)/nfpi data fetch $(REPRO_DATA)

reproduce: venv data
	@for id in $(NB_IDS); do $(MAKE) --no-print-directory nb-$$id || exit 1; done

# One notebook: jupytext source -> papermill into a temporary file (one progress line per epoch)
# -> stream outputs merged (the kernel's chunking depends on timing) -> volatile metadata stripped -> the .ipynb written only if its bytes change, then the .py
# touched so that jupytext (JupyterLab) never finds the .ipynb newer than its source.
$(addprefix nb-,$(NB_IDS)): nb-%: venv
	@src=$$(ls notebooks/$*_*.py 2>/dev/null | head -n 1); \
	if [ -z "$$src" ]; then echo "no notebooks/$*_*.py; the notebooks are: $(NB_IDS)"; exit 2; fi; \
	name=$$(basename "$${src%.py}"); \
	out=$(if $(strip $(P)),runs/notebooks/$$name.ipynb,notebooks/$$name.ipynb); \
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	echo "== $$src -> $$out $(P)"; \
	$(BIN)/jupytext --quiet --to ipynb --output "$$tmp/$$name.ipynb" "$$src" && \
	NFPI_PROGRESS=log $(BIN)/papermill --cwd notebooks -k python3 --log-level WARNING --no-progress-bar \
		$(if $(strip $(P)),-p figures ../runs/notebooks/figures) $(P) "$$tmp/$$name.ipynb" "$$tmp/executed.ipynb" && \
	$(BIN)/python scripts/merge_streams.py "$$tmp/executed.ipynb" && \
	$(BIN)/python -m nfpi._notebooks "$$tmp/executed.ipynb" "$$out" $(if $(strip $(P)),,"$$src")

# JupyterLab from the virtualenv, in the repository root (NFPI_DATA exported above).
lab: venv
	$(BIN)/jupyter lab $(LAB_ARGS)

bench: venv
	$(BIN)/python benchmarks/bench_fpi.py
	$(BIN)/python benchmarks/bench_flow.py
	$(BIN)/python benchmarks/bench_checkpoint.py
	$(BIN)/python benchmarks/bench_fpi_configs.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
