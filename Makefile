# Two commands for a fresh machine (Debian, Python >= 3.11, 2 cores, no GPU needed):
#   make demo   set up, then train every method of params.yaml on Fashion-MNIST, evaluate with AutoAttack, report
#   make test   set up (with Chromium and a SLURM single-node cluster's packages), then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
CORES ?= 2

.PHONY: demo test setup data browser slurm clean

$(BIN)/advtrain: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check uv
	# uv resolves and downloads in parallel (~1 min); plain pip is the fallback (~5 min). --compile-bytecode writes
	# the .pyc files once here: uv does not by default, and where PYTHONDONTWRITEBYTECODE is set (as on this
	# project's machines) every later process would otherwise compile torch, mlflow and snakemake from source,
	# ~16 s per `advtrain` process (docs/benchmarks.md).
	$(BIN)/uv pip install --python $(PY) -q --compile-bytecode -e '.[test,slurm]' || $(BIN)/pip install -q -e '.[test,slurm]'
	touch $@

setup: $(BIN)/advtrain data

# apt-get install the Debian packages named in $(1) when the file $(2) is missing (and apt-get exists).
define apt_install
	@if [ ! -e $(2) ] && command -v apt-get >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $(1); \
	fi
endef

# Debian's offline copy of Fashion-MNIST (30 MB); elsewhere `advtrain prepare` downloads it with torchvision.
data:
	$(call apt_install,dataset-fashion-mnist,/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz)

# Headless Chromium and its WebDriver, for the test that renders the report (tests/test_report_ui.py).
browser:
	$(call apt_install,chromium chromium-driver,/usr/bin/chromedriver)

# Debian's SLURM 22.05 and munge, for the test that runs the workflow on a real single-node cluster (the test
# starts and stops the daemons itself, as root, everything in a temporary folder; no systemd needed).
slurm:
	$(call apt_install,slurmctld slurmd slurm-client munge,/usr/sbin/slurmd)

demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --cores $(CORES) --printshellcmds

test: setup browser slurm
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -n auto --dist loadgroup --durations=30 tests

clean:
	rm -rf data/prepared models metrics results reports checkpoints mlruns mlruns.db .snakemake
