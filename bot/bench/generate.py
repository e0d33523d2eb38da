"""``codeloop bench generate``: decode speed of the in-process backend at several concurrencies.

Decode speed does not depend on the weights' values, so a randomly initialised model of the
published architecture measures the real serving path without downloading anything. The model is
driven through ``LocalModelClient`` — the code the worker runs — with end-of-sequence disabled so
every stream produces exactly ``--new-tokens`` tokens. One JSON object per figure per line.

Shapes are the deepseek-coder configs the OpenCodeInterpreter-DS models are fine-tuned from
(config.json of deepseek-ai/deepseek-coder-{1.3b,6.7b}-instruct on the Hugging Face Hub).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    "ds-1.3b": {
        "hidden_size": 2048,
        "intermediate_size": 5504,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
    },
    "ds-6.7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
    },
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
}
_COMMON: dict[str, Any] = {
    "vocab_size": 32256,
    "max_position_embeddings": 16384,
    "rope_theta": 100000.0,
    "rope_scaling": {"type": "linear", "factor": 4.0},
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}

#: peak memory bandwidth in TB/s, by a substring of torch.cuda.get_device_name(); first match wins
GPU_BANDWIDTH_TBPS: list[tuple[str, float]] = [
    ("H200", 4.8),
    ("H100 PCIe", 2.0),
    ("H100", 3.35),
    ("A100 80GB", 2.0),
    ("A100", 1.555),
    ("L40S", 0.864),
    ("L4", 0.3),
    ("A10G", 0.6),
    ("A10", 0.6),
    ("RTX 4090", 1.0),
]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", choices=sorted(SHAPES), default="ds-1.3b")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated numbers of conversations")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--bandwidth-tbps", type=float, help="override the GPU bandwidth table")


def _bench_tokenizer(vocab_size: int) -> Any:
    """One word per token id (``w0`` … ``wN``) so a prompt is exactly N tokens and any id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    factory: Any = PreTrainedTokenizerFast  # untyped in transformers
    return factory(tokenizer_object=backend, chat_template=template)


def build_model(shape: str, device: Any, dtype: Any) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**_COMMON, **SHAPES[shape], "attn_implementation": "sdpa"})
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the target device: no host copy of 13 GB
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def weight_bytes_per_token(model: Any) -> int:
    """Bytes a decode step must read: every weight but the input embedding (one row of it)."""
    embed = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return int(total - embed.numel() * embed.element_size())


def _bandwidth(device: Any, override: float | None) -> tuple[str, float | None]:
    import torch

    if device.type != "cuda":
        return "cpu", override
    name = torch.cuda.get_device_name(device)
    if override is not None:
        return name, override
    return name, next((bw for key, bw in GPU_BANDWIDTH_TBPS if key in name), None)


async def _stream(client: Any, prompt: str, new_tokens: int, t0: float) -> tuple[float, float]:
    from bot.llm.base import GenerationParams

    first = last = 0.0
    params = GenerationParams(max_new_tokens=new_tokens)
    async for _ in client.stream_chat([{"role": "user", "content": prompt}], params):
        last = time.perf_counter() - t0
        first = first or last
    return first, last


async def _run(args: argparse.Namespace, emit: Any) -> None:
    import torch

    from bot.llm.local import LocalModelClient, resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    levels = [int(c) for c in str(args.concurrency).split(",") if c.strip()]
    model = build_model(args.shape, device, dtype)
    client = LocalModelClient(
        model,
        _bench_tokenizer(model.config.vocab_size),
        context_tokens=args.prompt_tokens + args.new_tokens + 8,
        max_batch=max(levels),
        eos_token_ids=(),
    )
    gpu, tbps = _bandwidth(device, args.bandwidth_tbps)
    wbytes = weight_bytes_per_token(model)
    limit = tbps * 1e12 / wbytes if tbps else None
    base = {
        "bench": "generate",
        "shape": args.shape,
        "device": gpu,
        "dtype": str(dtype).removeprefix("torch."),
    }
    emit({**base, "figure": "weight_bytes_per_token", "value": wbytes, "unit": "B"})
    emit(
        {
            **base,
            "figure": "bandwidth_limit",
            "value": round(limit, 1) if limit else None,
            "unit": "tokens/s per stream",
            "bandwidth_tbps": tbps,
            **({} if limit else {"note": "bandwidth unknown for this device; pass --bandwidth-tbps"}),
        }
    )
    rng = random.Random(0)

    def prompt() -> str:  # distinct prompts: nothing may be shared between conversations
        return " ".join(f"w{rng.randrange(model.config.vocab_size)}" for _ in range(args.prompt_tokens))

    try:
        await _stream(client, prompt(), 4, time.perf_counter())  # warm-up: kernels, allocator
        for c in levels:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            times = await asyncio.gather(*(_stream(client, prompt(), args.new_tokens, t0) for _ in range(c)))
            wall = max(last for _, last in times)
            ttft = [first for first, _ in times]
            rates = [(args.new_tokens - 1) / (last - first) for first, last in times if last > first]
            per_stream = statistics.median(rates) if rates else 0.0
            row = {**base, "concurrency": c}
            emit(
                {
                    **row,
                    "figure": "ttft",
                    "value": round(statistics.median(ttft), 4),
                    "max": round(max(ttft), 4),
                    "unit": "s",
                }
            )
            emit(
                {
                    **row,
                    "figure": "stream_tokens_per_s",
                    "value": round(per_stream, 2),
                    "min": round(min(rates, default=0.0), 2),
                    "unit": "tokens/s",
                }
            )
            emit(
                {
                    **row,
                    "figure": "aggregate_tokens_per_s",
                    "value": round(c * args.new_tokens / wall, 2),
                    "unit": "tokens/s",
                }
            )
            if device.type == "cuda":
                emit(
                    {
                        **row,
                        "figure": "peak_gpu_memory",
                        "value": torch.cuda.max_memory_allocated(device),
                        "unit": "B",
                    }
                )
            if limit is not None:
                # each decode step reads all weights once, whatever the batch: a stream cannot step faster
                emit(
                    {
                        **row,
                        "figure": "bandwidth_fraction",
                        "value": round(per_stream / limit, 3),
                        "unit": "ratio",
                    }
                )
        emit(
            {
                **base,
                "figure": "scheduler",
                "value": client.stats.max_rows,
                "unit": "max rows per step",
                "decode_steps": client.stats.decode_steps,
                "prefills": client.stats.prefills,
            }
        )
    finally:
        await client.aclose()


def main(args: argparse.Namespace) -> int:
    def emit(obj: dict[str, Any]) -> None:
        print(json.dumps(obj), flush=True)

    asyncio.run(_run(args, emit))
    return 0
