#!/usr/bin/env bash
# Prepare the real-host test (tests/test_webui_real.py): AUTOMATIC1111 v1.10.1 and Forge Classic, offline, CPU.
#
# Usage:  tools/setup_webui_hosts.sh [--a1111 DIR] [--forge DIR] [--only a1111|forge]
#         (or A1111_PATH=DIR FORGE_PATH=DIR tools/setup_webui_hosts.sh)
#
# NEEDS
#   - python3.11, git, tar; PyPI through pip (torch 2.13.0 CPU resolves from the local wheel dir /opt/wheels
#     here, any CPU torch 2.13.0 wheel elsewhere); no other network.  ~7 GB disk under WEBUI_HOSTS
#     (each host 2.2 GB, the checkpoint 2.1 GB).
#   - The host sources, which this script cannot download (neither host is on any registry).  Bring them
#     with the session tool `fetch` (bare git dirs under $MIRRORS = /work/.mirror by default):
#       github:chirag127/stable-diffusion-webui   commit 82a973c04367123ae98bd9abdf80d9eda9b910e2 = A1111 tag
#           v1.10.1 ("changelog"; the AUTOMATIC1111/stable-diffusion-webui snapshot itself is 1.6 GB, too big
#           to fetch; this fork holds the same commit)
#       github:Haoming02/sd-webui-forge-classic     branch classic, commit 1f95d7170189cf93952aca122c1ee2f306a07e4c
#       and the repositories/ both hosts import, at the hashes of A1111's launch_utils.py:354-358:
#       github:Stability-AI/stablediffusion           cf1d67a6fd5ea1aa600c4df58e5b47da45f6bdbf  (ldm)
#       github:Stability-AI/generative-models         45c443b316737a4ab6e40413d7794a7f5657c19f  (sgm)
#       github:crowsonkb/k-diffusion                  ab527a9a6d347f364e3d185ba6d714e22d80cb3c  (A1111 only)
#       github:salesforce/BLIP                        48211a1594f1321b00f14c9f7a5b4813144b2fb9  (A1111 only)
#       github:AUTOMATIC1111/stable-diffusion-webui-assets  6f7db241d2f8ba7457bac5ca9753331f0c266917
#     A checkout DIR that does not exist yet is made from those mirrors (`git archive`); an existing DIR is
#     used as it is (it must be that revision).  The repositories/ are always filled from the mirrors.
#
# MAKES (everything outside this repository; WEBUI_HOSTS defaults to /work/webui-hosts)
#   DIR/repositories/*     the five source trees above (A1111: all five; Forge Classic: ldm, sgm, assets)
#   DIR/venv               per host: CPU torch 2.13.0 + torchvision 0.28.0, the host's own requirement pins
#                          from PyPI except the ones changed below (each with its reason)
#   $WEBUI_HOSTS/hf        an HF_HOME whose hub cache holds openai/clip-vit-large-patch14's tokenizer
#                          (vocab.json + merges.txt rebuilt from the CLIP BPE file that the PyPI package
#                          open-clip-torch ships, ids identical to the hub's) and its config.json (A1111 builds
#                          its text encoder from the config; no weights are needed or downloaded)
#   $WEBUI_HOSTS/ckpt/random_sd15_seed0.safetensors
#                          for Forge Classic (it detects the model family from the keys, so A1111's keyless
#                          test/test_files/empty.pt cannot serve): every tensor of configs/v1-inference.yaml's
#                          LatentDiffusion (UNet, VAE, CLIP-L text encoder; 1.07 B parameters), stored fp16,
#                          drawn in sorted-key order from one torch.Generator seeded 0:
#                            weights of 2+ dims (conv, linear, embeddings) ~ N(0, 1/fan_in), fan_in = numel/shape[0]
#                            1-dim *.weight (all norm scales) = 1, 1-dim *.bias = 0
#                            buffers (noise schedule, position_ids) = their real values
#
# HOW LONG (2 cores): 3 min for both hosts with a warm pip cache (each venv ~75 s, HF_HOME 1 s, the checkpoint
# ~25 s); the first run here, with a cold pip cache (~3 GB of wheels), took ~11 min.
# A second run only checks its stamps (a second or two).
# It prints the env vars and the pytest command at the end.
set -euo pipefail
export OMP_NUM_THREADS=1

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOSTS="${WEBUI_HOSTS:-/work/webui-hosts}"
MIRRORS="${MIRRORS:-/work/.mirror}"
PY="${PYTHON:-python3.11}"
A1111_DIR="${A1111_PATH:-}" FORGE_DIR="${FORGE_PATH:-}" ONLY=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --a1111) A1111_DIR="$2"; shift ;;
    --forge) FORGE_DIR="$2"; shift ;;
    --only) ONLY="$2"; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "setup_webui_hosts.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
[[ "$ONLY" == forge ]] && A1111_DIR=""
[[ "$ONLY" == a1111 ]] && FORGE_DIR=""
if [[ -z "$A1111_DIR$FORGE_DIR" && -z "$ONLY" ]]; then     # defaults: both, next to the other host files
  A1111_DIR="$HOSTS/a1111" FORGE_DIR="$HOSTS/forge-classic"
fi
[[ "$ONLY" == a1111 && -z "$A1111_DIR" ]] && A1111_DIR="$HOSTS/a1111"
[[ "$ONLY" == forge && -z "$FORGE_DIR" ]] && FORGE_DIR="$HOSTS/forge-classic"
case "$ROOT/" in "$HOSTS"/*) echo "WEBUI_HOSTS must lie outside the repository" >&2; exit 2 ;; esac
mkdir -p "$HOSTS"
HF="$HOSTS/hf" CKPT="$HOSTS/ckpt/random_sd15_seed0.safetensors"
# each stage leaves a stamp; bump a stage's recipe version when its steps change, and the next run redoes it
VENV_RECIPE=venv-1 HF_RECIPE=hf-2 CKPT_RECIPE=ckpt-seed0-1
log() { printf '[setup_webui_hosts %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

A1111_COMMIT=82a973c04367123ae98bd9abdf80d9eda9b910e2          # tag v1.10.1
FORGE_REV="${FORGE_REV:-1f95d7170189cf93952aca122c1ee2f306a07e4c}"   # Haoming02/sd-webui-forge-classic, branch classic (21 Feb 2025)
# name  mirror  commit  (the hashes of A1111 v1.10.1 launch_utils.py:354-358; Forge Classic pins the same)
REPOS="stable-diffusion-stability-ai Stability-AI+stablediffusion cf1d67a6fd5ea1aa600c4df58e5b47da45f6bdbf
generative-models Stability-AI+generative-models 45c443b316737a4ab6e40413d7794a7f5657c19f
k-diffusion crowsonkb+k-diffusion ab527a9a6d347f364e3d185ba6d714e22d80cb3c
BLIP salesforce+BLIP 48211a1594f1321b00f14c9f7a5b4813144b2fb9
stable-diffusion-webui-assets AUTOMATIC1111+stable-diffusion-webui-assets 6f7db241d2f8ba7457bac5ca9753331f0c266917"

mirror() {  # the bare git dir of a fetched snapshot
  local d="$MIRRORS/$1/repo"
  [[ -d "$d" ]] || { echo "missing $d: fetch github:${1/+//} with the session's fetch tool first" >&2; exit 1; }
  echo "$d"
}

extract() {  # extract MIRROR REV DEST: a plain tree of MIRROR at REV (no .git), made once
  local git_dir; git_dir="$(mirror "$1")"
  [[ -f "$3/.fd-tree" && "$(cat "$3/.fd-tree")" == "$2" ]] && return 0
  git --git-dir="$git_dir" cat-file -e "$2^{commit}" 2>/dev/null \
    || { echo "$1 has no commit $2: fetch a newer snapshot" >&2; exit 1; }
  rm -rf "$3.part" && mkdir -p "$3.part"
  # a snapshot may leave out its largest blobs (sample images, e.g. stablediffusion's assets/*.png): skip those
  local missing
  missing="$(git --git-dir="$git_dir" ls-tree -r "$2" | awk -F'\t' '{split($1, a, " "); if (a[2] == "blob") print a[3], $2}' \
    | while read -r sha path; do
        git --git-dir="$git_dir" cat-file -e "$sha" 2>/dev/null || printf '%s\n' "$path"; done)"
  local excludes=()
  while IFS= read -r path; do [[ -n "$path" ]] && excludes+=(":(exclude)$path"); done <<< "$missing"
  git --git-dir="$git_dir" archive "$2" -- . "${excludes[@]}" 2> >(grep -v '^error: invalid object' >&2) \
    | tar -x -C "$3.part"
  [[ -z "$missing" ]] || printf '%s\n' "$missing" > "$3.part/.fd-missing-from-snapshot"
  if [[ -d "$3" ]]; then rm -rf "$3"; fi
  mv "$3.part" "$3" && echo "$2" > "$3/.fd-tree"
}

checkout() {  # checkout DIR MIRROR REV: make DIR from the mirror unless it exists
  if [[ -e "$1/launch.py" ]]; then return 0; fi
  log "making $1 from $2 at $3"
  local git_dir; git_dir="$(mirror "$2")"
  mkdir -p "$1"
  git --git-dir="$git_dir" archive "$3" | tar -x -C "$1"
  # the host reads its version with `git describe`: give the tree a one-commit repository tagged like upstream
  if [[ ! -d "$1/.git" ]]; then
    (cd "$1" && git init -q && git add -A >/dev/null && git -c user.name=setup -c user.email=setup@localhost \
       commit -qm "$(git --git-dir="$git_dir" log -1 --format=%s "$3") (from $3)" && \
       { [[ "$3" == "$A1111_COMMIT" ]] && git tag v1.10.1 || true; })
  fi
}

repositories() {  # repositories DIR NAME...: DIR/repositories/NAME at the pinned hashes
  local dir="$1"; shift
  mkdir -p "$dir/repositories"
  while read -r name mirror_name commit; do
    for want in "$@"; do
      [[ "$want" == "$name" ]] && extract "$mirror_name" "$commit" "$dir/repositories/$name"
    done
  done <<< "$REPOS"
}

make_venv() {  # make_venv DIR REQUIREMENTS_FILE EXTRA...: DIR/venv with CPU torch and the host's pins
  local dir="$1" reqs="$2"; shift 2
  local venv="$dir/venv" stamp="$dir/venv/.fd-ready"
  local want; want="$VENV_RECIPE $(md5sum "$dir/$reqs" | cut -c1-8)"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then return 0; fi
  log "venv $venv (a few minutes)"
  [[ -x "$venv/bin/python" ]] || "$PY" -m venv "$venv"
  pip() {  # quiet, without the noise of this machine's unused local index dirs; fails when pip fails
    "$venv/bin/python" -m pip install -q "$@" 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
  }
  local pip=(pip)
  "${pip[@]}" --upgrade pip
  # torch: the CPU build of 2.13.0.  Any unpinned torch requirement would pull the newest CUDA build, so
  # every later install runs under these constraints.
  printf 'torch==2.13.0\ntorchvision==0.28.0\n' > "$venv/constraints.txt"
  "${pip[@]}" torch==2.13.0
  # torchvision 0.28.0 (torch 2.13's match) is on PyPI only as a CUDA build: its _C.so needs libtorch_cuda and
  # never loads, and two unguarded register_fake("torchvision::nms"/"qnms") then raise at import.  The hosts
  # only use the pure-Python parts (transforms, ops without the C kernels): guard them (hosts.md B2).
  "${pip[@]}" --no-deps torchvision==0.28.0
  local sp; sp="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  sed -i 's/^@torch.library.register_fake("torchvision::\(q\?nms\)")/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))/' \
    "$sp/torchvision/_meta_registrations.py"
  # the host's pins, less torch (installed above) and setuptools (below).  A1111's file has CRLF line ends:
  # strip them, or the filter silently keeps `torch` and pip pulls a CUDA torch.
  tr -d '\r' < "$dir/$reqs" | sed 's/[[:space:]]*#.*$//' | grep -v -E '^[[:space:]]*$' \
    | grep -v -E '^(torch|torchvision|setuptools)([[:space:]]*[=<>!~].*)?$' > "$venv/requirements-fd.txt"
  # setuptools: the hosts pin 69.5.1; torch 2.13 needs >= 77.0.3, and pytorch_lightning's lightning_fabric still
  # imports pkg_resources, which setuptools 81 removed.
  "${pip[@]}" -r "$venv/requirements-fd.txt" "setuptools>=77.0.3,<81" "$@" -c "$venv/constraints.txt"
  "$venv/bin/python" -c 'import torch, torchvision, transformers, gradio; assert torch.__version__.startswith("2.13.0") and not torch.cuda.is_available(), torch.__version__'
  echo "$want" > "$stamp"
}

hf_home() {  # HF_HOME with openai/clip-vit-large-patch14's tokenizer and config, from a venv's open_clip
  local python="$1" snap="$HF/hub/models--openai--clip-vit-large-patch14"
  if [[ -f "$snap/.fd-ready" && "$(cat "$snap/.fd-ready")" == "$HF_RECIPE" ]]; then return 0; fi
  log "HF_HOME $HF (CLIP-L tokenizer from open_clip's bpe_simple_vocab_16e6.txt.gz)"
  "$python" - "$snap" "${FORGE_DIR:-}" <<'EOF'
import gzip, hashlib, importlib.util, json, os, sys
snap_root, forge = sys.argv[1], sys.argv[2]
bpe = os.path.join(os.path.dirname(importlib.util.find_spec("open_clip").origin), "bpe_simple_vocab_16e6.txt.gz")
# the construction of open_clip's SimpleTokenizer (= openai/CLIP's), which the hub's vocab.json/merges.txt mirror
def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b); cs.append(256 + n); n += 1
    return [chr(c) for c in cs]
lines = gzip.open(bpe).read().decode("utf-8").split("\n")
merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
vocab = bytes_to_unicode()
vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
assert len(vocab) == 49408
files = {
    "vocab.json": json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
    "merges.txt": "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
    "special_tokens_map.json": json.dumps({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                                           "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}),
    "tokenizer_config.json": json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
                                         "do_lower_case": True, "errors": "replace", "add_prefix_space": False,
                                         "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                                         "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}),
    # the hub's config.json of openai/clip-vit-large-patch14 (a CLIPModel; A1111 builds CLIPTextModel from
    # its text_config and loads no weights from the hub)
    "config.json": json.dumps({
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 768, "logit_scale_init_value": 2.6592,
        "initializer_factor": 1.0, "torch_dtype": "float32",
        "text_config": {"model_type": "clip_text_model", "vocab_size": 49408, "hidden_size": 768,
                        "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                        "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05,
                        "attention_dropout": 0.0, "dropout": 0.0, "initializer_range": 0.02,
                        "initializer_factor": 1.0, "projection_dim": 768,
                        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                          "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
                          "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05, "projection_dim": 768,
                          "attention_dropout": 0.0, "dropout": 0.0, "initializer_range": 0.02,
                          "initializer_factor": 1.0, "num_channels": 3}}, indent=1),
}
rev = hashlib.sha1("".join(files[k] for k in sorted(files)).encode()).hexdigest()
snap = os.path.join(snap_root, "snapshots", rev)
os.makedirs(snap, exist_ok=True)
os.makedirs(os.path.join(snap_root, "refs"), exist_ok=True)
for name, text in files.items():
    with open(os.path.join(snap, name), "w", encoding="utf-8") as f:
        f.write(text)
with open(os.path.join(snap_root, "refs", "main"), "w") as f:
    f.write(rev)
# cross-checks: the tokenizer transformers builds from these files gives the hub's ids, and (when a Forge Classic
# checkout is at hand) the files equal the copy Forge vendors in ldm_patched/modules/sd1_tokenizer
os.environ["HF_HOME"] = os.path.dirname(os.path.dirname(snap_root)); os.environ["HF_HUB_OFFLINE"] = "1"
from transformers import CLIPTokenizer
tok = CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14")
ids = tok("a photo of a cat")["input_ids"]
assert ids == [49406, 320, 1125, 539, 320, 2368, 49407], ids
vendored = os.path.join(forge, "ldm_patched", "modules", "sd1_tokenizer") if forge else ""
if vendored and os.path.isdir(vendored):
    assert json.load(open(os.path.join(vendored, "vocab.json"), encoding="utf-8")) == json.loads(files["vocab.json"])
    assert open(os.path.join(vendored, "merges.txt"), encoding="utf-8").read().split("\n")[1:48895] == files["merges.txt"].split("\n")[1:48895]
    print("HF_HOME: tokenizer equals Forge Classic's vendored sd1_tokenizer")
print("HF_HOME: CLIP-L tokenizer ready, snapshot", rev)
EOF
  echo "$HF_RECIPE" > "$snap/.fd-ready"
}

random_ckpt() {  # the seeded random SD1.5-layout checkpoint, built with DIR's venv and ldm repository
  local dir="$1"
  if [[ -f "$CKPT" && -f "$CKPT.fd-ready" && "$(cat "$CKPT.fd-ready")" == "$CKPT_RECIPE" ]]; then return 0; fi
  log "checkpoint $CKPT (about a minute)"
  mkdir -p "$(dirname "$CKPT")"
  HF_HOME="$HF" HF_HUB_OFFLINE=1 "$dir/venv/bin/python" - "$dir" "$CKPT" <<'EOF'
import os, sys, torch
dir_, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, os.path.join(dir_, "repositories", "stable-diffusion-stability-ai"))
import transformers
from omegaconf import OmegaConf
from ldm.util import instantiate_from_config
from safetensors.torch import save_file
# FrozenCLIPEmbedder loads the tokenizer and weights from the hub: build the text encoder from the config instead
cfg_path = os.path.join(os.environ["HF_HOME"], "hub", "models--openai--clip-vit-large-patch14")
text_config = transformers.CLIPTextConfig.from_pretrained("openai/clip-vit-large-patch14")
transformers.CLIPTokenizer.from_pretrained = classmethod(lambda cls, *a, **k: None)
transformers.CLIPTextModel.from_pretrained = classmethod(lambda cls, *a, **k: cls(text_config))
import ldm.models.diffusion.ddpm as ddpm
for cls in (ddpm.DDPM, ddpm.LatentDiffusion):   # the noise-schedule buffers: real values, computed on the CPU
    def on_cpu(self, *a, _orig=cls.register_schedule, **k):
        with torch.device("cpu"):
            return _orig(self, *a, **k)
    cls.register_schedule = on_cpu
config = OmegaConf.load(os.path.join(dir_, "configs", "v1-inference.yaml"))
with torch.device("meta"):                      # the parameters' shapes only: nothing allocated or initialised
    model = instantiate_from_config(config.model)
named_params = dict(model.named_parameters())
sd = model.state_dict()
g = torch.Generator().manual_seed(0)
out_sd = {}
with torch.no_grad():
    for k in sorted(sd):
        t = sd[k]
        if k in named_params:
            if t.dim() >= 2:
                v = torch.randn(t.shape, generator=g) * (t[0].numel() ** -0.5)
            elif k.endswith("weight"):
                v = torch.ones(t.shape)
            else:
                v = torch.zeros(t.shape)
            out_sd[k] = v.to(torch.float16)
        elif t.is_meta:                          # non-persistent-style buffers made under the meta device
            assert k.endswith("position_ids"), k
            out_sd[k] = torch.arange(t.shape[-1]).expand(t.shape).clone()
        else:
            out_sd[k] = t.detach().clone().contiguous()
n = sum(v.numel() for k, v in out_sd.items() if k in named_params)
assert 1.0e9 < n < 1.1e9 and any(k.startswith("cond_stage_model.transformer.text_model.") for k in out_sd), n
save_file(out_sd, out + ".part")
os.replace(out + ".part", out)
print(f"checkpoint: {len(out_sd)} tensors, {n / 1e9:.3f} B parameters -> {out}")
EOF
  echo "$CKPT_RECIPE" > "$CKPT.fd-ready"
}

# the sources first (so the HF_HOME step can compare its tokenizer with Forge Classic's vendored copy), then the
# venvs, HF_HOME and the checkpoint
if [[ -n "$A1111_DIR" ]]; then
  A1111_DIR="$(mkdir -p "$(dirname "$A1111_DIR")" && cd "$(dirname "$A1111_DIR")" && pwd)/$(basename "$A1111_DIR")"
  checkout "$A1111_DIR" chirag127+stable-diffusion-webui "$A1111_COMMIT"
  [[ -f "$A1111_DIR/test/test_files/empty.pt" ]] || { echo "$A1111_DIR is not A1111 v1.10.1 (no test/test_files/empty.pt)" >&2; exit 1; }
  repositories "$A1111_DIR" stable-diffusion-stability-ai generative-models k-diffusion BLIP stable-diffusion-webui-assets
fi
if [[ -n "$FORGE_DIR" ]]; then
  FORGE_DIR="$(mkdir -p "$(dirname "$FORGE_DIR")" && cd "$(dirname "$FORGE_DIR")" && pwd)/$(basename "$FORGE_DIR")"
  checkout "$FORGE_DIR" Haoming02+sd-webui-forge-classic "$FORGE_REV"
  [[ -d "$FORGE_DIR/ldm_patched" ]] || { echo "$FORGE_DIR is not Forge Classic (no ldm_patched/)" >&2; exit 1; }
  repositories "$FORGE_DIR" stable-diffusion-stability-ai generative-models stable-diffusion-webui-assets
fi
if [[ -n "$A1111_DIR" ]]; then
  # A1111 v1.10.1's requirements_versions.txt as it is, except: torch/torchvision/setuptools (above); k-diffusion
  # imports `clip`, which A1111 installs from a GitHub zip: clip-anytorch is the same package on PyPI
  make_venv "$A1111_DIR" requirements_versions.txt clip-anytorch==2.6.0
  hf_home "$A1111_DIR/venv/bin/python"
fi
if [[ -n "$FORGE_DIR" ]]; then
  # Forge Classic's requirements.txt as it is, except torch/setuptools (above); it also installs `clip` from a
  # GitHub zip at launch (skipped with --skip-prepare-environment): clip-anytorch
  make_venv "$FORGE_DIR" requirements.txt clip-anytorch==2.6.0
  hf_home "$FORGE_DIR/venv/bin/python"
  random_ckpt "$FORGE_DIR"
fi

cat <<EOF

Hosts ready.  Run the real-host test from $ROOT:
  export OMP_NUM_THREADS=1 HF_HOME=$HF${A1111_DIR:+ A1111_PATH=$A1111_DIR}${FORGE_DIR:+ FORGE_PATH=$FORGE_DIR FORGE_CKPT=$CKPT}
  FD_CHROMIUM=\$(command -v chromium) .testhost/venv/bin/python -m pytest tests/test_webui_real.py -q
(Playwright comes from tools/setup_test_host.sh --browser; FD_CHROMIUM makes a missing browser a failure.)
EOF
