#!/usr/bin/env bash
# Mutation testing of the pure modules with fast in-process tests (mutmut; config: [tool.mutmut] in
# pyproject.toml). Each mutant is one small change to the code (a flipped comparison, a changed
# constant, a dropped call); a mutant "killed" made a test fail, a "survived" one is a change no test
# noticed. Survivors: `mutmut show NAME` shows the change, `mutmut browse` all of them.
#   scripts/mutation.sh                       every module: policy keepalive auth dialects scheduler manager
#   scripts/mutation.sh policy dialects       only these (names under proxy/, dots for submodules:
#                                             dialects.ollama)
#   scripts/mutation.sh --report              the kill rates of the last runs, running nothing
# MUTMUT_CHILDREN (default 2) sets how many mutants run at once. Work files go to mutants/ (ignored
# by git); results stay there, so a later --report shows every module run so far.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/mutmut ]; then PATH="$PWD/.venv/bin:$PATH"; fi
modules=()
report_only=0
for arg in "$@"; do
  if [ "$arg" = "--report" ]; then report_only=1; else modules+=("$arg"); fi
done
if [ ${#modules[@]} -eq 0 ]; then modules=(policy keepalive auth dialects scheduler manager); fi
if [ "$report_only" = 0 ]; then
  # mutmut keeps a verdict for an unchanged mutant; a named run tests its mutants again
  for module in "${modules[@]}"; do
    echo "== proxy.$module"
    mutmut run --max-children "${MUTMUT_CHILDREN:-2}" "proxy.$module.*" >/dev/null || {
      echo "mutmut failed on proxy.$module (run it by hand to see why: mutmut run 'proxy.$module.*')" >&2
      exit 1
    }
  done
fi
mutmut results --all true | python3 -c '
import collections, sys
modules = sys.argv[1:]
counts = collections.defaultdict(collections.Counter)
survivors = collections.defaultdict(list)
for line in sys.stdin:
    name, _, status = line.strip().rpartition(": ")
    module = name.split(".x", 1)[0]  # proxy.dialects.ollama.x_translate__mutmut_3 -> proxy.dialects.ollama
    group = next((m for m in modules if module == "proxy." + m or module.startswith("proxy." + m + ".")), None)
    if group is None or status == "not checked":
        continue
    counts[group][status] += 1
    if status not in ("killed", "timeout", "caught by type check"):
        survivors[group].append(f"{name} ({status})")
print("module                  killed  total    rate   (timeouts count as killed)")
for m in modules:
    c = counts[m]
    total = sum(c.values())
    if not total:
        print(f"{m:<22} not run yet")
        continue
    killed = c["killed"] + c["timeout"] + c["caught by type check"]
    print(f"{m:<22} {killed:>7} {total:>6} {100 * killed / total:>6.1f}%")
for m in modules:
    for s in survivors[m]:
        print("  not killed:", s)
' "${modules[@]}"
