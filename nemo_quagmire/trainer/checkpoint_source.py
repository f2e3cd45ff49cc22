"""Where a run's model comes from: an HF directory or a checkpoint of this project, read once at config time.

Why one place: the model's shape, its tokenizer and chat template, and the HF config that an export or a
vLLM engine needs all belong to the checkpoint a run starts from. If each entry point derived them on its
own, a user would restate the shape by hand (``+model.*`` overrides, compared exactly: a checkpoint storing
``rms_norm_eps`` as float32 refused 1e-05) and a run would lose its tokenizer. Here:

- :func:`read_checkpoint_source` reads a source: an HF directory (config.json via
  ``megatron.hf.model_config_from_hf``, its tokenizer files, its generation config) or a run checkpoint
  ``<run_dir>/checkpoints/step_N`` (the model config in its ``checkpoint_meta.json``, the tokenizer and HF
  config in ``<run_dir>/model/``);
- :func:`resolve_run_config` turns a composed SFT/GRPO config into one whose model is the source's
  (``checkpoint.load_from``) and whose ``data.tokenizer`` defaults to the source's tokenizer. Explicit
  ``model.*`` keys on the command line are checked against the source with a tolerance on float fields;
  precision and recomputation keys (``params_dtype``, ``fp8*``, ``recompute``, dropouts) apply as given; a
  shorter ``max_position_embeddings`` is allowed (training on shorter contexts);
- :func:`write_model_dir` gives every run dir what evaluation and export need, ``<run_dir>/model/``: the HF
  ``config.json`` (the source's as template when the run started from an HF directory), a
  ``generation_config.json`` and the tokenizer files (HF tokenizer with its chat template, or the character
  tokenizer) — an HF directory without weights.

Errors are :class:`CheckpointSourceError` (a ``ValueError``): the entry points turn them into exit code 2
before any process group starts. No process group, no megatron-core import: safe in any process.

It is a step of a run's start-up, not a schema: it reads checkpoint directories (through
``nemo_quagmire.megatron.checkpoint`` and ``megatron.hf``) and writes the run's model directory, so it lives
with the trainer's entry code; ``nemo_quagmire.config`` stays pure schemas that import nothing above them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from nemo_quagmire.config.model import NON_ARCHITECTURE_FIELDS, ModelConfig, get_model_preset, same_value
from nemo_quagmire.data.tokenizer import TOKENIZER_FILE as CHAR_TOKENIZER_FILE
from nemo_quagmire.megatron.checkpoint import META_FILE as CHECKPOINT_META
from nemo_quagmire.utils.io import atomic_write
from nemo_quagmire.utils.logging import get_logger

__all__ = [
    "MODEL_DIR",
    "CheckpointSource",
    "CheckpointSourceError",
    "explicit_model_keys",
    "load_tokenizer",
    "read_checkpoint_source",
    "resolve_model",
    "resolve_run_config",
    "write_model_dir",
]

logger = get_logger(__name__)

MODEL_DIR = "model"  # <run_dir>/model: config.json, generation_config.json, tokenizer files
HF_TOKENIZER_FILE = "tokenizer_config.json"  # present in every HF tokenizer directory, never a char one's
GENERATION_CONFIG = "generation_config.json"


class CheckpointSourceError(ValueError):
    """A checkpoint source or a config that contradicts it (message: key, values, fix)."""


@dataclass(frozen=True)
class CheckpointSource:
    """What a checkpoint directory provides.

    Attributes:
        path: the directory as given.
        kind: "hf" (config.json + safetensors) or "run" (a checkpoint of this project).
        model: the architecture of its weights (and the dtype they were trained in).
        step: the training step (0 for an HF directory).
        files_dir: the HF-style directory of its non-weight files (config.json, generation config, tokenizer):
            the HF directory itself, or ``<run_dir>/model``; None for a run dir written before it existed.
        tokenizer_dir: where its tokenizer is (HF or character), or None.
    """

    path: Path
    kind: Literal["hf", "run"]
    model: ModelConfig
    step: int
    files_dir: Path | None
    tokenizer_dir: Path | None

    @property
    def hf_tokenizer_dir(self) -> Path | None:
        """``tokenizer_dir`` if it holds an HF tokenizer (not the character one)."""
        if self.tokenizer_dir is not None and (self.tokenizer_dir / HF_TOKENIZER_FILE).is_file():
            return self.tokenizer_dir
        return None

    @property
    def hf_config_file(self) -> Path | None:
        """The HF ``config.json`` describing the weights (a template for exports), if there is one."""
        if self.files_dir is not None and (self.files_dir / "config.json").is_file():
            return self.files_dir / "config.json"
        return None


def _has_tokenizer(directory: Path) -> bool:
    return (directory / HF_TOKENIZER_FILE).is_file() or (directory / CHAR_TOKENIZER_FILE).is_file()


def read_checkpoint_source(path: str | os.PathLike, key: str = "checkpoint.load_from") -> CheckpointSource:
    """Read what the checkpoint directory ``path`` provides (config files only; no weights are read).

    Args:
        path: an HF directory or ``<run_dir>/checkpoints/step_N``.
        key: how the user named it (a config key or a flag), for error messages.

    Raises:
        CheckpointSourceError: the directory is missing, is neither kind, or its HF config describes an
            architecture that is not supported (naming it and the supported ones).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointSourceError(
            f"{key}={path}: no such directory; pass a local HF model directory (config.json + safetensors) "
            "or a checkpoint of this project (<run_dir>/checkpoints/step_N)"
        )
    if (path / CHECKPOINT_META).is_file():
        from nemo_quagmire.megatron.checkpoint import read_checkpoint_meta

        try:
            meta = read_checkpoint_meta(path)
        except ValueError as error:  # CheckpointError: unreadable or incomplete metadata
            raise CheckpointSourceError(f"{key}={path}: {error}") from None
        run_dir = path.parent.parent
        files_dir = run_dir / MODEL_DIR if (run_dir / MODEL_DIR).is_dir() else None
        tokenizer_dir = next((d for d in (files_dir, run_dir) if d is not None and _has_tokenizer(d)), None)
        return CheckpointSource(
            path=path,
            kind="run",
            model=ModelConfig.model_validate(meta["model_config"]),
            step=int(meta["step"]),
            files_dir=files_dir,
            tokenizer_dir=tokenizer_dir,
        )
    if (path / "config.json").is_file():
        from nemo_quagmire.megatron.hf import model_config_from_hf

        try:
            model = model_config_from_hf(path)
        except ValueError as error:  # unreadable, unsupported or incomplete: the message names the file
            config = path / "config.json"
            raise CheckpointSourceError(
                f"{key}={path}: {error if str(config) in str(error) else f'{config}: {error}'}"
            ) from None
        return CheckpointSource(
            path=path,
            kind="hf",
            model=model,
            step=0,
            files_dir=path,
            tokenizer_dir=path if _has_tokenizer(path) else None,
        )
    raise CheckpointSourceError(
        f"{key}={path} is neither a checkpoint of this project ({CHECKPOINT_META}) nor an HF model directory "
        "(config.json); pass <run_dir>/checkpoints/step_N or the directory holding config.json"
    )


def explicit_model_keys(overrides: Sequence[str]) -> set[str]:
    """The ``model.<field>`` keys set by Hydra command-line ``overrides`` (``model.x=``, ``+model.x=``,
    ``++model.x=``), e.g. ``{"norm_epsilon", "preset"}``."""
    keys = set()
    for override in overrides:
        name = override.lstrip("+~").split("=", 1)[0]
        if name.startswith("model.") and name.count(".") == 1:
            keys.add(name.removeprefix("model."))
    return keys


def resolve_model(
    source: CheckpointSource, section: Mapping[str, Any], explicit: Collection[str]
) -> ModelConfig:
    """The model of a run starting from ``source``, given the config's ``model`` section.

    The architecture is the source's. Of ``section``: precision and recomputation fields
    (:data:`~nemo_quagmire.config.model.NON_ARCHITECTURE_FIELDS`) apply; architecture fields (and a preset)
    named in ``explicit`` (set on the command line) must equal the source's, floats within
    :data:`~nemo_quagmire.config.model.FLOAT_REL_TOL`, except that a smaller ``max_position_embeddings`` is
    taken; other architecture fields of the section (a YAML preset's shape) give way to the source's.

    Raises:
        CheckpointSourceError: an explicit field differs from the source, naming the field, both values and
            the fix.
    """
    source_model = source.model.replace(
        num_query_groups=source.model.query_groups, kv_channels=source.model.head_dim
    )
    claimed: dict[str, Any] = {}
    if "preset" in explicit and "preset" in section:
        try:
            preset = get_model_preset(section["preset"])
        except KeyError as error:
            raise CheckpointSourceError(f"model.preset: {error.args[0]}") from None
        claimed |= {k: v for k, v in preset.model_dump().items() if k not in NON_ARCHITECTURE_FIELDS}
        claimed |= {"num_query_groups": preset.query_groups, "kv_channels": preset.head_dim}
    claimed |= {k: section[k] for k in explicit if k in section and k in ModelConfig.model_fields}
    changes = {k: v for k, v in section.items() if k in NON_ARCHITECTURE_FIELDS}
    problems = []
    for name, value in claimed.items():
        if name in NON_ARCHITECTURE_FIELDS:
            continue
        found = getattr(source_model, name)
        if isinstance(found, (int, float)) and not isinstance(found, bool) and isinstance(value, str):
            try:
                value = type(found)(float(value))
            except ValueError:
                pass  # compared as given: the mismatch names it
        if name == "max_position_embeddings" and isinstance(value, int) and 0 < value <= found:
            changes[name] = value
        elif not same_value(value, found):
            problems.append(f"model.{name}={value!r} but {source.path} has {found!r}")
    if problems:
        raise CheckpointSourceError(
            f"the model of checkpoint.load_from={source.path} is not the one the config asks for:\n  "
            + "\n  ".join(problems)
            + "\nthe shape comes from the checkpoint: drop these model.* overrides, or point "
            "checkpoint.load_from at a checkpoint of that shape"
        )
    return source.model.replace(**changes)


def resolve_run_config(
    container: Mapping[str, Any], overrides: Sequence[str] = (), *, missing_ok: bool = False
) -> dict[str, Any]:
    """The composed (raw) SFT/GRPO config with ``checkpoint.load_from`` resolved; see the module docstring.

    Without ``load_from`` the config is returned as is. A ``load_from`` that does not exist is an error,
    except in a dry run or with ``missing_ok`` (then the config's own model section stands, e.g. to plan on a
    laptop without the checkpoint). Keys of the model section that ModelConfig does not know are kept, so
    validation names them.

    Args:
        container: the Hydra-composed config as plain dicts.
        overrides: the command-line overrides (they say which ``model.*`` keys the user set explicitly).
        missing_ok: keep the model section when ``load_from`` does not exist here.

    Raises:
        CheckpointSourceError: see :func:`read_checkpoint_source` and :func:`resolve_model`.
    """
    load_from = (container.get("checkpoint") or {}).get("load_from")
    if load_from is None:
        return dict(container)
    if (missing_ok or container.get("dry_run")) and not Path(load_from).exists():
        logger.warning(
            "checkpoint.load_from=%s does not exist here: planning with the model section", load_from
        )
        return dict(container)
    source = read_checkpoint_source(load_from)
    section = dict(container.get("model") or {})
    model = resolve_model(source, section, explicit_model_keys(overrides))
    unknown = {k: v for k, v in section.items() if k not in ModelConfig.model_fields and k != "preset"}
    replaced = sorted(
        k
        for k, v in section.items()
        if k in ModelConfig.model_fields and not same_value(getattr(model, k), v)
    )
    if replaced or "preset" in section:
        logger.info(
            "model from %s (%s); the config's model section%s gives way%s",
            load_from,
            "config.json" if source.kind == "hf" else CHECKPOINT_META,
            f" (preset {section['preset']})" if "preset" in section else "",
            f" in {', '.join(replaced)}" if replaced else "",
        )
    out = {**container, "model": {**model.model_dump(), **unknown}}
    data = dict(container.get("data") or {})
    if data.get("task") == "jsonl" and data.get("tokenizer") is None:
        if source.hf_tokenizer_dir is None:
            raise CheckpointSourceError(
                f"data.task=jsonl needs an HF tokenizer and checkpoint.load_from={load_from} has none "
                "(tokenizer_config.json); set data.tokenizer to a local HF tokenizer directory"
            )
        out["data"] = {**data, "tokenizer": str(source.hf_tokenizer_dir)}
    return out


def load_tokenizer(directory: str | os.PathLike) -> Any:
    """The tokenizer saved in ``directory``: the character tokenizer if its tokenizer.json is of that format,
    else the HF tokenizer (``data.hf_tokenizer.HFTokenizer``)."""
    from nemo_quagmire.data.hf_tokenizer import HFTokenizer
    from nemo_quagmire.data.tokenizer import CharTokenizer

    try:
        return CharTokenizer.load(directory)
    except (FileNotFoundError, ValueError):
        return HFTokenizer(directory)


def write_model_dir(
    run_dir: str | os.PathLike, model: ModelConfig, tokenizer: Any, load_from: str | os.PathLike | None
) -> Path:
    """Write ``<run_dir>/model/`` (atomically: built beside it, then swapped in) and return it.

    It holds ``config.json`` (from the source's HF config as template, so its token ids and other keys are
    kept; else written from ``model``), ``generation_config.json`` (the source's, else the tokenizer's
    BOS/EOS/pad ids) and the tokenizer's files (``tokenizer.save``). Call on one rank.
    """
    from nemo_quagmire.megatron.hf import hf_config_from_model_config

    run_dir = Path(run_dir)
    source = read_checkpoint_source(load_from) if load_from is not None else None
    template = source.hf_config_file if source is not None else None
    token_ids = {"bos_token_id": getattr(tokenizer, "bos_id", None), "eos_token_id": tokenizer.eos_id}
    token_ids["pad_token_id"] = tokenizer.pad_id
    hf_config = hf_config_from_model_config(model, template)
    if template is None:
        hf_config |= token_ids
    target = run_dir / MODEL_DIR
    partial = run_dir / f".{MODEL_DIR}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    tokenizer.save(partial)
    with atomic_write(partial / "config.json") as handle:
        json.dump(hf_config, handle, indent=2, sort_keys=True)
        handle.write("\n")
    generation = source.files_dir / GENERATION_CONFIG if source is not None and source.files_dir else None
    if generation is not None and generation.is_file():
        shutil.copy2(generation, partial / GENERATION_CONFIG)
    else:
        with atomic_write(partial / GENERATION_CONFIG) as handle:
            json.dump({k: v for k, v in token_ids.items() if v is not None}, handle, indent=2)
            handle.write("\n")
    if target.exists():
        shutil.rmtree(target)
    os.replace(partial, target)
    return target
