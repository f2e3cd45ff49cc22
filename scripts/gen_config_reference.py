"""Write docs/config-reference.md from the typed run configs (GRPORunConfig, SFTRunConfig): every key with its
type, default and description, read from the pydantic schemas themselves, so the reference cannot drift
from what the trainers accept (tests/docs/test_config_reference.py fails when the committed file is stale).

    python scripts/gen_config_reference.py            # rewrite docs/config-reference.md
    python scripts/gen_config_reference.py --check    # exit 1 if the committed file differs from the schemas

Defaults are the schema's (what a key is when no YAML sets it); conf/grpo_base.yaml and conf/sft/sft_base.yaml
set most keys explicitly, and each shipped config overrides some of them.
"""

from __future__ import annotations

import argparse
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
OUTPUT = REPO / "docs" / "config-reference.md"
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


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by scripts/gen_config_reference.py from the pydantic schemas: do not edit. -->",
        "",
        "Every key a run config accepts, with its type, default and meaning. Set keys in a YAML under conf/",
        "or on the command line as Hydra overrides (`key=value`; `+model.<field>=value` for a model field",
        "the YAML does not list). Unknown keys and bad values stop the run before anything starts, naming",
        "the key (exit code 2). Defaults here are the schemas'; the base YAMLs and the shipped configs set",
        "many keys explicitly. Bounds are shown after the type (`int > 0`).",
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed file is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != text:
            print(
                f"{OUTPUT.relative_to(REPO)} is stale: the config schemas changed; run "
                "python scripts/gen_config_reference.py",
                file=sys.stderr,
            )
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
