"""Incremental detokenisation and stop-string filtering, token by token."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from bot.llm.local_detok import IncrementalDecoder, StopFilter
from tests.llm.tiny_model import build_tiny_model_dir


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    path: Path = build_tiny_model_dir(tmp_path_factory.mktemp("tok"))
    return AutoTokenizer.from_pretrained(path)


def test_pushing_one_token_at_a_time_joins_to_the_full_decode(tokenizer) -> None:
    text = "naïve café — 数据 表格 图\n    return a + b  # ünïcödé"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    dec = IncrementalDecoder(tokenizer)
    parts = [dec.push([i]) for i in ids] + [dec.flush()]
    assert "".join(parts) == text
    assert all("\ufffd" not in p for p in parts)  # never half a character


def test_random_token_streams_match_decode(tokenizer) -> None:
    rng = random.Random(1)
    for _ in range(50):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 40))]
        dec = IncrementalDecoder(tokenizer)
        joined = "".join(dec.push([i]) for i in ids) + dec.flush()
        assert joined == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize(
    ("pieces", "stops", "expected"),
    [
        (["ab", "c<", "|E", "OT|>x"], ["<|EOT|>"], "abc"),
        (["print(1)\n", "``", "`\nmore"], ["```\n"], "print(1)\n"),
        (["a<", "|b"], ["<|EOT|>"], "a<|b"),  # a partial match that never completes is released
        (["xy", "z"], ["z", "yz"], "x"),  # the earliest stop wins
    ],
)
def test_stop_filter(pieces: list[str], stops: list[str], expected: str) -> None:
    f = StopFilter(stops)
    out = "".join(f.feed(p) for p in pieces) + f.flush()
    assert out == expected
