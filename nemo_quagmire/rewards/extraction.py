"""Final-answer extraction: the content of a completion's last `\\boxed{}` (or `\\fbox{}`), or nothing.

Why not let math-verify find the answer: `math_verify.parse` on a whole completion falls back to any LaTeX
or number it can find, so a truncated or rambling completion with no answer still "extracts" something (a
100 KB random string extracted a number) and can be graded correct by luck. A GRPO reward must not pay for
that and pass@k must count it as a failure, so the final answer is the last box and a completion without one
has no answer. Only the last box counts: an earlier box is a draft the model went on to revise, and a last
box that is unclosed or empty (a completion cut off at the length limit) means no answer rather than a
fallback to the draft.

Brace matching counts every `{` and `}`, escaped or not, as math-verify does: `\\boxed{\\{1, 2\\}}` is
balanced either way, and agreeing with math-verify keeps the verdicts of both paths the same.
"""

from __future__ import annotations

import re

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_BRACE = re.compile(r"[{}]")
# A bare argument (`\boxed 5`) runs to the next space or `$`; sentence punctuation is stripped from its end.
_BARE_ARGUMENT = re.compile(r"[^\s$]*")
_TRAILING_PUNCTUATION = ".,;:"


def extract_final_answer(completion: str) -> str | None:
    """The content of the last `\\boxed{...}` or `\\fbox{...}` in `completion`, stripped, or None.

    Accepted forms: `\\boxed{...}` with nested braces, `\\fbox{...}`, and the bare form `\\boxed 5` (the
    argument runs to the next space or `$`, with trailing sentence punctuation dropped).

    Returns:
        The answer text, or None when the completion has no box, or its last box is unclosed or empty.

    Examples:
        >>> extract_final_answer(r"First \\boxed{3}, no: \\boxed{\\frac{1}{2}}.")
        '\\\\frac{1}{2}'
        >>> extract_final_answer(r"so the answer is \\boxed{12") is None
        True
    """
    start = _last_box_command(completion)
    if start is None:
        return None
    command, pos = start
    pos += len(command)
    while pos < len(completion) and completion[pos].isspace():
        pos += 1
    if pos == len(completion):
        return None
    if completion[pos] == "{":
        end = _matching_brace(completion, pos)
        answer = None if end is None else completion[pos + 1 : end].strip()
    else:
        answer = _BARE_ARGUMENT.match(completion, pos).group().rstrip(_TRAILING_PUNCTUATION)
    return answer or None


def _last_box_command(text: str) -> tuple[str, int] | None:
    """(command, index) of the last `\\boxed` / `\\fbox` that is not the prefix of a longer command name."""
    best: tuple[str, int] | None = None
    for command in _BOX_COMMANDS:
        end = len(text)
        while (index := text.rfind(command, 0, end)) >= 0:
            after = index + len(command)
            if after == len(text) or not text[after].isalpha():
                if best is None or index > best[1]:
                    best = (command, index)
                break
            end = index
    return best


def _matching_brace(text: str, open_index: int) -> int | None:
    """Index of the `}` closing the `{` at `open_index`, or None if the text ends first."""
    depth = 0
    for match in _BRACE.finditer(text, open_index):
        depth += 1 if match.group() == "{" else -1
        if depth == 0:
            return match.start()
    return None
