# Two entry points on a fresh machine (see README):
#   make reproduce   set up .venv and execute every notebook on its CPU defaults (figures -> figures/)
#   make test        set up .venv, run the unit tests, then re-execute the notebooks with nbval
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Real datasets: ../shared/data on the project machines and CI, else ./data (see data/README.md).
export NFPI_DATA ?= $(if $(wildcard ../shared/data/*.npz),$(abspath ../shared/data),$(abspath data))
export HF_HUB_OFFLINE := 1
export PYTHONHASHSEED := 0
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.py))
EXECUTED := $(NOTEBOOKS:.py=.ipynb)

.PHONY: venv test unit nbval reproduce bench clean
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[notebooks,test,bench]' 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -c "import nfpi, torch, torchvision, timm, papermill, jupytext, nbval"
	touch $@

test: unit nbval

unit: venv
	$(BIN)/python -m pytest tests -q

# nbval re-executes the committed notebooks and compares the cells marked NBVAL_CHECK_OUTPUT.
nbval: venv
	cd notebooks && ../$(BIN)/python -m pytest --nbval-lax --nbval-sanitize-with sanitize.cfg \
		-p no:cacheprovider -q $(notdir $(EXECUTED))

# Convert each jupytext source to a notebook and execute it in place with papermill.
reproduce: venv
	@for nb in $(NOTEBOOKS); do \
		echo "== $$nb"; \
		$(BIN)/jupytext --quiet --to ipynb --output $${nb%.py}.ipynb $$nb && \
		$(BIN)/papermill --cwd notebooks -k python3 --log-level WARNING $${nb%.py}.ipynb $${nb%.py}.ipynb || exit 1; \
	done

bench: venv
	$(BIN)/python benchmarks/bench_fpi.py
	$(BIN)/python benchmarks/bench_flow.py
	$(BIN)/python benchmarks/bench_checkpoint.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
