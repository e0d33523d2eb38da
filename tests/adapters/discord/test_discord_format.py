"""Discord's limits, checked exactly on the pure formatting functions."""

from __future__ import annotations

import pytest

from bot.adapters.discord import format as fmt


def test_stream_chunks_close_an_open_fence_within_the_limit():
    text = "Working:\n```python\n" + "\n".join(f"value_{i} = {i}" for i in range(300))
    chunks = fmt.stream_chunks(text)
    assert len(chunks) > 1 and all(len(c) <= fmt.MESSAGE_LIMIT for c in chunks)
    assert all(c.count("```") % 2 == 0 for c in chunks)
    assert chunks[-1].endswith("\n```") and chunks[1].startswith("```python\n")
    assert fmt.stream_chunks("   \n") == []


def test_thread_name_is_one_line_of_at_most_100_characters():
    name = fmt.thread_name("plot\nrevenue   by month " + "x" * 200)
    assert name.startswith("plot revenue by month x") and len(name) == 100 and name.endswith("…")
    assert fmt.thread_name("  ") == "codeloop"


def test_header_fits_one_message_with_a_long_prompt():
    head = fmt.header("<@1>", "p" * 5000, ["data.csv"])
    assert len(head) <= fmt.MESSAGE_LIMIT and head.startswith("<@1>: ppp") and head.endswith("…\n📎 data.csv")


def test_output_inline_error_timeout_and_empty():
    assert fmt.output_message({"text": "", "error": None, "duration_s": 0.01}) == (
        "**Output** · 0.01 s\n*(no output)*", None)
    content, upload = fmt.output_message({"text": "x\n```\ny", "error": {"name": "TimeoutError", "value": ""},
                                          "timed_out": True, "duration_s": 30.0})
    assert content == "**Output** · `TimeoutError` · timed out · 30.00 s\n```\nx\n`\u200b``\ny\n```"
    assert upload is None


def test_truncated_output_attaches_the_full_text_even_when_short():
    content, upload = fmt.output_message({"text": "head … tail", "truncated": True, "full_text": "F" * 50})
    assert upload == fmt.Upload("output.txt", b"F" * 50) and "50 characters, attached" in content


def test_batches_respect_count_and_bytes():
    files = [fmt.Upload(f"f{i}", b"x" * 300) for i in range(25)]
    batches, notes = fmt.batch_uploads([*files, fmt.Upload("huge", b"x" * 2000)], max_bytes=1000)
    assert [len(b) for b in batches] == [3] * 8 + [1] and notes == [
        "`huge` is 2.0 KiB, over Discord's 1000 bytes upload limit; it stays in the session's /mnt/data."]
    batches, _ = fmt.batch_uploads(files)
    assert [len(b) for b in batches] == [10, 10, 5]


def test_final_and_error_lines():
    assert fmt.final_line({"rounds": 1, "ok": True}) == "✅ Done · 1 round"
    assert fmt.final_line({"cancelled": True, "rounds": 2}) == "⏹ Stopped."
    assert fmt.error_line({"kind": "cancelled", "message": "Stopped."}) == "⏹ Stopped."
    assert len(fmt.error_line({"kind": "internal", "message": "m" * 3000})) == fmt.MESSAGE_LIMIT


@pytest.mark.parametrize(("text", "shown"), [
    ("[click here](https://evil.example/login)", "[click here] (https://evil.example/login)"),
    ("see [docs](<https://evil.example>) now", "see [docs] (<https://evil.example>) now"),
    ("[x]( \nhttps://evil.example)", "[x] ( \nhttps://evil.example)"),
    ("[a [nested] b](http://evil.example)", "[a [nested] b] (http://evil.example)"),
    ("[mail](mailto:x@evil.example) [rel](//evil.example)", "[mail] (mailto:x@evil.example) [rel] (//evil.example)"),
    ("`[in code](https://evil.example)`", "`[in code] (https://evil.example)`"),
    ("result = funcs[0](x)\nrows[i](lambda_arg)", "result = funcs[0](x)\nrows[i](lambda_arg)"),  # code stays as is
])
def test_masked_links_show_their_url_and_code_is_left_alone(text, shown):
    assert fmt.inert(text) == shown
    assert "](" not in "".join(fmt.stream_chunks("Sure: " + text)).replace("funcs[0](x)", "").replace(
        "rows[i](lambda_arg)", "")


def test_error_and_status_lines_are_inert_too():
    assert fmt.error_line({"message": "`[a](https://evil.example)` was not fetched"}) == \
        "⚠️ `[a] (https://evil.example)` was not fetched"
    assert "](" not in fmt.status_line("reading [x](https://evil.example)")
    assert "](" not in fmt.header("<@1>", "[x](https://evil.example)", [])


def _doc(pad: int) -> str:
    sections = []
    for i in range(8):
        prose = "x" * pad + " " + "word " * (40 + 13 * i)
        code = "\n".join(f"value_{i}_{j} = {j} * 2" for j in range(25 + i))
        sections.append(f"## Section {i}\n\n{prose}\n```python\n{code}\n```\nSo section {i} is done.\n")
    return "# Report\n" + "".join(sections)


def test_headings_and_fences_survive_the_2000_character_splits():
    for pad in range(0, 400, 7):
        text = _doc(pad)
        chunks = fmt.stream_chunks(text)
        assert "".join(chunks).count("```python") >= 8
        for n, chunk in enumerate(chunks):
            assert len(chunk) <= fmt.MESSAGE_LIMIT and chunk.count("```") % 2 == 0, (pad, n)
            last_line = chunk.rstrip("\n").rsplit("\n", 1)[-1]
            # a heading is never left alone at the bottom of a message, away from its text
            assert not last_line.startswith("#"), (pad, n, last_line)
        lines = "".join(chunks).split("\n")
        for i in range(8):  # each heading whole, once, at a line start (where Discord renders it)
            assert lines.count(f"## Section {i}") == 1, (pad, i)
        assert all(f"value_{i}_{j} = {j} * 2" in lines for i in range(8) for j in range(25 + i))
        # a message cut inside code re-opens it with its language
        for chunk in chunks[1:]:
            if not chunk.startswith("##") and "```" in chunk.split("\n", 1)[0]:
                assert chunk.startswith("```python\n"), (pad, chunk[:40])


def test_a_flooded_cell_names_the_sandboxs_files_and_attaches_no_copy():
    text = "a" * 10000 + "\n... [output truncated] ...\n" + "z" * 10000
    content, upload = fmt.output_message({"text": text, "truncated": True,
                                          "full_output_files": ["stdout.txt", "stderr.txt"]})
    assert upload is None and len(content) <= fmt.MESSAGE_LIMIT
    assert content.startswith("**Output** · full output in `stdout.txt` and `stderr.txt`")
    content, upload = fmt.output_message({"text": "short", "truncated": True, "full_output_files": ["stdout.txt"]})
    assert upload is None and "truncated, full output in `stdout.txt`" in content and "short" in content
    # a long output the sandbox did not cut is the adapter's to attach, whole, as output.txt
    content, upload = fmt.output_message({"text": "b" * 5000, "truncated": False, "full_output_files": []})
    assert upload == fmt.Upload("output.txt", b"b" * 5000)
