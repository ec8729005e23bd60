#!/usr/bin/env bash
# The GitHub Action's step (action.yml): install trainguard, scan, write SARIF and a summary.
# Runs the same anywhere: INPUT_* variables in, exit code of `trainguard scan` out
# (0 clean, 1 findings at or above INPUT_FAIL_ON, 2 error).
# TRAINGUARD_ACTION_NO_INSTALL=1 uses the trainguard already on PATH (tests, images).
set -euo pipefail
paths="${INPUT_PATHS:-.}"
fail_on="${INPUT_FAIL_ON:-high}"
sarif="${INPUT_SARIF:-trainguard.sarif}"
here="$(cd "$(dirname "$0")/.." && pwd)"

if [ "${TRAINGUARD_ACTION_NO_INSTALL:-}" != "1" ]; then
    if [ -n "${INPUT_VERSION:-}" ]; then
        python -m pip install --quiet "trainguard==${INPUT_VERSION}"
    else
        python -m pip install --quiet "$here"
    fi
fi

args=()
# Word splitting on spaces and newlines is the input's documented format.
read -r -d '' -a path_list <<< "$paths" || true
for glob in ${INPUT_EXCLUDE:-}; do
    args+=(--exclude "$glob")
done

status=0
trainguard scan "${path_list[@]}" "${args[@]}" --no-progress --fail-on "$fail_on" \
    --format sarif --output "$sarif" || status=$?
if [ "$status" -ge 2 ]; then
    echo "::error title=trainguard::the scan could not complete (exit $status)"
    exit "$status"
fi
# A readable summary for the run page (and the log), read from the SARIF just
# written rather than scanning twice.
summary="$(python - "$sarif" <<'PY'
import json, sys
results = json.load(open(sys.argv[1]))["runs"][0]["results"]
print(f"{len(results)} finding(s)")
for r in results[:50]:
    loc = r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] if r.get("locations") else ""
    print(f"  {r.get('level', 'none'):8} {r['ruleId']:7} {loc}: {r['message']['text'][:160]}")
if len(results) > 50:
    print(f"  ... and {len(results) - 50} more in the SARIF report")
PY
)"
echo "$summary"
if [ -n "${GITHUB_STEP_SUMMARY:-}" ]; then
    {
        echo "### trainguard scan"
        echo '```'
        echo "$summary"
        echo '```'
    } >> "$GITHUB_STEP_SUMMARY"
fi
if [ "$status" -eq 1 ]; then
    echo "::error title=trainguard::findings at or above ${fail_on}: see the SARIF report ${sarif}"
fi
exit "$status"
