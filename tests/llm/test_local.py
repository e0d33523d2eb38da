"""The in-process backend on a tiny random Llama (CPU): streaming, batching, cancellation, stops."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from bot.core.errors import ModelError
from bot.llm import GenerationParams, make_client
from bot.llm.base import ChatMessage
from bot.llm.local import LocalModelClient, load_model
from tests.llm.tiny_model import EOS, build_tiny_model_dir

PROMPTS = ["hi", "plot revenue by month from data.csv, then explain the trend " * 3, "数据 表格 图"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> tuple[Any, Any]:
    return load_model(str(model_dir), torch.device("cpu"), torch.float32)


@pytest.fixture
async def make(loaded: tuple[Any, Any]):
    clients: list[LocalModelClient] = []

    def factory(**kwargs: Any) -> LocalModelClient:
        kwargs.setdefault("context_tokens", 2048)
        clients.append(LocalModelClient(*loaded, **kwargs))
        return clients[-1]

    yield factory
    for client in clients:
        await client.aclose()


def chat(text: str) -> list[ChatMessage]:
    return [{"role": "user", "content": text}]


def reference(loaded: tuple[Any, Any], text: str, new_tokens: int, eos: bool = True) -> str:
    """What ``model.generate`` decodes greedily for the same templated prompt, all at once."""
    model, tok = loaded
    ids = tok.apply_chat_template(chat(text), add_generation_prompt=True, tokenize=True, return_dict=False)
    config = copy.deepcopy(model.generation_config)
    config.do_sample, config.max_new_tokens = False, new_tokens
    if not eos:
        # eos becomes an ordinary token, as with eos_token_ids=() (None would mean "the default")
        config.eos_token_id = []
    out = model.generate(torch.tensor([ids]), generation_config=config)
    return str(tok.decode(out[0][len(ids) :], skip_special_tokens=True))


async def collect(client: LocalModelClient, text: str, **params: Any) -> list[str]:
    return [d async for d in client.stream_chat(chat(text), GenerationParams(**params))]


async def test_stream_joins_to_greedy_generate(make, loaded) -> None:
    client = make()
    for text in PROMPTS:
        deltas = await collect(client, text, max_new_tokens=48)
        assert len(deltas) > 1
        assert "".join(deltas) == reference(loaded, text, 48)


async def test_concurrent_conversations_share_decode_steps(make, loaded) -> None:
    client = make(eos_token_ids=())  # run to the budget, so the two overlap for sure
    outs = await asyncio.gather(*(collect(client, t, max_new_tokens=200) for t in PROMPTS[:2]))
    assert client.stats.max_rows == 2
    assert client.stats.decode_steps < 2 * 199  # fewer steps than serving them one after another
    for text, out in zip(PROMPTS[:2], outs, strict=True):
        assert "".join(out) == reference(loaded, text, 200, eos=False)


async def test_many_conversations_joining_midway(make, loaded) -> None:
    """Late joiners with longer prompts shift the running rows; everyone still gets its own text."""
    client = make(eos_token_ids=(), max_batch=8)
    texts = ["a", "bb " * 40, "print(1)", "数据 " * 10, PROMPTS[1]]
    lengths = [120, 30, 60, 90, 45]

    async def later(i: int) -> str:
        await asyncio.sleep(0.01 * i)
        return "".join(await collect(client, texts[i], max_new_tokens=lengths[i]))

    outs = await asyncio.gather(*(later(i) for i in range(len(texts))))
    for text, n, out in zip(texts, lengths, outs, strict=True):
        assert out == reference(loaded, text, n, eos=False)
    assert client.stats.max_rows > 1


async def test_padding_left_by_a_long_prompt_is_reclaimed(make, loaded) -> None:
    client = make(eos_token_ids=())
    long, short = PROMPTS[1], "x"
    outs = await asyncio.gather(collect(client, long, max_new_tokens=60), collect(client, short, max_new_tokens=200))
    assert client.stats.max_rows == 2
    assert client.stats.kv_trims >= 1  # the short row went on in a narrower cache
    assert "".join(outs[1]) == reference(loaded, short, 200, eos=False)
    assert "".join(outs[0]) == reference(loaded, long, 60, eos=False)


async def test_cancelling_one_stream_leaves_the_other_intact(make, loaded) -> None:
    client = make(eos_token_ids=())
    seen = asyncio.Event()

    async def doomed() -> None:
        async for _ in client.stream_chat(chat(PROMPTS[0]), GenerationParams(max_new_tokens=400)):
            seen.set()

    victim = asyncio.create_task(doomed())
    survivor = asyncio.create_task(collect(client, PROMPTS[1], max_new_tokens=150))
    await seen.wait()
    while client.stats.max_rows < 2:  # both decoding in the same steps before the cancel
        await asyncio.sleep(0.001)
    victim.cancel()
    with pytest.raises(asyncio.CancelledError):
        await victim
    assert "".join(await survivor) == reference(loaded, PROMPTS[1], 150, eos=False)
    assert client.stats.tokens < 400 + 150  # the cancelled row stopped decoding
    assert client.stats.max_rows == 2


async def test_max_batch_queues_the_rest(make, loaded) -> None:
    client = make(max_batch=1, eos_token_ids=())
    outs = await asyncio.gather(*(collect(client, t, max_new_tokens=40) for t in PROMPTS))
    assert client.stats.max_rows == 1
    assert client.stats.max_waiting >= 1
    for text, out in zip(PROMPTS, outs, strict=True):
        assert "".join(out) == reference(loaded, text, 40, eos=False)


async def test_stop_string_is_honoured_and_not_emitted(make, loaded) -> None:
    client = make(eos_token_ids=())
    full = reference(loaded, PROMPTS[1], 60, eos=False)
    stop = full[20:24]
    cut = full[: full.index(stop)]
    out = "".join(await collect(client, PROMPTS[1], max_new_tokens=60, stop=(stop, "never-seen")))
    assert out == cut
    # the scheduler dropped the row soon after: far fewer than 60 tokens were decoded
    await asyncio.sleep(0.05)
    assert client.stats.tokens < 60


async def test_special_token_stop_ends_on_its_id(make, loaded) -> None:
    """``<|EOT|>`` is a special token, invisible in decoded text: it must stop on the id."""
    model, tok = loaded
    client = make(eos_token_ids=())
    eot = tok.convert_tokens_to_ids(EOS)
    # From the third forward pass on, bias the lm_head so that <|EOT|> is the argmax.
    calls = [0]

    def force_eot(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] >= 3:
            output[..., eot] = 1e4
        return output

    handle = model.lm_head.register_forward_hook(force_eot)
    try:
        out = "".join(await collect(client, "hi", max_new_tokens=30, stop=(EOS,)))
    finally:
        handle.remove()
    assert client.stats.tokens == 3  # two ordinary tokens, then <|EOT|>, which is not shown
    first_two = reference(loaded, "hi", 2, eos=False)
    assert out == first_two


async def test_sampling_with_tiny_top_p_is_greedy(make, loaded) -> None:
    client = make()
    out = "".join(await collect(client, PROMPTS[0], max_new_tokens=30, temperature=1.0, top_p=1e-6))
    assert out == reference(loaded, PROMPTS[0], 30)


async def test_count_tokens_follows_the_chat_template(make, loaded) -> None:
    _, tok = loaded
    client = make()
    messages: list[ChatMessage] = [
        {"role": "system", "content": "You run Python."},
        {"role": "user", "content": "load data.csv"},
        {"role": "assistant", "content": "```python\nprint(1)\n```"},
        {"role": "user", "content": "Execution result:\n1"},
    ]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("### Instruction:\nExecution result:\n1\n### Response:\n")
    assert "<|EOT|>" in text
    assert client.count_tokens(messages) == len(tok(text, add_special_tokens=False)["input_ids"])


async def test_prompt_longer_than_context_is_refused(make) -> None:
    client = make(context_tokens=16)
    with pytest.raises(ModelError, match="context"):
        await collect(client, "x " * 50)


async def test_make_client_loads_a_model_directory(model_dir: Path, make_settings) -> None:
    settings = make_settings(llm_backend="transformers", llm_url=None, model=str(model_dir), device="cpu")
    client = make_client(settings)
    try:
        assert isinstance(client, LocalModelClient)
        assert client.context_tokens == 2048  # capped at the model's max_position_embeddings
        out = "".join([d async for d in client.stream_chat(chat("hi"), GenerationParams(max_new_tokens=5))])
        assert out
    finally:
        await client.aclose()


async def test_a_failed_forward_fails_its_streams_and_the_next_one_works(make, loaded) -> None:
    model, _ = loaded
    client = make()

    def boom(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("CUDA out of memory (simulated)")

    handle = model.lm_head.register_forward_hook(boom)
    try:
        with pytest.raises(ModelError, match="out of memory"):
            await collect(client, "hi", max_new_tokens=5)
    finally:
        handle.remove()
    assert "".join(await collect(client, "hi", max_new_tokens=20)) == reference(loaded, "hi", 20)


async def test_cancelling_a_queued_request_never_runs_it(make, loaded) -> None:
    client = make(max_batch=1, eos_token_ids=())
    first = asyncio.create_task(collect(client, PROMPTS[0], max_new_tokens=150))
    queued = asyncio.create_task(collect(client, PROMPTS[1], max_new_tokens=150))
    while client.stats.max_waiting < 1:  # the second is queued behind the first
        await asyncio.sleep(0.001)
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert "".join(await first) == reference(loaded, PROMPTS[0], 150, eos=False)
    assert client.stats.prefills == 1


async def test_each_generation_reports_its_exact_tokens(make: Any, loaded: tuple[Any, Any]) -> None:
    """Prompt tokens as the template encodes them, completion tokens as the scheduler sampled them."""
    from bot.llm.base import TokenUsage

    client = make(eos_token_ids=())
    usage = TokenUsage()
    _ = [d async for d in client.stream_chat(chat(PROMPTS[1]), GenerationParams(max_new_tokens=9), usage)]
    assert usage.prompt_tokens == client.count_tokens(chat(PROMPTS[1])) > 10
    assert (usage.completion_tokens, usage.exact) == (9, True)
    stopped = TokenUsage()  # cut short by the consumer: what was sampled until then
    async with contextlib.aclosing(client.stream_chat(chat("hi"), GenerationParams(max_new_tokens=400),
                                                      stopped)) as stream:
        async for _ in stream:
            break
    assert stopped.prompt_tokens == client.count_tokens(chat("hi")) and 1 <= stopped.completion_tokens < 400
