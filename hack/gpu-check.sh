#!/usr/bin/env bash
# `make gpu-check`: the GPU check (python -m moe_worker.bench.gpu_check) with what it needs and
# nothing installed. On the lent GPU machine (docs/gpu-results.md, "How to run") that is the
# machine's own python3 (torch + CUDA, transformers; no pydantic, which moe_contract's plans
# need): the wheels `make gpu-wheels` left in .whl/ go to a temporary folder on PYTHONPATH, and
# the repo's packages are read from their folders. Here it takes .venv's python, which has all.
#
#   hack/gpu-check.sh OUT_DIR [gpu-check flags: --parts a,b --deadline S --tiny ...]
#
# Exit codes are the check's: 0 all parts ran and passed, 1 some did not, 3 no CUDA GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: hack/gpu-check.sh OUT_DIR [gpu-check flags]}"
shift
python="${GPU_PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
site=""
if ! "$python" -c "import pydantic" 2>/dev/null; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu-check: $python has no pydantic and .whl/ holds no wheels: run 'make gpu-wheels'" \
      "where pip works, and carry .whl" >&2
    exit 2
  fi
  site="$(mktemp -d /tmp/gpu-check-site.XXXXXX)"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    .whl/*.whl
fi
export PYTHONPATH="worker:contract${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
exec "$python" -m moe_worker.bench.gpu_check --out "$out" "$@"
