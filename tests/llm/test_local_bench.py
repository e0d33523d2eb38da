"""``codeloop bench generate --shape tiny`` end to end on the CPU (not a timing test)."""

from __future__ import annotations

import argparse
import json

import pytest

from bot.bench import generate


def test_tiny_bench_prints_json_figures(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    generate.configure(parser)
    args = parser.parse_args(
        [
            "--shape",
            "tiny",
            "--concurrency",
            "1,3",
            "--new-tokens",
            "6",
            "--prompt-tokens",
            "12",
            "--device",
            "cpu",
        ]
    )
    assert generate.main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    figures = {(r["figure"], r.get("concurrency")) for r in rows}
    for c in (1, 3):
        for name in ("ttft", "stream_tokens_per_s", "aggregate_tokens_per_s"):
            assert (name, c) in figures
    by_figure = {(r["figure"], r.get("concurrency")): r for r in rows}
    assert by_figure[("aggregate_tokens_per_s", 3)]["value"] > 0
    assert by_figure[("bandwidth_limit", None)]["value"] is None  # no GPU bandwidth for a CPU
    # the three conversations were decoded together, through the worker's backend
    assert by_figure[("scheduler", None)]["value"] == 3


def test_published_shapes_have_the_published_parameter_counts() -> None:
    """deepseek-coder-1.3b has 1,346,471,936 parameters (untied lm_head), 6.7b 6,740,512,768."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def count(shape: str) -> int:
        with torch.device("meta"):  # shapes only, no memory
            model = LlamaForCausalLM(LlamaConfig(**generate._COMMON, **generate.SHAPES[shape]))
        return sum(p.numel() for p in model.parameters())

    assert count("ds-1.3b") == 1_346_471_936
    assert count("ds-6.7b") == 6_740_512_768
