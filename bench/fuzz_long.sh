#!/usr/bin/env bash
# A long fuzz run of every format parser: the property-based tests of `make test`
# (no crash, no hang, no unbounded memory, never a silent "clean") with every
# example count multiplied by SCALE (default 50, about 15-25 minutes on 2 cores).
#
#   bash bench/fuzz_long.sh [SCALE]
#
# Prints pytest's summary, the wall time and the peak memory of the whole run;
# record them in docs/benchmarks.md ("Fuzzing") with the machine and date.
# Hypothesis keeps failing examples in .hypothesis/ and replays them first next time.
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${1:-50}
PY=${PYTHON:-.venv/bin/python}
FILES=(
  tests/test_bounds.py tests/test_ziplenient.py tests/test_protobuf.py
  tests/test_fmt_gguf.py tests/test_fmt_safetensors.py tests/test_fmt_onnx.py
  tests/test_fmt_savedmodel.py tests/test_fmt_keras.py tests/test_templates.py
  tests/test_ledger_chain.py tests/test_seal_fuzz.py
)
echo "fuzz scale x$SCALE on $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ)" >&2
TRAINGUARD_FUZZ_SCALE=$SCALE /usr/bin/time -f "wall %e s, peak RSS %M KiB" \
  "$PY" -m pytest -q -p no:cacheprovider -k "fuzz" "${FILES[@]}"
