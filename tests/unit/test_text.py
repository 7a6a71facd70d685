"""Streamed text (serve/text.py): what each token adds, stop strings, characters split over tokens."""

from __future__ import annotations

import pytest

from qlora_ray.serve.text import TextStream
from qlora_ray.shapes import byte_tokenizer


class PieceTokenizer:
    """Token i decodes to PIECES[i]; with clean-up (a tokenizer's default), " ," becomes ",", as
    BERT-style clean-up does, which would rewrite text already streamed."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def decode(self, tokens, skip_special_tokens=True, clean_up_tokenization_spaces=True):
        text = "".join(self.pieces[t] for t in tokens)
        return text.replace(" ,", ",") if clean_up_tokenization_spaces else text


def stream(tokenizer, tokens: list[int], stops: list[str]) -> tuple[list[str], TextStream]:
    text = TextStream(tokenizer, stops)
    pieces = []
    for token in tokens:
        pieces.append(text.add(token))
        if text.stopped:
            break
    pieces.append(text.finish())
    return pieces, text


def test_the_earliest_stop_in_the_text_wins_whatever_the_order_of_the_stops():
    tokenizer = PieceTokenizer(["ab", "cdef", "gh"])
    pieces, text = stream(tokenizer, [0, 1, 2], stops=["de", "bcd"])
    assert "".join(pieces) == "a" and text.stopped


def test_a_stop_string_across_token_boundaries_is_held_back_then_cut():
    tokenizer = PieceTokenizer(["Hel", "lo wo", "r", "ld!"])
    pieces, _ = stream(tokenizer, [0, 1, 2, 3], stops=["world"])
    assert pieces[:3] == ["Hel", "lo ", ""]  # "wo", then "wor", might begin the stop: held
    assert "".join(pieces) == "Hello "


def test_held_text_that_never_becomes_a_stop_is_sent_in_the_end():
    tokenizer = PieceTokenizer(["Hi wo", "w"])
    pieces, text = stream(tokenizer, [0, 1], stops=["world"])
    assert "".join(pieces) == "Hi wow" and not text.stopped


def test_a_tokenizer_that_cleans_up_spaces_does_not_garble_the_stream():
    tokenizer = PieceTokenizer(["Hello", " ", ",", " world"])
    pieces, _ = stream(tokenizer, [0, 1, 2, 3], stops=[])
    assert "".join(pieces) == "Hello , world" == tokenizer.decode([0, 1, 2, 3], clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("stops", [[], ["zzz"]])
def test_a_character_split_over_tokens_is_sent_whole(stops):
    tokenizer = byte_tokenizer()
    tokens = tokenizer("café ☕!", add_special_tokens=False)["input_ids"]
    assert len(tokens) == len("café ☕!".encode())  # one token per byte
    pieces, _ = stream(tokenizer, tokens, stops=stops)
    assert "".join(pieces) == "café ☕!" and all("\ufffd" not in piece for piece in pieces)
    assert "" in pieces  # the first byte of é and of ☕ settled nothing
