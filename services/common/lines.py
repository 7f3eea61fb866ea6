"""The ONE definition of a line, shared by the PRM service, the trainer and the labeller.

A response is split on "\n". Line m spans characters [start, end) of the response, the newline
excluded. A line is *neutral* when it is blank or comment-only: it gets no label and no reward.

Token placement. The PRM reads a response *line-aligned*: every line's text and every newline is
tokenized as its own segment, so a line's last token never merges with the newline or the next line.
Hence the tokens of a prefix (lines 0..m) are exactly a prefix of the tokens of the whole response, and
a causal model's output at the last token of line m is the same number whether the prefix is scored
alone or inside the full response. For another tokenizer's natural token stream (the policy's sampled
tokens), `token_index_for_lines` places each line at the token holding the line's last character.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

NEWLINE = "\n"


@dataclass(frozen=True, slots=True)
class Line:
    index: int  # 0-based line number in the response
    start: int  # offset of the first character
    end: int  # offset one past the last character (the newline excluded)
    neutral: bool  # blank or comment-only


def is_neutral(text: str) -> bool:
    """Blank (whitespace only) or comment-only lines carry no label and no reward."""
    stripped = text.strip()
    return not stripped or stripped.startswith("#")


def split_lines(response: str) -> list[Line]:
    """Split on "\n"; a trailing newline yields a final empty (neutral) line, as str.split does."""
    lines: list[Line] = []
    start = 0
    for index, text in enumerate(response.split(NEWLINE)):
        end = start + len(text)
        lines.append(Line(index, start, end, is_neutral(text)))
        start = end + 1
    return lines


def scored_lines(lines: Sequence[Line]) -> list[Line]:
    """The non-neutral lines; T = len(scored_lines(...)) in the PSGPO reward."""
    return [line for line in lines if not line.neutral]


@dataclass(frozen=True, slots=True)
class EncodedResponse:
    token_ids: list[int]  # response tokens, line-aligned
    token_index: list[int]  # per line: index of its last token in token_ids (-1 if none so far)


def encode_responses(
    responses: Sequence[str],
    encode_batch: Callable[[list[str]], list[list[int]]],
) -> list[EncodedResponse]:
    """Line-aligned tokenization of many responses with ONE batched tokenizer call.

    `encode_batch` maps strings to token ids without special tokens (a fast tokenizer's batch
    encode). A blank line's token index is that of the last token before it (its preceding newline),
    or -1 when the response starts with it.
    """
    segments: list[str] = [NEWLINE]
    layout: list[list[str]] = []
    for response in responses:
        texts = response.split(NEWLINE)
        layout.append(texts)
        segments.extend(t for t in texts if t)
    encoded = encode_batch(segments)
    newline_ids = encoded[0]
    cursor = 1
    out: list[EncodedResponse] = []
    for texts in layout:
        ids: list[int] = []
        token_index: list[int] = []
        for m, text in enumerate(texts):
            if m:
                ids.extend(newline_ids)
            if text:
                ids.extend(encoded[cursor])
                cursor += 1
            token_index.append(len(ids) - 1)
        out.append(EncodedResponse(ids, token_index))
    return out


def token_index_for_lines(lines: Sequence[Line], token_char_ends: Sequence[int]) -> list[int]:
    """Place each line on a natural token stream given each token's end character offset.

    The line's reward lands on the first token whose end is past the line's last character, i.e. the
    token that holds that character (it may also hold the newline). Empty lines map to the last token
    ending at or before the line's start (-1 if none). Offsets must be non-decreasing.
    """
    result: list[int] = []
    for line in lines:
        if line.end > line.start:
            i = bisect.bisect_left(token_char_ends, line.end)
            result.append(min(i, len(token_char_ends) - 1))
        else:
            result.append(bisect.bisect_right(token_char_ends, line.start) - 1)
    return result
