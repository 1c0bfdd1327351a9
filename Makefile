# Two commands do all set-up: `make demo` and `make test`. Each creates (or reuses) .venv itself.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
HASH   := $(shell cat pyproject.toml requirements/constraints.txt | cksum | cut -d' ' -f1)
# What the demo needs (the package alone) and what the tests need (the dev extra on top), stamped apart.
BASE   := $(VENV)/.installed-base-$(HASH)
DEV    := $(VENV)/.installed-dev-$(HASH)
# `make demo` writes its records and table here, so a run from the checkout leaves tracked files alone;
# `make demo RESULTS=results` refreshes the committed results/tables/demo.md.
RESULTS ?= outputs/results

export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: demo test install wheel-check clean

install: $(DEV)

# torch is pinned by requirements/constraints.txt: a CPU machine whose pip find-links holds the CPU
# wheel keeps it; an ordinary GPU box gets the CUDA build of the same version (README: "Install on a GPU box").
$(BASE): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements/constraints.txt -e .
	find $(VENV) -maxdepth 1 -name '.installed-*' ! -name '*-$(HASH)' -delete && touch $@

$(DEV): $(BASE)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements/constraints.txt -e '.[dev]'
	touch $@

demo: $(BASE)
	$(BIN)/adamerge experiment=demo paths.results_dir=$(abspath $(RESULTS))

test: $(DEV)
	$(BIN)/python -m pytest

# The package as a user installs it: a built wheel in a fresh venv, run from outside the checkout (CI runs this).
wheel-check:
	rm -rf dist && $(PYTHON) -m pip wheel --quiet --no-deps -w dist .
	set -e; away=$$(mktemp -d); wheel=$$(ls $(CURDIR)/dist/adamerge-*.whl); \
	$(PYTHON) -m venv $$away/venv; \
	$$away/venv/bin/python -m pip install --quiet --disable-pip-version-check -c requirements/constraints.txt $$wheel; \
	cd $$away && venv/bin/adamerge --cfg job > /dev/null; \
	venv/bin/adamerge experiment=smoke method=task_arithmetic threads=1 print_config=false > /dev/null; \
	test -s results/raw/smoke.jsonl; echo "wheel-check: the installed wheel ran in $$away, outside the checkout"; \
	rm -rf $$away

clean:
	rm -rf $(VENV) outputs multirun dist build
