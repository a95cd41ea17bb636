#!/usr/bin/env bash
# Mutation testing on demand (not in CI: minutes to hours per module on a CPU).
#
#   scripts/mutation.sh MODULE [TEST_FILE ...]
#   scripts/mutation.sh judges                  # the module's fast tests, from TESTS below
#   scripts/mutation.sh realign tests/test_oracle_realign.py
#
# Runs mutmut 3 (PyPI) over hsr_core/MODULE.py against the given (or the module's) fast tests,
# in a scratch copy of the working tree (.cache/mutation/MODULE: the repository itself is never
# mutated), with mutmut installed beside the project's venv (.cache/mutmut-VERSION, on
# PYTHONPATH only for this run). Prints mutmut's summary, the score (killed / (killed +
# survived)) and every survivor's diff; docs/MUTATION.md records the scores and which
# survivors are equivalent. Environment: JOBS (parallel mutants, default 2), NICE (default 19),
# ONLY (mutmut's mutant-name patterns, space-separated, e.g. ONLY='hsr_core.evaluate.x_rates*
# hsr_core.evaluate.x_rsr*': only those functions' mutants; default all of the module's),
# KEEP=1 (go on in the scratch copy of an earlier run, its tests/ refreshed from the working
# tree: mutmut keeps each verdict; with ONLY naming survivors, reruns just those),
# TIMEOUT_CONSTANT / TIMEOUT_MULTIPLIER (mutmut's, default 30 s and 10x: a mutant is "timeout"
# after (its tests' measured time + 30 s) * 10 of wall clock; changing them reruns only the
# mutants recorded as timeouts).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MUTMUT_VERSION=3.8.1

module=${1:?usage: scripts/mutation.sh MODULE [TEST_FILE ...]}
shift
module=${module%.py}
module=${module#hsr_core/}
[[ -f hsr_core/$module.py ]] || { echo "error: no hsr_core/$module.py" >&2; exit 2; }

declare -A TESTS=(
  [judges]="tests/test_oracle_judges.py tests/test_core_judges.py tests/test_oracle_evaluate.py"
  [evaluate]="tests/test_oracle_evaluate.py tests/test_oracle_evaluate_records.py tests/test_oracle_evaluate_report.py tests/test_oracle_generation.py tests/test_core_judges.py tests/test_core_stats.py"
  [heads]="tests/test_core_heads.py tests/test_oracle_realign.py"
  [realign]="tests/test_oracle_realign.py"
  [ships]="tests/test_oracle_ships.py"
  [wanda]="tests/test_oracle_wanda.py"
  [masks]="tests/test_oracle_masks.py"
  [variants]="tests/test_oracle_variants.py"
  [hooks]="tests/test_oracle_hooks.py"
  [stats]="tests/test_oracle_stats.py tests/test_core_stats.py"
  [pipeline]="tests/test_oracle_pipeline.py"
  [sparsegpt]="tests/test_oracle_sparsegpt.py tests/test_core_sparsegpt.py"
  [snip]="tests/test_oracle_snip.py"
  [screen]="tests/test_oracle_screen.py"
  [localize]="tests/test_oracle_localize.py tests/test_core_localize.py"
)
if [[ $# -gt 0 ]]; then
  tests=("$@")
elif [[ -n ${TESTS[$module]:-} ]]; then
  read -r -a tests <<<"${TESTS[$module]}"
else
  echo "error: no default tests for $module; name them: scripts/mutation.sh $module tests/test_x.py" >&2
  exit 2
fi

if [[ -x .venv/bin/python ]]; then PY=$ROOT/.venv/bin/python; else PY=$(command -v python3); fi
PKGS=$ROOT/.cache/mutmut-$MUTMUT_VERSION
if [[ ! -f $PKGS/.done ]]; then
  echo "--- installing mutmut $MUTMUT_VERSION into $PKGS (once)"
  rm -rf "$PKGS"
  "$PY" -m pip install -q --target "$PKGS" "mutmut==$MUTMUT_VERSION"
  # the venv's own pytest and its plugins, not the copies pip put beside mutmut
  (cd "$PKGS" && rm -rf pytest pytest-* _pytest pluggy pluggy-* iniconfig iniconfig-* \
    packaging packaging-* py.py)
  touch "$PKGS/.done"
fi

WORK=$ROOT/.cache/mutation/$module
if [[ ${KEEP:-0} != 1 || ! -f $WORK/setup.cfg ]]; then
  rm -rf "$WORK"
  mkdir -p "$WORK"
  git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$WORK"
else  # the tests as they are now: a rerun of survivors sees the tests written for them
  git ls-files -co --exclude-standard -z -- tests | tar --null -T - -cf - | tar -xf - -C "$WORK"
fi
{
  echo "[mutmut]"
  echo "source_paths = hsr_core"
  echo "only_mutate = hsr_core/$module.py"
  echo "also_copy ="
  echo "    assets/"
  echo "    ui/"
  echo "    app.py"
  echo "pytest_add_cli_args ="  # one argument a line (mutmut splits on new lines only)
  printf '    %s\n' -p no:cacheprovider -x
  echo "pytest_add_cli_args_test_selection ="
  for t in "${tests[@]}"; do echo "    $t"; done
  echo "process_isolation = forkserver"
  # mutmut's wall-clock limit is (estimated test time + constant) * multiplier, its CPU limit
  # twice that; its defaults (1 s, 15x) call most mutants "timeout" at nice 19 on a loaded
  # 2-core machine (a run of a few seconds' CPU waits minutes for a core), so they are raised
  echo "timeout_constant = ${TIMEOUT_CONSTANT:-30}"
  echo "timeout_multiplier = ${TIMEOUT_MULTIPLIER:-10}"
  echo "use_git_change_detection = False"
} >"$WORK/setup.cfg"

echo "--- mutmut over hsr_core/$module.py against: ${tests[*]}"
cd "$WORK"
export PYTHONPATH=$PKGS OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TQDM_DISABLE=1
export HSR_CACHE_DIR=$WORK/.cache/hsr
start=$(date +%s)
read -r -a only <<<"${ONLY:-}"
nice -n "${NICE:-19}" "$PY" -m mutmut run --max-children "${JOBS:-2}" "${only[@]}" || true
echo "--- $(($(date +%s) - start)) s"
"$PY" -m mutmut results --all true >"$WORK/results.txt" 2>&1 || "$PY" -m mutmut results >"$WORK/results.txt" 2>&1 || true
"$PY" - "$WORK/results.txt" <<'PY'
import collections, re, sys
counts = collections.Counter()
for line in open(sys.argv[1]):
    m = re.match(r"\s*(\S+__mutmut_\d+): (.+)$", line)
    if m:
        counts[m.group(2).strip()] += 1
killed, survived = counts["killed"] + counts["timeout"], counts["survived"]
print("--- mutants:", dict(counts))
if killed + survived:
    print(f"--- score: {killed}/{killed + survived} = {100 * killed / (killed + survived):.1f}% killed")
PY
for name in $(grep -E ": survived$" "$WORK/results.txt" | sed 's/: survived$//' | tr -d ' '); do
  echo "=== $name"
  "$PY" -m mutmut show "$name" 2>/dev/null | tail -n +2 || true
done
