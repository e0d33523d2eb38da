from __future__ import annotations

import json
import random

import pytest

from bot.adapters.common import code_block, is_allowed, parse_control, split_message, truncate_output
from bot.core.errors import InputRejected
from bot.core.jobs import Conversation, Job
from bot.core.limits import InputLimits, Upload, check_text, check_upload, partition_uploads, safe_filename

LIMITS = InputLimits(max_chars=100, max_upload_bytes=1000)


def test_allowlist_empty_allows_everyone_and_listed_ids_pass():
    assert is_allowed([], "U1")
    assert is_allowed(["C1", "C2"], None, "C2")
    assert not is_allowed(["C1"], "C9", None)


def test_check_text_strips_and_rejects_empty_and_long():
    assert check_text("  hi  ", LIMITS) == "hi"
    with pytest.raises(InputRejected, match="without a request"):
        check_text("   ", LIMITS)
    assert check_text("", LIMITS, has_files=True) == ""
    with pytest.raises(InputRejected, match="101 characters; the limit is 100"):
        check_text("x" * 101, LIMITS)


def test_check_text_replaces_lone_surrogates_and_drops_nul_so_the_job_encodes():
    text = check_text(" plot\ud800 x\x00 vs \udfff y \ud83d\ude00 ", LIMITS)
    assert text == "plot\ufffd x vs \ufffd y \U0001f600"
    assert json.loads(json.dumps(text, ensure_ascii=False).encode("utf-8")) == text
    assert Job(idempotency_key="e", user="u", text=text, reply_stream="r",
               conversation=Conversation(platform="t", channel="c", thread="t")).dumps().encode("utf-8")
    assert check_text("plain text", LIMITS) == "plain text"
    with pytest.raises(InputRejected, match="without a request"):
        check_text("\x00 \x00", LIMITS)
    assert parse_control("reset\x00") == ("reset", "")


def test_uploads_oversize_and_executables_are_refused_with_a_reason():
    check_upload(Upload("data.csv", 1000, "text/csv"), LIMITS)
    with pytest.raises(InputRejected, match=r"`big.csv` is 1.0 MiB; files up to 1000 bytes"):
        check_upload(Upload("big.csv", 1024 * 1024, "text/csv"), LIMITS)
    with pytest.raises(InputRejected, match="executable"):
        check_upload(Upload("tool.EXE", 10), LIMITS)
    with pytest.raises(InputRejected, match="executable"):
        check_upload(Upload("a.out", 10, "application/x-executable"), LIMITS)
    ok, refused = partition_uploads(
        [("a", Upload("a.png", 10, "image/png")), ("b", Upload("b.csv", 5000))], LIMITS
    )
    assert ok == ["a"] and len(refused) == 1 and "b.csv" in refused[0]


@pytest.mark.parametrize("name", ["evil.exe.", "evil.exe ", "evil.exe. .", " .evil.DLL..", "dir/../evil.exe",
                                  "C:\\Users\\x\\evil.bat", "evil.exe\x00"])
def test_the_extension_check_runs_on_the_name_the_file_would_land_as(name):
    landed = safe_filename(name)
    assert landed.lower().endswith((".exe", ".dll", ".bat")), landed  # what the sandbox would hold
    with pytest.raises(InputRejected, match="looks like an executable"):
        check_upload(Upload(name, 10, "text/plain"), LIMITS)


def test_safe_filename_keeps_data_names_and_strips_what_could_mislead():
    assert safe_filename("sales 2024.csv") == "sales 2024.csv"
    assert safe_filename("../../etc/passwd") == "passwd"
    assert safe_filename("<!channel>.csv") == "_channel_.csv"
    assert safe_filename("...") == "upload"
    check_upload(Upload("report.exe.csv", 10, "text/csv"), LIMITS)  # lands as a .csv: fine


@pytest.mark.parametrize(
    ("text", "kind"),
    [("reset", "reset"), (" Reset. ", "reset"), ("stop", "stop"), ("reset the index of df", "message")],
)
def test_control_words(text, kind):
    assert parse_control(text)[0] == kind


def test_code_block_cannot_be_closed_by_backticks_inside():
    block = code_block('print("```")\n', "python")
    assert block.startswith("```python\n") and block.endswith("\n```")
    assert block.count("```") == 2


def test_truncate_keeps_head_and_tail_within_limit():
    text = "".join(f"line {i}\n" for i in range(5000))
    out = truncate_output(text, 1000, "output.txt")
    assert out.truncated and len(out.text) <= 1000
    assert out.text.startswith("line 0\n") and out.text.endswith("line 4999\n")
    assert "omitted; full output in output.txt" in out.text
    note = f"\n… {out.omitted:,} characters omitted; full output in output.txt …\n"
    head, tail = out.text.split(note)
    assert text.startswith(head) and text.endswith(tail)
    assert len(head) + out.omitted + len(tail) == len(text)
    assert truncate_output("short", 1000).truncated is False


def _fences_balanced(chunk: str) -> bool:
    return chunk.count("```") % 2 == 0


def test_split_short_text_is_one_chunk():
    assert split_message("hello", 100) == ["hello"]


def test_split_reopens_code_fence_with_its_language():
    code = "\n".join(f"x{i} = {i}" for i in range(60))
    text = "Here is the code:\n```python\n" + code + "\n```\nDone."
    chunks = split_message(text, 200)
    assert len(chunks) > 2
    for chunk in chunks:
        assert len(chunk) <= 200
        assert _fences_balanced(chunk), chunk
    assert all(c.startswith("```python\n") for c in chunks[1:-1])
    # Nothing lost: removing the added fences gives back the original lines.
    lines = [ln for c in chunks for ln in c.splitlines() if ln not in ("```", "```python")]
    assert lines == [ln for ln in text.splitlines() if ln not in ("```", "```python")]


def test_split_hard_cuts_a_single_huge_line_and_keeps_entities_whole():
    text = "```\n" + "&amp;" * 200 + "\n```"
    chunks = split_message(text, 101)
    for chunk in chunks:
        assert len(chunk) <= 101 and _fences_balanced(chunk)
        body = chunk.replace("```", "").replace("\n", "")
        assert body.replace("&amp;", "") == "", chunk


def test_split_random_markdown_never_exceeds_limit_or_unbalances_fences():
    rng = random.Random(7)
    for _ in range(200):
        parts = []
        for _ in range(rng.randint(1, 30)):
            choice = rng.random()
            if choice < 0.2:
                parts.append(rng.choice(["```", "```python", "```sql"]))
            else:
                parts.append("w" * rng.randint(0, 150))
        text = "\n".join(parts)
        if text.count("```") % 2:
            text += "\n```"
        limit = rng.randint(60, 300)
        chunks = split_message(text, limit)
        for chunk in chunks:
            assert len(chunk) <= limit
            assert _fences_balanced(chunk), (text, limit, chunk)
        joined = "".join(c.replace("```python", "").replace("```sql", "").replace("```", "") for c in chunks)
        assert joined.replace("\n", "") == text.replace("```python", "").replace("```sql", "").replace(
            "```", "").replace("\n", "")
