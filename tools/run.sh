#!/usr/bin/env bash
# The project's commands, each working on a fresh clone by itself:
#   bash tools/run.sh demo [args]        the main job: tools/demo.py (writes out/demo.png)
#   bash tools/run.sh test [args]        the tests: pytest tests (CI runs exactly this); or given files:
#                                        bash tools/run.sh test tests/test_fuzz.py -q
#   bash tools/run.sh benchmark [args]   tools/benchmark.py (10-15 min and 5 GB with its defaults)
#   bash tools/run.sh quality [args]     tools/quality_benchmark.py (~30 min; --replot redraws in seconds)
#   bash tools/run.sh controlnet [args]  tools/controlnet_benchmark.py (SD1.5 + ControlNet; ~5 min, 5 GB on CPU)
#   bash tools/run.sh compare --old DIR  tools/compare_revisions.py: another revision vs this one, one process
# Each first provisions the test host (tools/setup_test_host.sh --browser: ~3 min once; afterwards it only
# checks its stamp), then runs under .testhost/venv/bin/python with OMP_NUM_THREADS=1 unless you set it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
usage() { sed -n '2,9s/^# \{0,1\}//p' "$0" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
command="$1"; shift
case "$command" in
  demo)      args=(tools/demo.py) ;;
  test)      args=(-m pytest); [[ " $* " == *" tests"* ]] || args+=(tests) ;;   # all tests unless some are named
  benchmark) args=(tools/benchmark.py) ;;
  quality)   args=(tools/quality_benchmark.py) ;;
  controlnet) args=(tools/controlnet_benchmark.py) ;;
  compare)   args=(tools/compare_revisions.py) ;;
  *)         usage ;;
esac
bash tools/setup_test_host.sh --browser
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"   # two threads can run many times slower on small machines
exec .testhost/venv/bin/python "${args[@]}" "$@"
