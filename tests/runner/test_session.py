"""Sessions: state, rich results, files, timeouts, interrupts."""

from __future__ import annotations

import asyncio
import base64

import pytest

from bot.core.errors import InputRejected
from runner.session import SandboxSession
from tests.runner.helpers import run_ok

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


async def test_state_persists_across_cells(session: SandboxSession) -> None:
    await run_ok(session, "import math\nx = 41")
    result = await run_ok(session, "x + 1")
    assert result.results[0].kind == "execute_result"
    assert result.results[0].text == "42"
    assert (await run_ok(session, "math.sqrt(x + 8)")).results[0].text == "7.0"


BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3:\n    pass\n"


async def test_cpu_seconds_of_a_cell_count_its_processes(session: SandboxSession) -> None:
    """The container's cgroup CPU time over the cell (usage accounting): ~0.3 s of CPU in the
    kernel plus ~0.3 s in a child process; a sleeping cell uses almost none. CPU time, not wall."""
    busy = await run_ok(session, BURN + f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {BURN!r}])")
    assert busy.cpu_s is not None and busy.cpu_s > 0.45, busy.cpu_s
    idle = await run_ok(session, "import time\ntime.sleep(0.3)")
    assert idle.cpu_s is not None and idle.cpu_s < busy.cpu_s / 2, (idle.cpu_s, busy.cpu_s)


async def test_stdout_stderr_and_result(session: SandboxSession) -> None:
    result = await run_ok(
        session,
        "import sys, subprocess\nprint('out')\nprint('err', file=sys.stderr)\n"
        "subprocess.run(['echo', 'child'])\n'last'",
    )
    assert result.stdout == "out\nchild\n"
    assert result.stderr == "err\n"
    assert [r.text for r in result.results] == ["'last'"]
    assert not result.truncated and result.ok


async def test_display_and_html(session: SandboxSession) -> None:
    result = await run_ok(session, "import pandas as pd\ndf = pd.DataFrame({'a': [1, 2]})\ndisplay('hi')\ndf")
    assert [r.kind for r in result.results] == ["display_data", "execute_result"]
    assert result.results[0].text == "'hi'"
    assert "<table" in result.results[1].data["text/html"]


async def test_matplotlib_figure_without_show(session: SandboxSession) -> None:
    result = await run_ok(session, "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('t');")
    assert len(result.images) == 1
    mime, data = result.images[0]
    assert mime == "image/png" and base64.b64decode(data).startswith(PNG_MAGIC)
    # Figures are closed once returned: the next cell does not repeat them.
    assert (await run_ok(session, "plt.get_fignums()")).results[0].text == "[]"


async def test_traceback_is_clean(session: SandboxSession) -> None:
    result = await session.run("def f():\n    raise ValueError('\\x1b[31mred\\x1b[0m')\nf()")
    assert result.error is not None
    assert result.error.name == "ValueError"
    assert result.error.value == "red"
    tb = result.error.traceback
    assert "\x1b" not in tb
    assert "kernel.py" not in tb and "supervisor.py" not in tb
    assert "raise ValueError" in tb and "Cell In[1], line 2" in tb
    syntax = await session.run("def broken(:\n    pass")
    assert syntax.error is not None and syntax.error.name == "SyntaxError"


async def test_upload_then_read(session: SandboxSession) -> None:
    await session.put_file("sales.csv", b"month,revenue\n1,10\n2,32\n")
    result = await run_ok(
        session, "import pandas as pd\nint(pd.read_csv('/mnt/data/sales.csv').revenue.sum())"
    )
    assert result.results[0].text == "42"
    assert result.files == []  # uploads are not echoed back as outputs
    for bad in ("../etc/passwd", "a/b.txt", "..", ".hidden", "x\0y", ""):
        with pytest.raises(InputRejected):
            await session.put_file(bad, b"x")


async def test_upload_replaces_symlink_instead_of_following(session: SandboxSession) -> None:
    await run_ok(session, "import os\nos.symlink('/tmp/target', '/mnt/data/in.txt')")
    await session.put_file("in.txt", b"data")
    result = await run_ok(
        session, "import os\n(os.path.islink('in.txt'), open('in.txt').read(), os.path.exists('/tmp/target'))"
    )
    assert result.results[0].text == "(False, 'data', False)"


async def test_returned_files_and_caps(session: SandboxSession) -> None:
    result = await run_ok(
        session,
        "import matplotlib.pyplot as plt\nplt.plot([1])\nplt.savefig('p.png')\n"
        "plt.close('all')\nopen('out.txt', 'w').write('hello')\nimport os\n"
        "os.makedirs('sub', exist_ok=True)\nopen('sub/deep.csv', 'w').write('a')",
    )
    files = {f.name: f for f in result.files}
    assert set(files) == {"out.txt", "p.png", "sub/deep.csv"}
    assert files["out.txt"].data == b"hello" and files["out.txt"].mime == "text/plain"
    assert files["p.png"].data.startswith(PNG_MAGIC) and files["p.png"].mime == "image/png"
    # Unchanged files are not returned again; a changed one is.
    again = await run_ok(session, "open('out.txt', 'a').write('!')")
    assert [(f.name, f.data) for f in again.files] == [("out.txt", b"hello!")]
    big = await run_ok(session, "open('big.bin', 'wb').write(b'0' * (2 * 1024 * 1024))")
    assert big.files == []
    assert any("big.bin" in note and "limit" in note for note in big.notes)


async def test_timeout_interrupts_and_state_survives(session: SandboxSession) -> None:
    await run_ok(session, "x = 5")
    result = await session.run("import time\ntime.sleep(30)", timeout=1)
    assert result.timed_out and not result.restarted
    assert result.error is not None and result.error.name == "TimeoutError"
    assert "time.sleep(30)" in result.error.traceback
    assert 1.0 <= result.duration_s < 2.0
    assert (await run_ok(session, "x")).results[0].text == "5"


async def test_kernel_ignoring_sigint_is_restarted(session: SandboxSession) -> None:
    await run_ok(session, "x = 5\nopen('keep.txt', 'w').write('k')")
    result = await session.run(
        "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass", timeout=1
    )
    assert result.timed_out and result.restarted
    assert result.error is not None and result.error.name == "TimeoutError"
    assert any("variables" in note for note in result.notes)
    after = await session.run("open('keep.txt').read(), x")
    assert after.error is not None and after.error.name == "NameError"  # variables gone, files kept
    assert (await run_ok(session, "open('keep.txt').read()")).results[0].text == "'k'"


async def test_interrupt_stops_running_cell(session: SandboxSession) -> None:
    await run_ok(session, "y = 1")
    task = asyncio.create_task(
        session.run("import time\nfor i in range(300):\n    time.sleep(0.1)", timeout=20)
    )
    await asyncio.sleep(0.5)
    await session.interrupt()
    result = await asyncio.wait_for(task, 5)
    assert result.error is not None and result.error.name == "KeyboardInterrupt"
    assert not result.timed_out and not result.restarted
    assert (await run_ok(session, "y")).results[0].text == "1"


async def test_reset_gives_fresh_namespace(session: SandboxSession) -> None:
    await run_ok(session, "z = 1")
    await session.reset()
    result = await session.run("z")
    assert result.error is not None and result.error.name == "NameError"


async def test_input_and_exit_are_cell_errors(session: SandboxSession) -> None:
    result = await session.run("input('name? ')")
    assert result.error is not None and result.error.name == "EOFError"
    result = await session.run("import sys\nsys.exit(3)")
    assert result.error is not None and result.error.name == "SystemExit"
    assert (await run_ok(session, "1 + 1")).results[0].text == "2"
