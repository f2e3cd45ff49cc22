"""Launch a test worker script on 2 gloo processes with torchrun and return the JSON it writes.

Each launch costs ~10 s of imports, so every multi-process test module makes one launch and asserts the
worker's scenarios one by one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_process_worker(
    worker: str | Path, args: list[str], out: Path, extra_env: dict[str, str] | None = None
) -> dict:
    """Run `worker ARGS...` under torchrun with 2 processes (OMP_NUM_THREADS=1); the worker writes `out`."""
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path, **(extra_env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master-port", str(_free_port()), str(worker), *args]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and out.exists(), (
        f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return json.loads(out.read_text())
