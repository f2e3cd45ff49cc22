"""Reading JSON-lines files the one strict way every reader here shares.

Why not `str.splitlines()`: it also breaks at U+2028, U+2029, U+0085 and form feeds, which are valid inside
JSON strings (and common in scraped math text), so a valid line would be cut in two. Lines end at "\\n" only
(a "\\r" before it is JSON whitespace). Why not plain `json.loads`: it accepts the bare `NaN`, `Infinity`
and `-Infinity` that are not JSON (a NaN reward or feature would flow silently into every mean), and a line
nested a few thousand levels deep raises `RecursionError` instead of a message naming the line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nemo_quagmire.utils.errors import InputError

__all__ = ["iter_json_lines", "iter_lines", "parse_json_line"]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"bare {name} is not JSON; write a number, null or a string")


def parse_json_line(line: str, where: str, error: type[Exception] = InputError) -> Any:
    """The JSON value of one line; anything else raises `error` naming `where` (`file:line`)."""
    try:
        return json.loads(line, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        raise error(f"{where}: not valid JSON ({err.msg}, column {err.colno})") from None
    except ValueError as err:  # a bare NaN / Infinity
        raise error(f"{where}: {err}") from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply to read (thousands of levels)") from None


def iter_lines(path: str | os.PathLike, error: type[Exception] = InputError) -> Iterator[tuple[str, str]]:
    """`("file:line", text)` of each "\\n"-terminated line, streamed (a final line without "\\n" counts).

    Raises:
        error: a line is not UTF-8.
        OSError: the file cannot be read.
    """
    path = Path(path)
    with path.open("rb") as handle:  # binary iteration splits at b"\n" only
        for lineno, raw in enumerate(handle, start=1):
            where = f"{path}:{lineno}"
            try:
                yield where, raw.decode("utf-8").removesuffix("\n")
            except UnicodeDecodeError as err:
                raise error(f"{where}: not UTF-8 ({err.reason} at byte {err.start})") from None


def iter_json_lines(
    path: str | os.PathLike, error: type[Exception] = InputError, *, skip_blank: bool = False
) -> Iterator[tuple[str, Any]]:
    """`("file:line", parsed value)` of each line; a blank line is an error unless `skip_blank`."""
    for where, line in iter_lines(path, error):
        if skip_blank and not line.strip():
            continue
        yield where, parse_json_line(line, where, error)
