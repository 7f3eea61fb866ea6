"""The one definition of a line: splitting, neutral lines, offsets, token placement."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.lines import (
    encode_responses,
    is_neutral,
    scored_lines,
    split_lines,
    token_index_for_lines,
)

CODE_CHARS = st.sampled_from(list("abcxyz_ =+-*/()[]:#'\"0123456789\t\\") + [" ", "\n", "\n", "é", "→", "\r"])
RESPONSES = st.text(CODE_CHARS, max_size=120)


def test_split_lines_offsets_and_neutral():
    text = "x = 1\n\n    # note\ny = x  # trailing comment\n"
    lines = split_lines(text)
    assert [(ln.start, ln.end) for ln in lines] == [(0, 5), (6, 6), (7, 17), (18, 43), (44, 44)]
    assert [ln.neutral for ln in lines] == [False, True, True, False, True]
    assert [text[ln.start : ln.end] for ln in lines] == text.split("\n")
    assert [ln.index for ln in scored_lines(lines)] == [0, 3]


def test_neutral_rules():
    assert is_neutral("") and is_neutral("   \t") and is_neutral("  # x") and is_neutral("#")
    assert not is_neutral("x = '#'") and not is_neutral("  return 1  # c") and not is_neutral('"""doc"""')


@given(RESPONSES)
def test_split_lines_roundtrip(text: str):
    lines = split_lines(text)
    assert "\n".join(text[ln.start : ln.end] for ln in lines) == text
    assert len(lines) == text.count("\n") + 1
    assert all(ln.end <= len(text) and "\n" not in text[ln.start : ln.end] for ln in lines)


@settings(max_examples=60, deadline=None)
@given(RESPONSES)
def test_prefix_tokens_are_a_prefix(tiny_tokenizer, text: str):
    """Line-aligned encoding: the tokens of lines 0..m are a prefix of the whole response's tokens,
    and line m's token index is the same in both (so a causal PRM gives the same score)."""

    def enc(texts: list[str]) -> list[list[int]]:
        return tiny_tokenizer(texts, add_special_tokens=False)["input_ids"]

    lines = text.split("\n")
    full = encode_responses([text], enc)[0]
    assert len(full.token_index) == len(lines)
    assert full.token_index == sorted(full.token_index)
    assert tiny_tokenizer.decode(full.token_ids) == text
    for m in range(len(lines)):
        prefix = encode_responses(["\n".join(lines[: m + 1])], enc)[0]
        assert full.token_ids[: len(prefix.token_ids)] == prefix.token_ids
        assert prefix.token_index == full.token_index[: m + 1]


def test_token_index_lands_on_last_token_of_line(tiny_tokenizer):
    def enc(texts: list[str]) -> list[list[int]]:
        return tiny_tokenizer(texts, add_special_tokens=False)["input_ids"]

    text = "def f(x):\n    return x + 1\n\n# end"
    out = encode_responses([text], enc)[0]
    for line, tok in zip(split_lines(text), out.token_index, strict=True):
        if line.end > line.start:
            decoded_upto = tiny_tokenizer.decode(out.token_ids[: tok + 1])
            assert decoded_upto == text[: line.end]
    assert out.token_index[2] == out.token_index[1] + 1  # blank line: the newline token before it


def test_token_index_for_natural_tokens():
    text = "ab\ncd\n\nef"
    # tokens: "ab\n" "c" "d\n\n" "ef"  -> char ends 3, 4, 7, 9
    ends = [3, 4, 7, 9]
    assert token_index_for_lines(split_lines(text), ends) == [0, 2, 1, 3]
    assert token_index_for_lines(split_lines("\nx"), [1, 2]) == [-1, 1]
