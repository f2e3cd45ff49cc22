"""Config errors a person can act on: the key, the value found and what to do."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from nemo_quagmire.utils.errors import InputError

ConfigT = TypeVar("ConfigT", bound=BaseModel)

# Keys that moved: an old config or command line is told the new name.
RENAMED_KEYS = {
    "sft_warmup.lr": "sft_warmup.optim.lr",
    "grpo.max_consecutive_nonfinite": "optim.max_consecutive_nonfinite",
}


def renamed_key_hint(key: str) -> str:
    """ " (renamed: use <new key>)" for a key that moved, else ""."""
    return f" (renamed: use {RENAMED_KEYS[key]})" if key in RENAMED_KEYS else ""


def format_validation_error(error: ValidationError, source: str = "config") -> str:
    """One line per problem: `<source>: <dotted.key> = <value>: <message>`."""
    lines = [f"invalid {source} ({error.error_count()} problem{'s' if error.error_count() > 1 else ''}):"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (check its spelling against conf/ or the schema in nemo_quagmire/config/)"
            message += renamed_key_hint(key)
        value = item.get("input")
        shown = (
            ""
            if item["type"] in ("missing", "extra_forbidden") or isinstance(value, dict)
            else f" = {value!r}"
        )
        lines.append(f"  {key}{shown}: {message}")
    return "\n".join(lines)


def validate_config(schema: type[ConfigT], container: Any, source: str) -> ConfigT:
    """`schema.model_validate(container)`, or an `InputError` listing every problem (exit code 2 in the
    scripts, see `nemo_quagmire.utils.errors`)."""
    try:
        return schema.model_validate(container)
    except ValidationError as error:
        raise InputError(format_validation_error(error, source)) from None
    except (ValueError, KeyError) as error:  # e.g. an unknown model preset
        raise InputError(f"invalid {source}: {error}") from None
