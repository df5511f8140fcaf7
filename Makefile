# Two user-facing targets: `make reproduce` and `make test`.
# Both create .venv if missing, install torch first (CPU build here; a GPU user pre-installs
# their own torch into .venv or sets TORCH=...), install the package with its extras from
# pyproject.toml under constraints.txt, and fetch the offline assets. Idempotent: a second run
# installs and downloads nothing.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= $(shell grep '^torch==' constraints.txt)
STAMP  := $(VENV)/.coalora-installed

.PHONY: install assets test reproduce scaling bench clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[notebooks,test]"
	touch $(STAMP)

install: $(STAMP)

assets: install
	$(PY) -m coalora.assets fetch

test: assets
	$(PY) -m pytest

# Executed copies go to out/notebooks/<preset> (ignored); the notebooks write figures/ and results/
# (for a preset other than default, figures/<preset>/ and results/<preset>/).
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
PRESET    ?= default

# --log-output shows each cell as it starts ("Executing Cell N") and its output (training progress bars).
# The runs first, WORKERS side by side (2 on 2 CPU cores: 1.27 x the throughput of one process, see
# docs/measurements.md#threads-and-parallel-runs; WORKERS=1 on a single GPU), then each notebook reads them cached.
WORKERS ?= 2

reproduce: assets
	@$(if $(filter large,$(PRESET)),$(PY) -m coalora.assets fetch --large)
	$(PY) -m coalora.studies runs --preset $(PRESET) --workers $(WORKERS)
	@mkdir -p out/notebooks/$(PRESET)
	@for nb in $(NOTEBOOKS); do \
		echo "papermill $$nb (preset $(PRESET))"; \
		$(PY) -m papermill $$nb out/notebooks/$(PRESET)/$$(basename $$nb) -p preset $(PRESET) -k python3 \
			--log-output --no-progress-bar || exit 1; \
	done

# Every benchmark in bench/, one after another (two torch processes on 2 cores slow each other
# down many times over). `make bench QUICK=1` runs each in its quick mode, as the test suite does.
BENCHMARKS := $(sort $(wildcard bench/*.py))

# The scaling study behind the default preset's scale (notebooks/scaling, about 6 h on 2 CPU cores, its
# runs one at a time; MPNet-base is a large asset): writes figures/scaling.* and results/scaling_*.csv.
scaling: assets
	$(PY) -m coalora.assets fetch --large
	@mkdir -p out/notebooks/$(PRESET)
	$(PY) -m papermill notebooks/scaling.ipynb out/notebooks/$(PRESET)/scaling.ipynb -p preset $(PRESET) -k python3

bench: assets
	@for b in $(BENCHMARKS); do echo "== $$b"; $(PY) $$b $(if $(QUICK),--quick) || exit 1; done

clean-venv:
	rm -rf $(VENV)
