"""vLLM engines for a multi-rank trainer: which ranks own one, what each generates, how weights reach it.

The trainer's step is collective: every rank calls ``generate`` with its data-parallel (DP) rank's prompts
(all ranks of one model replica, i.e. its TP x PP x CP ranks, with the same prompts) and every rank iterates
:func:`~nemo_quagmire.megatron.hf.iter_hf_weights` after the update. :class:`DistributedRolloutEngine` keeps
that contract and puts the engines where :func:`plan_engines` says:

- **Separate GPUs** (``rollout.vllm.colocated=false``, the default where GPUs are spare): one engine per model
  replica, owned by the replica's first rank, on GPUs of its node that no trainer rank uses (launch fewer
  trainer ranks per node than GPUs). ``rollout.vllm.num_engines`` (a multiple of DP) gives a replica several
  engines, owned by its next ranks.
- **Colocated** (``colocated=true``; needs vLLM's sleep mode, so CUDA): every GPU serves generation. A
  replica's GPUs are cut into blocks of ``rollout.vllm.tensor_parallel_size`` on one node; each block runs one
  engine, owned by the block's first rank; the engine sleeps while the trainer trains. World 16 at TP 4 with
  vLLM TP 2 (conf/nemo12b.yaml): 8 engines, 2 per replica.

Engines never serve two replicas, by design: replicas generate independently (validation gives each DP rank
its own number of generation calls), and an engine shared by replicas would make every call a collective of
all of them. So a colocated engine cannot be wider than a replica (vLLM TP <= trainer TP x PP x CP), and
``num_engines`` is a multiple of DP. A replica's prompts are split into contiguous parts, one per engine; part
``j`` starts at prompt ``offset_j`` and is sampled with seeds ``sampling.seed + offset_j + i``, exactly the
seeds one engine would use for the whole list (``VLLMRolloutEngine``: prompt ``i`` gets ``seed + i``), so with
seeded sampling the completions do not depend on how many engines there are. The trainer seeds each DP rank
differently, so replicas never repeat each other. Results travel back over a gloo group of the replica
(``all_gather_object``): every rank of the replica gets all its rows, in prompt order.

Weights: every rank of a replica iterates ``iter_hf_weights`` (the TP all-gather and PP broadcast are
collectives), the engine owners stream the full tensors into their engines, the other ranks drain the
stream; each engine is pushed exactly once per step. The initial HF export (``export_hf``) is written by
global rank 0 alone (on a filesystem all nodes see: the run directory), and every engine starts from it.

Failures: an engine that does not start, or fails to generate or to load weights, is reported on every rank
of its replica (and, at start-up, on every rank) instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from nemo_quagmire.rollout.base import RolloutBatch, RolloutEngine, SamplingParams
from nemo_quagmire.utils.logging import get_logger

if TYPE_CHECKING:
    from nemo_quagmire.config.grpo import GRPORunConfig

__all__ = [
    "DistributedRolloutEngine",
    "EngineSlot",
    "RankPlace",
    "check_vllm_rollouts",
    "check_vllm_rollouts_of",
    "concat_batches",
    "gather_rank_places",
    "megatron_rank_places",
    "plan_engines",
    "split_sizes",
]

logger = get_logger(__name__)

COLOCATED_NEEDS_CUDA = (
    "rollout.vllm.colocated=true shares the trainer's GPUs through vLLM's sleep mode, which needs CUDA; this "
    "machine has no GPU: set rollout.vllm.colocated=false"
)


@dataclass(frozen=True)
class RankPlace:
    """Where one trainer rank runs: its global rank, its data-parallel rank, its node and its local rank
    (the GPU index it trains on)."""

    rank: int
    dp_rank: int
    node: int
    local_rank: int


@dataclass(frozen=True)
class EngineSlot:
    """One engine of the plan.

    Attributes:
        owner: the global rank that starts the engine and talks to it.
        dp_rank: the replica (data-parallel rank) whose prompts it generates.
        part: which of the replica's ``parts`` contiguous prompt parts it generates.
        parts: engines of that replica.
        devices: GPU indices on the owner's node (as the trainer sees them) the engine runs on; None on CPU.
    """

    owner: int
    dp_rank: int
    part: int
    parts: int
    devices: tuple[int, ...] | None


def plan_engines(
    places: Sequence[RankPlace],
    *,
    engine_tp: int,
    colocated: bool,
    num_engines: int | None = None,
    gpus_per_node: int | None = None,
) -> tuple[EngineSlot, ...]:
    """The engines of a run: owners, the prompts each generates, their devices (see the module docstring).

    Args:
        places: every trainer rank.
        engine_tp: vLLM's tensor-parallel size (GPUs per engine).
        colocated: engines on the trainer's GPUs (else on GPUs of the node no trainer rank uses).
        num_engines: total engines; None = 1 per replica (separate) or every GPU busy (colocated).
        gpus_per_node: GPUs on each node; None on CPU (no devices assigned, no GPU count to check).

    Returns:
        The engines, by replica then part; at most one per owner.

    Raises:
        ValueError: a layout that cannot work, naming the config key and a fix.
    """
    replicas: dict[int, list[RankPlace]] = {}
    for place in sorted(places, key=lambda p: p.rank):
        replicas.setdefault(place.dp_rank, []).append(place)
    dp = len(replicas)
    if sorted(replicas) != list(range(dp)) or len({len(ranks) for ranks in replicas.values()}) != 1:
        raise ValueError(f"data-parallel ranks {sorted(replicas)} do not form equal replicas 0..{dp - 1}")
    replica_size = len(places) // dp
    if num_engines is not None and num_engines % dp:
        raise ValueError(
            f"rollout.vllm.num_engines={num_engines} is not a multiple of the data-parallel size {dp}: an "
            f"engine serves the ranks of one model replica; use a multiple of {dp} or null"
        )
    if colocated and gpus_per_node is None:
        raise ValueError(COLOCATED_NEEDS_CUDA)
    per_replica = None if num_engines is None else num_engines // dp
    slots: list[EngineSlot] = []
    for dp_rank, ranks in sorted(replicas.items()):
        if colocated:
            owners = _colocated_blocks(ranks, engine_tp, replica_size, per_replica)
        else:
            count = per_replica or 1
            if count > replica_size:
                raise ValueError(
                    f"rollout.vllm.num_engines={num_engines} gives each replica {count} engines but a "
                    f"replica has {replica_size} rank(s) to own them; use at most {replica_size * dp}"
                )
            owners = [(place, None) for place in ranks[:count]]
        slots += [
            EngineSlot(owner=place.rank, dp_rank=dp_rank, part=j, parts=len(owners), devices=devices)
            for j, (place, devices) in enumerate(owners)
        ]
    if not colocated and gpus_per_node is not None:
        slots = _spare_devices(slots, places, engine_tp, gpus_per_node)
    return tuple(slots)


def _colocated_blocks(
    ranks: Sequence[RankPlace], engine_tp: int, replica_size: int, per_replica: int | None
) -> list[tuple[RankPlace, tuple[int, ...]]]:
    """A replica's GPUs in blocks of ``engine_tp`` consecutive local ranks on one node: (owner, devices)."""
    if engine_tp > replica_size or replica_size % engine_tp:
        raise ValueError(
            f"colocated engines of rollout.vllm.tensor_parallel_size={engine_tp} do not tile a model replica "
            f"of {replica_size} GPU(s) (TP x PP x CP): an engine stays inside one replica; use a vLLM TP "
            f"dividing {replica_size}, or rollout.vllm.colocated=false"
        )
    blocks: list[list[RankPlace]] = []
    by_node: dict[int, list[RankPlace]] = {}
    for place in ranks:
        by_node.setdefault(place.node, []).append(place)
    for node, here in sorted(by_node.items()):
        here.sort(key=lambda p: p.local_rank)
        if len(here) % engine_tp:
            raise ValueError(
                f"a model replica has {len(here)} rank(s) on node {node}, not a multiple of "
                f"rollout.vllm.tensor_parallel_size={engine_tp}: a colocated engine's GPUs must be on one "
                "node; use a vLLM TP that divides the replica's ranks per node"
            )
        blocks += [here[i : i + engine_tp] for i in range(0, len(here), engine_tp)]
    count = per_replica or len(blocks)
    if count > len(blocks) or len(blocks) % count:
        raise ValueError(
            f"rollout.vllm.num_engines gives each replica {count} colocated engine(s) but its GPUs make "
            f"{len(blocks)} block(s) of rollout.vllm.tensor_parallel_size={engine_tp}; use a divisor of "
            f"{len(blocks)} engines per replica"
        )
    chosen = blocks[:: len(blocks) // count]
    return [(block[0], tuple(p.local_rank for p in block)) for block in chosen]


def _spare_devices(
    slots: Sequence[EngineSlot], places: Sequence[RankPlace], engine_tp: int, gpus_per_node: int
) -> list[EngineSlot]:
    """Give each separate engine ``engine_tp`` GPUs of its owner's node beyond those trainer ranks use."""
    node_of = {p.rank: p.node for p in places}
    trainer_gpus: dict[int, int] = {}
    for place in places:
        trainer_gpus[place.node] = max(trainer_gpus.get(place.node, 0), place.local_rank + 1)
    next_free = dict(trainer_gpus)
    out = []
    for slot in slots:
        node = node_of[slot.owner]
        start = next_free[node]
        next_free[node] = start + engine_tp
        out.append(EngineSlot(**{**slot.__dict__, "devices": tuple(range(start, start + engine_tp))}))
    short = {node: used for node, used in next_free.items() if used > gpus_per_node}
    if short:
        node, used = next(iter(short.items()))
        raise ValueError(
            f"node {node} needs {used} GPUs ({trainer_gpus[node]} for trainer ranks + "
            f"{(used - trainer_gpus[node]) // engine_tp} separate vLLM engine(s) of "
            f"rollout.vllm.tensor_parallel_size={engine_tp}) but has {gpus_per_node}: launch fewer trainer "
            "ranks per node, lower rollout.vllm.num_engines, or set rollout.vllm.colocated=true"
        )
    return out


def megatron_rank_places(world_size: int, tp: int, pp: int, cp: int, ranks_per_node: int) -> list[RankPlace]:
    """The places megatron-core's default rank order (``tp-cp-ep-dp-pp``) gives, for checks made before any
    process group exists; torchrun fills nodes with consecutive ranks."""
    dp = world_size // (tp * pp * cp)
    return [
        RankPlace(
            rank=rank,
            dp_rank=(rank // (tp * cp)) % dp,
            node=rank // ranks_per_node,
            local_rank=rank % ranks_per_node,
        )
        for rank in range(world_size)
    ]


def split_sizes(count: int, parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous parts of ``count`` items, the first ones larger by at most one."""
    return [count // parts + (j < count % parts) for j in range(parts)]


def concat_batches(
    batches: Sequence[RolloutBatch], prompt_offsets: Sequence[int], pad_id: int
) -> RolloutBatch:
    """Rows of several batches in order, right-padded to the widest; ``prompt_index`` of batch ``b`` shifted
    by ``prompt_offsets[b]`` (its first prompt's index in the whole request)."""
    width = max(batch.tokens.shape[1] for batch in batches)

    def padded(tensor: torch.Tensor, fill: float) -> torch.Tensor:
        return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=fill)  # [n, width]

    return RolloutBatch(
        tokens=torch.cat([padded(b.tokens, pad_id) for b in batches]),
        prompt_lengths=torch.cat([b.prompt_lengths for b in batches]),
        lengths=torch.cat([b.lengths for b in batches]),
        logprobs=torch.cat([padded(b.logprobs, 0.0) for b in batches]),
        truncated=torch.cat([b.truncated for b in batches]),
        prompt_index=torch.cat(
            [b.prompt_index + offset for b, offset in zip(batches, prompt_offsets, strict=True)]
        ),
    )


class DistributedRolloutEngine:
    """The :class:`~nemo_quagmire.rollout.base.RolloutEngine` every trainer rank holds; engines run on their
    owners (see the module docstring). Build it with :meth:`start`, on every rank.

    ``generate`` and ``update_weights`` are collectives over the caller's model replica; ``close`` is local.
    """

    def __init__(
        self,
        slots: Sequence[EngineSlot],
        place: RankPlace,
        replica_group: Any,
        local: RolloutEngine | None,
        pad_id: int,
    ) -> None:
        self.slots = tuple(s for s in slots if s.dp_rank == place.dp_rank)  # this replica's, by part
        self.place = place
        self.local = local  # the engine this rank owns, if any
        self._group = replica_group
        self._pad_id = pad_id
        self._my_part = next((s.part for s in self.slots if s.owner == place.rank), None)

    @classmethod
    def start(
        cls,
        slots: Sequence[EngineSlot],
        place: RankPlace,
        places: Sequence[RankPlace],
        make_engine: Callable[[EngineSlot], RolloutEngine],
        *,
        pad_id: int,
    ) -> DistributedRolloutEngine:
        """Start this rank's engine (if it owns one) and make the replicas' gloo groups; collective over the
        world. Every rank raises if any engine failed to start (the owner its own error)."""
        import torch.distributed as dist

        replica_group = None
        for dp_rank in sorted({p.dp_rank for p in places}):  # new_group is collective over the world
            group = dist.new_group(sorted(p.rank for p in places if p.dp_rank == dp_rank), backend="gloo")
            if dp_rank == place.dp_rank:
                replica_group = group
        world = dist.new_group(backend="gloo")
        mine = [s for s in slots if s.owner == place.rank]
        local: RolloutEngine | None = None
        failure: BaseException | None = None
        if mine:
            try:
                local = make_engine(mine[0])
            except Exception as error:
                failure = error
        reports: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(
            reports, None if failure is None else f"{type(failure).__name__}: {failure}", group=world
        )
        dist.destroy_process_group(world)
        failed = {rank: report for rank, report in enumerate(reports) if report is not None}
        if failed:
            if local is not None:
                local.close()
            if failure is not None:
                raise failure
            rank, report = next(iter(failed.items()))
            raise RuntimeError(f"the rollout engine of rank {rank} did not start: {report}")
        logger.info(
            "%d rollout engine(s): %s",
            len(slots),
            ", ".join(
                f"rank {s.owner} -> DP {s.dp_rank} part {s.part}/{s.parts} devices {s.devices}" for s in slots
            ),
        )
        return cls(slots, place, replica_group, local, pad_id)

    @property
    def shares_policy_weights(self) -> bool:
        return False

    def generate(
        self, prompts: Sequence[Sequence[int]], group_size: int, sampling: SamplingParams
    ) -> RolloutBatch:
        """This replica's completions (every rank of the replica calls it with the same prompts); each engine
        of the replica generates one contiguous part, with the seeds one engine would use."""
        import torch.distributed as dist

        if not prompts:
            raise ValueError("generate got no prompts")
        sizes = split_sizes(len(prompts), len(self.slots))
        offsets = [sum(sizes[:j]) for j in range(len(sizes))]
        outcome: Any = None
        if self._my_part is not None and sizes[self._my_part]:
            start, stop = offsets[self._my_part], offsets[self._my_part] + sizes[self._my_part]
            seeds = None if sampling.seed is None else [sampling.seed + i for i in range(start, stop)]
            try:
                outcome = self.local.generate(prompts[start:stop], group_size, sampling, prompt_seeds=seeds)
            except Exception as error:
                outcome = _Failure.of(error)
        parts: list[Any] = [None] * dist.get_world_size(self._group)
        dist.all_gather_object(parts, outcome, group=self._group)
        self._raise_failures(parts, "generate", outcome)
        by_owner = {
            rank: part for rank, part in zip(dist.get_process_group_ranks(self._group), parts, strict=True)
        }
        batches = [(by_owner[s.owner], offsets[s.part]) for s in self.slots if sizes[s.part]]
        return concat_batches([b for b, _ in batches], [o for _, o in batches], self._pad_id)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Stream the replica's full weights into its engines; every rank of the replica must call it (the
        stream's gathers are collectives), each engine loads them once."""
        import torch.distributed as dist

        stream = iter(named_tensors)
        outcome: Any = None
        try:
            if self.local is not None:
                self.local.update_weights(stream)
        except Exception as error:
            outcome = _Failure.of(error)
        finally:
            for _ in stream:  # the rest of the collectives (all of them on ranks without an engine)
                pass
        reports: list[Any] = [None] * dist.get_world_size(self._group)
        dist.all_gather_object(reports, outcome, group=self._group)
        self._raise_failures(reports, "update_weights", outcome)

    def close(self) -> None:
        """Close this rank's engine (local: safe in error paths)."""
        if self.local is not None:
            self.local.close()

    def _raise_failures(self, outcomes: Sequence[Any], what: str, mine: Any) -> None:
        import torch.distributed as dist

        if isinstance(mine, _Failure):
            raise mine.error
        ranks = dist.get_process_group_ranks(self._group)
        for rank, outcome in zip(ranks, outcomes, strict=True):
            if isinstance(outcome, _Failure):
                raise RuntimeError(f"{what} failed on the rollout engine of rank {rank}: {outcome.message}")


@dataclass
class _Failure:
    """An engine's error, sent to the other ranks of its replica (the owner keeps the exception)."""

    message: str
    error: BaseException | None = None

    @classmethod
    def of(cls, error: BaseException) -> _Failure:
        return cls(f"{type(error).__name__}: {error}", error)

    def __getstate__(self) -> dict[str, Any]:
        return {"message": self.message, "error": None}  # exceptions may not pickle


def gather_rank_places(dp_rank: int) -> tuple[RankPlace, list[RankPlace]]:
    """This rank's place and every rank's (collective over the world): nodes are told apart by host name,
    local ranks come from torchrun's ``LOCAL_RANK``."""
    import torch.distributed as dist

    mine = (socket.gethostname(), dp_rank, int(os.environ.get("LOCAL_RANK", "0")))
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    nodes = list(dict.fromkeys(host for host, _, _ in gathered))
    places = [
        RankPlace(rank=rank, dp_rank=dp, node=nodes.index(host), local_rank=local)
        for rank, (host, dp, local) in enumerate(gathered)
    ]
    return places[dist.get_rank()], places


# ----------------------------------------------------------------------------------------------------
# Checks before anything starts


_VLLM_PROBE = """
import importlib.metadata, importlib.util, json
spec = importlib.util.find_spec("vllm")
names = importlib.metadata.packages_distributions().get("vllm", []) if spec else []
version = importlib.metadata.version(names[0]) if names else None
print(json.dumps({"found": spec is not None, "version": version}))
"""


def check_vllm_rollouts(
    *,
    python: str,
    engine_tp: int,
    colocated: bool,
    num_engines: int | None,
    tp: int,
    pp: int,
    cp: int,
    environ: Mapping[str, str] | None = None,
) -> None:
    """What ``rollout.engine=vllm`` needs, checked before any process group or engine starts: a vLLM in the
    server's Python, CUDA for colocated engines, and an engine layout that fits the launch (torchrun's
    ``WORLD_SIZE`` / ``LOCAL_WORLD_SIZE``; one process without them).

    Raises:
        ValueError: what is missing or does not fit, naming the config key and the fix.
    """
    from nemo_quagmire.rollout.vllm_engine import MIN_VLLM_VERSION

    env = dict(os.environ if environ is None else environ)
    world = int(env.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if colocated and not cuda:
        raise ValueError(COLOCATED_NEEDS_CUDA)
    if world % (tp * pp * cp) == 0:  # else the parallel layout check names the problem
        places = megatron_rank_places(world, tp, pp, cp, int(env.get("LOCAL_WORLD_SIZE", world)))
        gpus = torch.cuda.device_count() if cuda else None
        plan_engines(
            places, engine_tp=engine_tp, colocated=colocated, num_engines=num_engines, gpus_per_node=gpus
        )
    try:
        probe = subprocess.run([python, "-c", _VLLM_PROBE], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ValueError(
            f"rollout.engine=vllm runs vLLM under {python!r} (rollout.vllm.python, else "
            f"$NEMO_QUAGMIRE_VLLM_PYTHON, else this Python), which does not run: {error}; point "
            "rollout.vllm.python at a Python with vLLM"
        ) from None
    found = probe.returncode == 0 and '"found": true' in probe.stdout
    version = None
    with contextlib.suppress(ValueError, IndexError):
        version = json.loads(probe.stdout.strip().splitlines()[-1])["version"]
    if not found:
        raise ValueError(
            f"rollout.engine=vllm needs vLLM >= {MIN_VLLM_VERSION} in {python} (rollout.vllm.python, else "
            "$NEMO_QUAGMIRE_VLLM_PYTHON, else this Python), which cannot import it; install it there (pip "
            "install -e '.[vllm]'; on CPU `bash .ci/vllm-stage.sh` builds .venv-vllm) or point "
            "rollout.vllm.python at a Python that has it"
        )
    if version is not None and _release(version) < _release(MIN_VLLM_VERSION):
        raise ValueError(
            f"{python} has vLLM {version}, older than {MIN_VLLM_VERSION} (needed for weight reloads and "
            "processed log-probs); upgrade vLLM there"
        )


def _release(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string such as "0.32.0+cpu"."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def check_vllm_rollouts_of(cfg: GRPORunConfig) -> None:
    """:func:`check_vllm_rollouts` for a GRPO run config (``rollout.engine=vllm``), in this launch."""
    from nemo_quagmire.rollout.vllm_server import server_python

    vllm, parallel = cfg.rollout.vllm, cfg.parallel
    check_vllm_rollouts(
        python=server_python(vllm.python),
        engine_tp=vllm.tensor_parallel_size,
        colocated=vllm.colocated,
        num_engines=vllm.num_engines,
        tp=parallel.tensor_model_parallel_size,
        pp=parallel.pipeline_model_parallel_size,
        cp=parallel.context_parallel_size,
    )
