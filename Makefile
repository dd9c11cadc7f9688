# The few commands people type. `make demo` and `make test` install first (into the current Python).
PYTHON ?= python3
# The CPU wheel of torch on CPU machines (an unpinned torch pulls a multi-GB CUDA build).
# On a GPU machine pick the CUDA build you want, e.g. `make install TORCH="torch==2.13.0"` from the CUDA index.
TORCH ?= torch==2.13.0
STAMP := .make/installed
# The stamp only counts if this checkout is what Python imports: an editable install made from another copy
# of the repository (a moved or re-cloned folder) would run that copy's code, inside Ray jobs too.
INSTALLED_FROM := $(shell cd / && $(PYTHON) -c "import importlib.util as u, pathlib; s = u.find_spec('pipeline'); print(pathlib.Path(s.origin).resolve().parent.parent if s else '')" 2>/dev/null)
ifneq ($(INSTALLED_FROM),$(realpath $(CURDIR)))
$(shell rm -f $(STAMP))
endif

.PHONY: install demo test lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m pip install --quiet "$(TORCH)"
	$(PYTHON) -m pip install --quiet -e ".[test,bench]"
	@mkdir -p .make && touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default: train the example catalog (toy model, embedded Ray, local folder
# manifests/store/), list what the index holds, then render the catalog's render jobs with Ray Data
# (contact sheets in manifests/store/renders/sheets/). A rerun trains and renders nothing new.
demo: $(STAMP)
	$(PYTHON) -m pipeline train manifests/catalog.yaml
	$(PYTHON) -m pipeline concepts list --manifest manifests/catalog.yaml
	$(PYTHON) -m pipeline render manifests/catalog.yaml

test: $(STAMP)
	$(PYTHON) -m pytest -q

lint: $(STAMP)
	ruff check perfusion pipeline tests benchmarks
	ruff format --check perfusion pipeline tests benchmarks
	mypy

format: $(STAMP)
	ruff format perfusion pipeline tests benchmarks
	ruff check --fix perfusion pipeline tests benchmarks

bench: $(STAMP)
	$(PYTHON) -m benchmarks.concept_size
	$(PYTHON) -m benchmarks.attention_overhead
	$(PYTHON) -m benchmarks.training_step

clean:
	rm -rf .make build *.egg-info .pytest_cache .mypy_cache .ruff_cache demo-output
