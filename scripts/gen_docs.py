"""Regenerate the parts of docs/ that are computed from the code, so they cannot drift from it (tests/docs/
test_generated_docs.py fails when a committed file is stale):

- docs/config-reference.md, whole: every key of the typed run configs (GRPORunConfig, SFTRunConfig) with its
  type, bounds, default and description, read from the pydantic schemas. Defaults are the schema's, which
  conf/grpo_base.yaml and conf/sft/sft_base.yaml repeat key for key (tests/config/test_base_defaults.py);
  the shipped configs override some.
- docs/scaling.md, its dry-run blocks only (```$ python scripts/train_X.py --config-name=NAME dry_run=true```
  followed by the plan): each is replaced by the planner's current report for that config. The prose around
  them is written by hand.

    python scripts/gen_docs.py            # rewrite both
    python scripts/gen_docs.py --check    # exit 1 if a committed file differs from what the code gives
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
import types
import typing
from pathlib import Path

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from nemo_quagmire.config.grpo import GRPORunConfig
from nemo_quagmire.config.model import MODEL_PRESETS, ModelConfig
from nemo_quagmire.config.sft import SFTRunConfig

REPO = Path(__file__).resolve().parents[1]
CONFIG_REFERENCE = REPO / "docs" / "config-reference.md"
SCALING = REPO / "docs" / "scaling.md"
DRY_RUN_BLOCK = re.compile(
    r"(```\n\$ python scripts/(train_grpo|train_sft)\.py --config-name=(\w+) dry_run=true\n)(.*?)(```)",
    re.DOTALL,
)
RUN_CONFIGS = (
    (GRPORunConfig, "GRPO runs", "scripts/train_grpo.py", "conf/", "conf/grpo_base.yaml"),
    (SFTRunConfig, "SFT runs", "scripts/train_sft.py", "conf/sft/", "conf/sft/sft_base.yaml"),
)
_BOUNDS = ((annotated_types.Gt, "gt", ">"), (annotated_types.Ge, "ge", ">="), (annotated_types.Lt, "lt", "<"))
_BOUNDS += ((annotated_types.Le, "le", "<="),)


def format_type(annotation: object) -> str:
    """`PositiveInt | None` -> `int > 0 | null`, `Literal['a', 'b']` -> `'a' | 'b'`, tuples as lists."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return " ".join([format_type(args[0]), *_bounds(args[1:])])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(format_type(arg) for arg in args)
    if origin is typing.Literal:
        return " | ".join(format_value(arg) for arg in args)
    if origin is tuple:
        return f"list[{format_type(args[0])}]"
    if origin is dict:
        return f"dict[{format_type(args[0])}, {format_type(args[1])}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(metadata: typing.Iterable[object]) -> list[str]:
    return [
        f"{symbol} {getattr(item, name)}"
        for item in metadata
        for kind, name, symbol in _BOUNDS
        if isinstance(item, kind)
    ]


def format_value(value: object) -> str:
    """A default as it is written in the YAML configs (null, true, [a, b])."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _field_type(field: FieldInfo) -> str:
    """The field's type with its `Field(gt=...)` bounds on the value, not on its `None` alternative."""
    bounds = _bounds(field.metadata)
    if not bounds:
        return format_type(field.annotation)
    args = typing.get_args(field.annotation)
    if typing.get_origin(field.annotation) in (typing.Union, types.UnionType) and type(None) in args:
        value_types = " | ".join(format_type(arg) for arg in args if arg is not type(None))
        return f"{value_types} {' '.join(bounds)} | null"
    return " ".join([format_type(field.annotation), *bounds])


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _section_model(field: FieldInfo) -> type[BaseModel] | None:
    annotation = field.annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


Section = tuple[str, type[BaseModel], list[str]]


def sections(schema: type[BaseModel], defaults: BaseModel | None = None, prefix: str = "") -> list[Section]:
    """(dotted section name, schema, table rows) for `schema` and each nested section, depth first.

    `defaults` is the section's default instance when its parent gives one (SFTRunConfig's `optim` defaults
    to lr 1e-5, not OptimConfig's own 1e-6): its values are the defaults shown.
    """
    rows: list[str] = []
    nested_sections: list[Section] = []
    for name, field in schema.model_fields.items():
        key = f"{prefix}{name}"
        nested = _section_model(field)
        if nested is not None:
            value = getattr(defaults, name) if defaults is not None else field.default
            nested_sections += sections(nested, value if isinstance(value, BaseModel) else None, f"{key}.")
            continue
        if defaults is not None:
            default = f"`{format_value(getattr(defaults, name))}`"
        elif field.is_required():
            default = "required"
        else:
            default = f"`{format_value(field.get_default(call_default_factory=True))}`"
        rows.append(
            f"| `{key}` | {_cell(_field_type(field))} | {default} | {_cell(field.description or '')} |"
        )
    own = [(prefix.rstrip("."), schema, rows)] if rows else []
    return own + nested_sections


def _doc(schema: type[BaseModel]) -> str:
    return " ".join((schema.__doc__ or "").split("\n\n")[0].split())


def render_config_reference() -> str:
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by scripts/gen_docs.py from the pydantic schemas: do not edit. -->",
        "",
        "Every key a run config accepts, with its type, default and meaning. Set keys in a YAML under conf/",
        "or on the command line as Hydra overrides (`key=value`; `+model.<field>=value` for a model field",
        "the YAML does not list). Unknown keys and bad values stop the run before anything starts, naming",
        "the key (exit code 2). Defaults here are the schemas'; the base YAMLs repeat them key for key",
        "(tests/config/test_base_defaults.py) and the shipped configs override some. Bounds are shown after",
        "the type (`int > 0`).",
        "",
    ]
    for schema, title, script, conf_dir, base_yaml in RUN_CONFIGS:
        lines += [
            f"## {title}: `{schema.__name__}`",
            "",
            f"`python {script} --config-name=NAME key=value ...` composes `{conf_dir}NAME.yaml` (defaults in "
            f"`{base_yaml}`). {_doc(schema)}",
            "",
        ]
        for section, section_schema, rows in sections(schema):
            lines += [f"### `{section}`" if section else "### Top-level keys", ""]
            if section_schema is not schema and _doc(section_schema):
                lines += [_doc(section_schema), ""]
            if section_schema is ModelConfig:
                lines += [
                    f"Usually a preset plus overrides: `model: {{preset: NAME, ...}}`, NAME one of "
                    f"{', '.join(f'`{name}`' for name in MODEL_PRESETS)}. Without a preset every required "
                    "field must be given.",
                    "",
                ]
            lines += ["| key | type | default | description |", "|---|---|---|---|", *rows, ""]
    return "\n".join(lines).rstrip("\n") + "\n"


@functools.cache  # a plan depends only on the committed config
def dry_run_report(script: str, config_name: str) -> str:
    """What `python scripts/<script>.py --config-name=NAME dry_run=true` prints."""
    if script == "train_grpo":
        from nemo_quagmire.plan.grpo import plan_grpo_run
        from nemo_quagmire.trainer.entry import compose_run_config

        return plan_grpo_run(compose_run_config(config_name))[0]
    from nemo_quagmire.plan.sft import plan_sft_run
    from nemo_quagmire.trainer.entry import compose_sft_config

    return plan_sft_run(compose_sft_config(config_name))[0]


def render_scaling(current: str) -> str:
    """`current` (docs/scaling.md) with every dry-run block holding the planner's report of today."""
    return DRY_RUN_BLOCK.sub(
        lambda m: f"{m.group(1)}{dry_run_report(m.group(2), m.group(3)).rstrip()}\n{m.group(5)}", current
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed file is stale")
    args = parser.parse_args(argv)
    scaling = SCALING.read_text(encoding="utf-8")
    outputs = {CONFIG_REFERENCE: render_config_reference(), SCALING: render_scaling(scaling)}
    stale = [
        path
        for path, text in outputs.items()
        if not path.exists() or path.read_text(encoding="utf-8") != text
    ]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(REPO)} is stale: run python scripts/gen_docs.py", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(outputs[path], encoding="utf-8")
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
