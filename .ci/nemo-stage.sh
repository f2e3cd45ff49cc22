#!/usr/bin/env bash
# CI stage: the tests marked `nemo` (a real NeMo 2 `llm.finetune` on CPU with both callbacks attached), in
# their own venv. nemo-toolkit 2.7.3 cannot share the base venv: it trains with megatron-core 0.15 only (0.16
# removed optimizer arguments NeMo passes), and it pins numpy < 2 and transformers 4.57 (vLLM's stage needs
# the opposite). So the project goes in with its light base and the [nemo] extra, under constraints.txt minus
# its megatron-core pin (the CPU torch stays pinned). The [train] extra is not installed here: the NeMo hooks
# use only the engine's log-prob and generation functions, which run on 0.15 (nemo_quagmire/megatron/compat.py).
# ~3 GB. Measured with an empty pip cache: 207 CPU-seconds in all (venv ~180, tests ~25); wall 30 min on a machine
# at load average 60 (the job got 11% of a CPU), and the same install took 5.3 min at load ~1, so expect ~7 min
# on a quiet machine. NEMO_VENV moves the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
venv="${NEMO_VENV:-.venv-nemo}"
start=$SECONDS

python3 -m venv "$venv"
constraints="$venv/constraints-nemo.txt"
grep -v '^megatron-core==' constraints.txt >"$constraints"
# .ci/nemo-constraints.txt pins the whole environment: without it pip spends >10 min backtracking.
"$venv/bin/pip" install -q -c "$constraints" -c .ci/nemo-constraints.txt -e ".[nemo]" pytest tokenizers
echo "nemo stage: venv ready in $((SECONDS - start)) s" >&2

set +e
"$venv/bin/python" -m pytest -q -m nemo tests/integrations  # where the nemo-marked tests live
status=$?
set -e
echo "nemo stage: done in $((SECONDS - start)) s" >&2
if [ "$status" -eq 5 ]; then
  echo "nemo stage: pytest collected no nemo tests: failing" >&2
  exit 1
fi
exit "$status"
