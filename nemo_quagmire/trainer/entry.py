"""What the training entry scripts share: config in, exit code out, under one contract.

`scripts/train_grpo.py` and `scripts/train_sft.py` differ only in their config schema, planner and trainer
builder. Exit codes: 0 done (or the plan fits), 1 the plan does not fit, 2 an input error (Hydra's own
errors included: an unknown key, a YAML syntax error, a missing config), 130 Ctrl-C, 143 stopped by SIGTERM
after a checkpoint (Slurm pre-emption; resubmit the same command to continue).

Order, so that a bad input costs seconds and leaves nothing behind: Hydra composes the config (writing
nothing: conf/grpo_base.yaml and conf/sft/sft_base.yaml turn off its output directory and log file),
pydantic validates it, a dry run plans it; a real run goes
through `preflight` (paths, layout, writability) and the trainer is built (its data files read and
checked); only then is the run directory created, the composed config recorded in `<run_dir>/.hydra/` and
the log mirrored to `<run_dir>/<script>.log`.
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from nemo_quagmire.config.grpo import GRPORunConfig
from nemo_quagmire.config.run import CONF_DIR
from nemo_quagmire.config.sft import SFT_CONF_DIR, SFTRunConfig
from nemo_quagmire.utils.errors import (
    EXIT_INPUT_ERROR,
    EXIT_PREEMPTED,
    TRAIN_MODULES,
    InputError,
    cli_main,
    require_extra,
)

__all__ = ["compose_config", "compose_run_config", "compose_sft_config", "hydra_entry", "plan_or_train"]

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def hydra_entry(
    schema: type,
    *,
    config_dir: str | Path,
    config_name: str,
    plan: Callable[[Any], tuple[str, bool]],
    build: Callable[[Any], Any],
    what: str,
    argv: list[str] | None = None,
) -> int:
    """Run a training script: Hydra's command line (`--config-name`, `key=value` overrides) -> exit code."""
    if code := cli_main(lambda: require_extra("train", TRAIN_MODULES, needed_by=f"training ({what})")):
        return code
    import hydra
    from omegaconf import DictConfig

    exit_code: list[int] = []
    started: list[bool] = []
    console = sys.stderr
    held = io.StringIO()  # Hydra's messages until the task starts: its errors may carry a traceback

    def task(raw: DictConfig) -> None:
        started.append(True)
        sys.stderr = console
        console.write(held.getvalue())
        exit_code.append(cli_main(lambda: _run(raw, schema, plan=plan, build=build, what=what)))

    saved_argv = sys.argv
    if argv is not None:
        sys.argv = [saved_argv[0], *argv]
    sys.stderr = held
    try:
        hydra.main(version_base=None, config_path=str(config_dir), config_name=config_name)(task)()
    except SystemExit as error:
        if started:  # a bug inside the task: Hydra printed its traceback
            raise
        # Hydra's own errors (unknown key, bad YAML, missing config): its message, exit 2.
        return EXIT_INPUT_ERROR if error.code == 1 else int(error.code or 0)
    finally:
        sys.argv = saved_argv
        sys.stderr = console
        if not started:
            console.write(_without_traceback(held.getvalue()))
            console.write(_renamed_keys_named(held.getvalue()))
    return exit_code[0] if exit_code else 0  # no task run: --help, --cfg


def _renamed_keys_named(text: str) -> str:
    """For Hydra's "full_key: <key>" lines naming a key that moved, a line with its new name."""
    from nemo_quagmire.config.errors import RENAMED_KEYS

    keys = [line.split("full_key:", 1)[1].strip() for line in text.splitlines() if "full_key:" in line]
    return "".join(f"{key} was renamed: use {RENAMED_KEYS[key]}\n" for key in keys if key in RENAMED_KEYS)


def _without_traceback(text: str) -> str:
    """`text` minus the "Traceback ..." blocks (their indented frame lines), keeping the error lines."""
    kept, in_traceback = [], False
    for line in text.splitlines(keepends=True):
        if line.startswith("Traceback (most recent call last):"):
            in_traceback = True
        elif not (in_traceback and line.startswith((" ", "\t"))):
            in_traceback = False
            kept.append(line)
    return "".join(kept)


def _run(raw: Any, schema: type, *, plan: Callable, build: Callable, what: str) -> int:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from nemo_quagmire.config.errors import validate_config
    from nemo_quagmire.trainer.checkpoint_source import CheckpointSourceError, resolve_run_config
    from nemo_quagmire.utils.logging import configure_logging

    configure_logging()
    container = OmegaConf.to_container(raw, resolve=True)
    container.pop("hydra", None)
    try:  # the model shape and tokenizer of checkpoint.load_from (checkpoint_source), before validation
        container = resolve_run_config(container, HydraConfig.get().overrides.task)
    except CheckpointSourceError as error:
        raise InputError(f"invalid {what}: {error}") from None
    cfg = validate_config(schema, container, what)
    return plan_or_train(cfg, plan=plan, build=build, what=what, record=lambda run_dir: _record(raw, run_dir))


def plan_or_train(
    cfg: Any,
    *,
    plan: Callable[[Any], tuple[str, bool]],
    build: Callable[[Any], Any],
    what: str,
    record: Callable[[Path], None] | None = None,
) -> int:
    """Print the dry-run plan of `cfg` (`cfg.dry_run`), or check it against the machine (`preflight`), then
    build the trainer inside the parallel context and fit it. Returns the exit code.

    Raises:
        InputError: the config cannot run here (every problem named), or its input files are invalid.
    """
    if cfg.dry_run:
        try:
            report, fits = plan(cfg)
        except ValueError as error:
            raise InputError(f"invalid {what}: {error}") from None
        print(report)  # the plan is the output of a dry run
        return 0 if fits else 1
    from nemo_quagmire.megatron.parallel import parallel_context
    from nemo_quagmire.trainer.preflight import preflight
    from nemo_quagmire.trainer.signals import Preempted
    from nemo_quagmire.utils.logging import global_rank

    preflight(cfg)
    try:
        with parallel_context(cfg.model, cfg.parallel, seed=cfg.seed):
            try:  # reads and checks the data files and tokenizer against the config; writes nothing
                trainer = build(cfg)
            except InputError:
                raise
            except ValueError as error:  # the builders' checks of config against data
                raise InputError(f"invalid {what}: {error}") from None
            if record is not None and global_rank() == 0:
                record(Path(cfg.run_dir))
            trainer.fit()
    except Preempted as stop:
        logging.getLogger(__name__).warning("%s", stop)
        return EXIT_PREEMPTED
    return 0


def _record(raw: Any, run_dir: Path) -> None:
    """The composed config and overrides in `<run_dir>/.hydra/` (as Hydra writes them), and the log mirrored
    to `<run_dir>/<script>.log`."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from nemo_quagmire.utils.io import atomic_write

    hydra_cfg = HydraConfig.get()
    with atomic_write(run_dir / ".hydra" / "config.yaml") as handle:
        handle.write(OmegaConf.to_yaml(raw))
    with atomic_write(run_dir / ".hydra" / "overrides.yaml") as handle:
        handle.write(OmegaConf.to_yaml(OmegaConf.create(list(hydra_cfg.overrides.task))))
    log_file = logging.FileHandler(run_dir / f"{hydra_cfg.job.name}.log")  # train_grpo.log, train_sft.log
    log_file.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(log_file)


def compose_config(
    schema: type[ConfigT], config_name: str, overrides: Sequence[str], config_dir: str | Path
) -> ConfigT:
    """Compose `config_dir/config_name.yaml` with Hydra command-line `overrides` and validate it.

    `checkpoint.load_from` is resolved as the training scripts do
    (`trainer.checkpoint_source.resolve_run_config`), except that one which does not exist here leaves the
    config's model section (as in a dry run), so the shipped configs validate on any machine.

    Raises:
        pydantic.ValidationError: a bad key or value (format it with `config.errors.format_validation_error`).
        CheckpointSourceError: `checkpoint.load_from` is invalid or contradicts the model section.
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from nemo_quagmire.trainer.checkpoint_source import resolve_run_config

    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        raw = compose(config_name=config_name, overrides=list(overrides))
    container = OmegaConf.to_container(raw, resolve=True)
    container.pop("hydra", None)
    return schema.model_validate(resolve_run_config(container, overrides, missing_ok=True))


def compose_run_config(
    config_name: str, overrides: Sequence[str] = (), config_dir: str | Path = CONF_DIR
) -> GRPORunConfig:
    """The validated run config that `scripts/train_grpo.py --config-name=NAME OVERRIDES...` would use."""
    return compose_config(GRPORunConfig, config_name, overrides, config_dir)


def compose_sft_config(
    config_name: str, overrides: Sequence[str] = (), config_dir: str | Path = SFT_CONF_DIR
) -> SFTRunConfig:
    """The validated run config that `scripts/train_sft.py --config-name=NAME OVERRIDES...` would use."""
    return compose_config(SFTRunConfig, config_name, overrides, config_dir)
