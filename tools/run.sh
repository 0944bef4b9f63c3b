#!/usr/bin/env bash
# The project's commands, each working on a fresh clone by itself:
#   bash tools/run.sh demo [args]        the main job: tools/demo.py (writes out/demo.png)
#   bash tools/run.sh test [args]        the tests: pytest tests on each ComfyUI test host in turn, 0.3.75 then
#                                        0.33.0 (CI runs exactly this); or given files: run.sh test tests/x.py -q
#   bash tools/run.sh benchmark [args]   tools/benchmark.py (10-15 min and 5 GB with its defaults)
#   bash tools/run.sh quality [args]     tools/quality_benchmark.py (~30 min; --replot redraws in seconds)
#   bash tools/run.sh controlnet [args]  tools/controlnet_benchmark.py (SD1.5 + ControlNet; ~5 min, 5 GB on CPU)
#   bash tools/run.sh models [args]      tools/diffusers_models_benchmark.py (IF, video, AnimateDiff, ControlNet, DiT in diffusers)
#   bash tools/run.sh dit [args]         tools/dit_benchmark.py (the trained Flux-shaped model vs EasyCache and fewer steps)
#   bash tools/run.sh onepass [args]     tools/onepass_benchmark.py (TiUE students vs their teacher's few steps)
#   bash tools/run.sh tiue [args]        tools/train_tiue.py (distil a one-pass student: --digits, --fashion, --teacher)
#   bash tools/run.sh split [args]       tools/split_benchmark.py (decoders split across 1, 2, 3 CPU processes; ~3 min)
#   bash tools/run.sh compare --old DIR  tools/compare_revisions.py: another revision vs this one, one process
# FD_COMFYUI=0.33.0 (or 0.3.75) picks one host for any command; the tools default to 0.3.75, `test` runs both
# (COMFYUI_PATH=/your/ComfyUI: that tree alone).
# Each first provisions its host (tools/setup_test_host.sh --browser: ~3 min once per host; afterwards it only
# checks its stamp), then runs under the host's venv python with OMP_NUM_THREADS=1 unless you set it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
usage() { sed -n '2,18s/^# \{0,1\}//p' "$0" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
command="$1"; shift
case "$command" in
  demo)      args=(tools/demo.py) ;;
  test)      args=(-m pytest); [[ " $* " == *" tests"* ]] || args+=(tests) ;;   # all tests unless some are named
  benchmark) args=(tools/benchmark.py) ;;
  quality)   args=(tools/quality_benchmark.py) ;;
  controlnet) args=(tools/controlnet_benchmark.py) ;;
  models)    args=(tools/diffusers_models_benchmark.py) ;;
  dit)       args=(tools/dit_benchmark.py) ;;
  onepass)   args=(tools/onepass_benchmark.py) ;;
  tiue)      args=(tools/train_tiue.py) ;;
  split)     args=(tools/split_benchmark.py) ;;
  compare)   args=(tools/compare_revisions.py) ;;
  *)         usage ;;
esac
hosts="${FD_COMFYUI:-}"
if [[ -z "$hosts" ]]; then
  hosts="0.3.75"   # your own tree (COMFYUI_PATH) is one host, in the 0.3.75 venv unless FD_COMFYUI names the other
  [[ $command == test && -z "${COMFYUI_PATH:-}" ]] && hosts="0.3.75 0.33.0"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"   # two threads can run many times slower on small machines
status=0 summary=()
for version in $hosts; do
  bash tools/setup_test_host.sh --comfy "$version" --browser
  case "$version" in
    0.3.75) venv=.testhost/venv; dir=.testhost/ComfyUI ;;
    0.33.0) venv=.testhost/venv-0.33.0; dir=.testhost/ComfyUI-0.33.0 ;;
  esac
  [[ -n "${COMFYUI_PATH:-}" ]] && dir="$COMFYUI_PATH"
  echo "== ComfyUI $version ($dir): $command"
  if COMFYUI_PATH="$(cd "$dir" && pwd)" "$venv/bin/python" "${args[@]}" "$@"; then
    summary+=("ComfyUI $version: $command passed")
  else
    status=$?; summary+=("ComfyUI $version: $command FAILED (exit $status)")
  fi
done
[[ $hosts == *" "* ]] && printf '%s\n' "${summary[@]}"
exit $status
