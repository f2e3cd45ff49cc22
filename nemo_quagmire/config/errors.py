"""Config errors a person can act on: the key, the value found and what to do."""

from __future__ import annotations

from pydantic import ValidationError


def format_validation_error(error: ValidationError, source: str = "config") -> str:
    """One line per problem: `<source>: <dotted.key> = <value>: <message>`."""
    lines = [f"invalid {source} ({error.error_count()} problem{'s' if error.error_count() > 1 else ''}):"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (check its spelling against conf/ or the schema in nemo_quagmire/config/)"
        value = item.get("input")
        shown = (
            ""
            if item["type"] in ("missing", "extra_forbidden") or isinstance(value, dict)
            else f" = {value!r}"
        )
        lines.append(f"  {key}{shown}: {message}")
    return "\n".join(lines)
