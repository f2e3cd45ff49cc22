"""extract_final_answer: the last box wins, a malformed last box means no answer, and on a completion with
one well-formed box it agrees with math-verify's own brace matcher (latex2sympy2_extended)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from latex2sympy2_extended.math_normalization import extract_boxed_content

from nemo_quagmire.rewards import extract_final_answer


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        # Nested braces are matched, not cut at the first "}".
        (r"so $\boxed{\frac{1}{\sqrt{2}}}$.", r"\frac{1}{\sqrt{2}}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        # Several boxes: the last one is the final answer, even if it is shorter or an \fbox.
        (r"first \boxed{3}, then \boxed{4}", "4"),
        (r"\boxed{12} hmm, actually \fbox{13}", "13"),
        (r"\fbox{13} no: \boxed{14}", "14"),
        # A box inside a box: the inner one is the last to start (as in math-verify).
        (r"\boxed{\boxed{7}}", "7"),
        # Whitespace: before the brace, and around the content.
        (r"\boxed {5}", "5"),
        ("\\boxed{ 5 \n}", "5"),
        # The bare form runs to the next space or "$"; sentence punctuation is not part of the answer.
        (r"The answer is \boxed 5.", "5"),
        (r"$\boxed 42$ apples", "42"),
        (r"\boxed \frac{1}{2}, done", r"\frac{1}{2}"),
        # A longer command name that starts with "boxed" is not a box.
        (r"\boxed{2} and \boxedsymbol{3}", "2"),
    ],
)
def test_extracts_the_last_box(completion, expected):
    assert extract_final_answer(completion) == expected


@pytest.mark.parametrize(
    "completion",
    [
        "The answer is 42.",  # no box at all: the number in the text is not a final answer
        "",
        r"\boxed{3} but then the final answer is \boxed{12",  # last box unclosed (cut off): no fallback
        r"\boxed{}",  # empty
        r"\boxed{   }",  # blank
        r"the answer is \boxed",  # command without an argument
        r"\boxed{3} and then \boxed{}",  # last box empty: no fallback to the draft
        r"\boxedsymbol{3}",
    ],
)
def test_no_final_answer(completion):
    assert extract_final_answer(completion) is None


def test_long_completion_with_a_late_box():
    noise = "We compute step by step: 1 + 2 = 3, {x} and } stray braces. " * 2000  # ~120 KB
    assert extract_final_answer(noise + r"Thus \boxed{\dfrac{3}{4}}.") == r"\dfrac{3}{4}"


# Balanced LaTeX-ish content: letters, digits, operators, and nested brace groups.
_atoms = st.sampled_from(["1", "x", "+", "-", "^", " ", "\\frac", "\\sqrt", ",", "(", ")", "\\pi", "."])
_content = st.recursive(
    st.lists(_atoms, min_size=1, max_size=6).map("".join),
    lambda inner: st.lists(inner.map(lambda s: "{" + s + "}") | inner, min_size=1, max_size=4).map("".join),
    max_leaves=12,
)
_text = st.text(alphabet="abc 123.=", max_size=40)


@settings(max_examples=300, deadline=None)
@given(before=_text, content=_content, after=_text)
def test_single_box_agrees_with_math_verify_brace_matching(before, content, after):
    completion = f"{before}\\boxed{{{content}}}{after}"
    # Independent reference: math-verify's own last-box extraction on the same text.
    reference = extract_boxed_content(completion, mode="last").strip()
    assert extract_final_answer(completion) == (reference or None)
