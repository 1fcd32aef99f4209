# The two commands a newcomer needs: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# A Python >= 3.11 found on this machine; override with `make test PYTHON=python3.12`.
PYTHON ?= $(shell for p in python3 python3.12 python3.13 python3.11 python; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	&& { echo $$p; break; }; done)
PYTEST_ARGS ?= --durations=15
DEMO_DIR ?= runs/demo
METHODS_DIR ?= runs/methods
METHODS := $(PY) -m experiments.methods --config=experiments/configs/methods.py --workdir=$(METHODS_DIR)

.PHONY: test test-slow test-py312 test-min lint format typecheck demo methods \
	methods-tune methods-quick methods-muon methods-cnn methods-seeds methods-momentum studies bench venv clean docs notebooks

$(PY):
	@test -n "$(PYTHON)" || { echo "No Python >= 3.11 found; set PYTHON=/path/to/python3.11+"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

$(VENV)/.installed-experiments: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[experiments]'
	touch $@

venv: $(VENV)/.installed-dev

$(VENV)/.installed-docs: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[docs]'
	touch $@

test: $(VENV)/.installed-dev
	$(PY) -m pytest -n auto -m "not slow" $(PYTEST_ARGS)

test-slow: $(VENV)/.installed-dev
	$(PY) -m pytest -n auto -m slow $(PYTEST_ARGS)

# The same suite on Python 3.12, which gets the newest JAX (0.12 at the time of writing).
# Under pyenv a bare `python3.12` may be a shim that refuses to run, so the
# interpreter is looked up in pyenv's versions too.
PYTHON312 ?= $(shell for p in python3.12 $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.12*/bin/python3.12 2>/dev/null); do \
	$$p -c '' 2>/dev/null && { echo $$p; break; }; done)
test-py312:
	@test -n "$(PYTHON312)" || { echo "No Python 3.12 found; set PYTHON312=/path/to/python3.12"; exit 1; }
	$(MAKE) test PYTHON=$(PYTHON312) VENV=.venv-py312

# The contributor contract (seconds; mypy's first run ~15 s): `make lint`
# checks, never rewrites; `make format` applies the import order and pyink's
# layout.
# Settings: [tool.ruff] and [tool.pyink] in pyproject.toml.
LINT_PATHS := dcasgd_optax experiments tests benchmarks
lint: $(VENV)/.installed-dev
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m pyink --check $(LINT_PATHS)

format: $(VENV)/.installed-dev
	$(PY) -m ruff check --fix --select I $(LINT_PATHS)
	$(PY) -m pyink $(LINT_PATHS)

# mypy over the library ([tool.mypy] in pyproject.toml) against the packages
# of the interpreter TYPECHECK_PY (its Python version too):
# `make typecheck TYPECHECK_PY=.venv-py312/bin/python` checks it against the
# newest JAX. mypy itself runs from $(VENV).
TYPECHECK_PY ?= $(PY)
typecheck: $(VENV)/.installed-dev
	$(PY) -m mypy --python-executable $(TYPECHECK_PY)

# The core and harness tests against the declared minimum versions of jax,
# optax, numpy, chex and flax (.ci/min-constraints.txt), in their own venv.
VENV_MIN ?= .venv-min
# pytest-xdist workers for test-min (`make test-min MIN_WORKERS=2` on a
# shared machine).
MIN_WORKERS ?= auto
MIN_TESTS := $(addprefix tests/,test_alias.py test_contract.py \
	test_delay_compensation.py test_delayed_nesterov.py test_fused.py \
	test_gap_aware.py test_look_ahead.py test_pull.py test_pull_nnx.py \
	test_staleness.py test_harness_diagnostics.py test_harness_multidevice.py \
	test_harness_plan.py test_harness_protocol.py test_harness_schedules.py \
	test_harness_simulator.py test_harness_sync_simulator.py)
$(VENV_MIN)/.installed-min: pyproject.toml .ci/min-constraints.txt
	@test -n "$(PYTHON)" || { echo "No Python >= 3.11 found; set PYTHON=/path/to/python3.11+"; exit 1; }
	test -x $(VENV_MIN)/bin/python || $(PYTHON) -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_MIN)/bin/python -m pip install --quiet -e '.[test]' flax --constraint .ci/min-constraints.txt
	touch $@

test-min: $(VENV_MIN)/.installed-min
	$(VENV_MIN)/bin/python -m pytest -n $(MIN_WORKERS) -m "not slow" $(PYTEST_ARGS) $(MIN_TESTS)

demo: $(VENV)/.installed-experiments
	$(PY) -m experiments.compare --config=experiments/configs/demo.py --workdir=$(DEMO_DIR)

# The evidence grid on the reported seeds, with the committed tuning choice;
# the tables and plots are then copied to experiments/results/methods.
METHODS_RESULTS ?= experiments/results/methods
# The tuning choice reported. The committed one predates SSGD, the straggler
# column, Muon and the new rows: after `make methods-tune`, pass
# METHODS_TUNED=$(METHODS_DIR)/tuned.json.
METHODS_TUNED ?= $(METHODS_RESULTS)/tuned.json
METHODS_FILES := table.md tuned.md stats.json results.csv gap_closed.png errors.png diagnostics.png
methods: $(VENV)/.installed-experiments
	$(METHODS) --stage=report --tuned=$(METHODS_TUNED)
	cd $(METHODS_DIR) && cp $(METHODS_FILES) $(abspath $(METHODS_RESULTS))/

# The tuning sweep that chose experiments/results/methods/tuned.json (long:
# see experiments/README.md); it writes $(METHODS_DIR)/tuned.json.
methods-tune: $(VENV)/.installed-experiments
	$(METHODS) --stage=tune

# The quick tier: the target cells only, tuned and reported in one go (see
# experiments/README.md for its runtime); the report stays in
# $(METHODS_QUICK_DIR).
METHODS_QUICK_DIR ?= runs/methods-quick
methods-quick: $(VENV)/.installed-experiments
	$(PY) -m experiments.methods --config=experiments/configs/methods.py:quick \
		--workdir=$(METHODS_QUICK_DIR) --stage=all

# Muon, the fourth inner optimizer, in the quick tier's M = 16 cells: its own
# tier (Muon's runs cost about 8x a plain one on CPU).
METHODS_MUON_DIR ?= runs/methods-muon
methods-muon: $(VENV)/.installed-experiments
	$(PY) -m experiments.methods --config=experiments/configs/methods.py:muon \
		--workdir=$(METHODS_MUON_DIR) --stage=all

# The second model (small_cnn) in two of the quick tier's cells, tuned and
# reported the same way: the choose-a-method table checks its picks on it.
METHODS_CNN_DIR ?= runs/methods-cnn
methods-cnn: $(VENV)/.installed-experiments
	$(PY) -m experiments.methods --config=experiments/configs/methods.py:cnn \
		--workdir=$(METHODS_CNN_DIR) --stage=all

# The quick tier's momentum cells on 20 reported seeds, at its tuned settings
# (no new tuning): resolves the momentum target's last points.
METHODS_SEEDS_DIR ?= runs/methods-seeds
methods-seeds: $(VENV)/.installed-experiments
	$(PY) -m experiments.methods --config=experiments/configs/methods.py:seeds \
		--workdir=$(METHODS_SEEDS_DIR) --stage=report \
		--tuned=experiments/results/methods-quick/tuned.json

# SGD with momentum at M = 8 and 32: the delayed Nesterov rows, tuned and
# reported as the quick tier is (does the M = 16 pick hold at other M?).
METHODS_MOMENTUM_DIR ?= runs/methods-momentum
methods-momentum: $(VENV)/.installed-experiments
	$(PY) -m experiments.methods --config=experiments/configs/methods.py:momentum \
		--workdir=$(METHODS_MOMENTUM_DIR) --stage=all

# The studies behind issue 18's analysis (experiments/README.md): time to
# accuracy with a 40-epoch cap (needs the quick tier's committed results),
# the exact correction's reach, and the secant-curvature trial.
studies: $(VENV)/.installed-experiments
	$(PY) -m experiments.time_to_accuracy \
		--config=experiments/configs/time_to_accuracy.py --workdir=runs/time_to_accuracy
	$(PY) -m experiments.taylor_reach \
		--config=experiments/configs/taylor_reach.py --workdir=runs/taylor_reach
	$(PY) -m experiments.secant_trial \
		--config=experiments/configs/secant_trial.py --workdir=runs/secant_trial

bench: $(VENV)/.installed-dev
	$(PY) benchmarks/update_cost.py
	$(PY) benchmarks/harness_throughput.py

# The documentation site, offline, warnings as errors (and a public name
# without an API page is an error): docs/_build/html/index.html.
SPHINX_ARGS ?= -W --keep-going -n
docs: $(VENV)/.installed-docs
	$(PY) -m sphinx -b html $(SPHINX_ARGS) docs docs/_build/html

# Reruns the notebooks in place, so the committed files show their outputs.
notebooks: $(VENV)/.installed-dev
	$(PY) notebooks/execute.py

clean:
	rm -rf $(VENV) .venv-py312 .venv-min runs .pytest_cache docs/_build docs/_generated
