# Two commands for a fresh machine (Debian, Python >= 3.10, 2 cores, no GPU needed):
#   make demo   set up, then train standard + PGD-AT on Fashion-MNIST, evaluate with AutoAttack, write the report
#   make test   set up, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
CORES ?= 2

.PHONY: demo test setup data clean

$(BIN)/advtrain: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check uv
	# uv resolves and downloads in parallel (~1 min); plain pip is the fallback (~5 min).
	$(BIN)/uv pip install --python $(PY) -q -e '.[test]' || $(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/advtrain data

# Debian's offline copy of Fashion-MNIST (30 MB); elsewhere `advtrain prepare` downloads it with torchvision.
data:
	@if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	fi

demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --cores $(CORES) --printshellcmds

test: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q tests

clean:
	rm -rf data/prepared models metrics results reports checkpoints mlruns mlruns.db .snakemake
