# make setup: create .venv if missing and install efsolo with its dependencies (idempotent)
# make demo:  setup, then the whole DVC pipeline on the embedded demo data, then the results table
#             (printed; tracked files are left alone)
# make readme: (maintainers) write the current results table into README.md between its markers
# make test:  setup, then the test suite
# make seeds: setup, then the whole pipeline for seeds 0, 1, 2 as a DVC experiment queue; writes
#             metrics/seeds.json (per seed, and mean ± std) and prints the table.
#             make seeds LOOK=photo: the same on the photo look, into metrics/seeds_photo.json
# make eec-from-scratch: the paper's protocol (the EEC over the whole training) as a DVC experiment;
#             on the demo's photo seed 3 its guide masks faded and the guard refused it (docs/eec.md)
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
VENV ?= .venv
PYTHON ?= python3
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo readme test seeds eec-from-scratch clean

setup: $(VENV)/.efsolo-installed

$(VENV)/.efsolo-installed: pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -e '.[test]' 2>&1 | sed '/^WARNING: Location/d'
	$(VENV)/bin/python -c "import efsolo, torch, torchvision, dvc, dvclive, cv2, pycocotools, skimage, pandas, typer"
	@touch $@

demo: setup
	dvc repro
	efsolo table

readme: setup
	efsolo table --readme README.md

test: setup
	$(VENV)/bin/python -m pytest -q

LOOK ?= gradient
seeds: setup
	efsolo seeds --seeds 0 --seeds 1 --seeds 2 $(if $(filter-out gradient,$(LOOK)),-S data.synthetic.look=$(LOOK) \
	  --out metrics/seeds_$(LOOK).json)

eec-from-scratch: setup
	dvc exp run -n eec-from-scratch -S eec.start_iter=0

clean:
	rm -rf data/prepared models pseudo predictions dvclive checkpoints metrics/pr metrics/pool $(filter-out metrics/bench.json,$(wildcard metrics/*.json))
