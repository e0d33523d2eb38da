"""Cells run through IPython: Jupyter-format tracebacks, magics, `!cmd`, top-level await, display."""

from __future__ import annotations

import base64

from runner.session import SandboxSession
from tests.runner.helpers import run_ok

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


async def test_traceback_is_jupyters_format(session: SandboxSession) -> None:
    await run_ok(session, "x = 1")
    result = await session.run("def f(v):\n    return v / 0\n\nf(\n  2)")
    assert result.error is not None and result.error.name == "ZeroDivisionError"
    tb = result.error.traceback
    assert "\x1b" not in tb
    # cell 2 of the session, IPython's context lines with the arrow on the failing one
    assert "Cell In[2], line 4" in tb and "Cell In[2], line 2, in f(v)" in tb
    assert "----> 2     return v / 0" in tb
    assert tb.rstrip().endswith("ZeroDivisionError: division by zero")
    assert "kernel.py" not in tb and "interactiveshell" not in tb.lower()
    syntax = await session.run("def broken(:\n    pass")
    assert syntax.error is not None and syntax.error.name == "SyntaxError"
    assert "Cell In[3], line 1" in syntax.error.traceback and "\x1b" not in syntax.error.traceback


async def test_top_level_await(session: SandboxSession) -> None:
    result = await run_ok(session, "import asyncio\nasync def twice(v):\n    await asyncio.sleep(0)\n"
                                   "    return 2 * v\nawait twice(21)")
    assert result.results[0].kind == "execute_result" and result.results[0].text == "42"


async def test_magics_and_shell_commands(session: SandboxSession) -> None:
    result = await run_ok(session, "%time total = sum(range(10))\n!echo from-shell $total\nfiles = !ls /opt/codeloop\n"
                                   "'kernel.py' in files")
    assert "from-shell 45" in result.stdout
    assert "Wall time" in result.stdout
    assert result.results[0].text == "True"
    assert (await run_ok(session, "%who_ls")).results[0].text.count("total") == 1
    # a failing shell command sets IPython's exit code, as in Jupyter
    failed = await run_ok(session, "!exit 3\n_exit_code")
    assert failed.results[0].text == "3"


async def test_rich_display_and_out_history(session: SandboxSession) -> None:
    result = await run_ok(
        session,
        "from IPython.display import display, Markdown, HTML\ndisplay(Markdown('**b**'))\n"
        "display(HTML('<i>i</i>'), 5)\n6 * 7",
    )
    kinds = [(r.kind, sorted(r.data)) for r in result.results]
    assert kinds == [
        ("display_data", ["text/markdown", "text/plain"]),
        ("display_data", ["text/html", "text/plain"]),
        ("display_data", ["text/plain"]),
        ("execute_result", ["text/plain"]),
    ]
    assert (await run_ok(session, "Out[1] + _")).results[0].text == "84"
    # a trailing semicolon silences the value, as in Jupyter
    assert (await run_ok(session, "1 + 1;")).results == []


async def test_seaborn_plot_with_cjk_title(session: SandboxSession) -> None:
    result = await run_ok(
        session,
        "import warnings\nimport seaborn as sns\nimport matplotlib.pyplot as plt\n"
        "plt.rcParams['font.family'] = ['DejaVu Sans', 'Noto Sans CJK JP']\n"
        "with warnings.catch_warnings(record=True) as caught:\n    warnings.simplefilter('always')\n"
        "    ax = sns.barplot(x=['a', 'b'], y=[1, 2])\n    ax.set_title('売上 Выручка')\n"
        "    plt.gcf().canvas.draw()\n[str(w.message) for w in caught if 'missing from' in str(w.message)]",
    )
    assert result.results[0].text == "[]"  # every glyph found a font
    assert len(result.images) == 1
    assert base64.b64decode(result.images[0][1]).startswith(PNG_MAGIC)


async def test_batteries_import(session: SandboxSession) -> None:
    modules = ("numpy pandas matplotlib scipy sklearn seaborn statsmodels.api sympy openpyxl xlrd pyarrow "
               "PIL networkx tabulate bs4 lxml docx pypdf IPython")
    code = f"import importlib\n[m for m in {modules.split()!r} if not importlib.import_module(m)]"
    result = await run_ok(session, code)
    assert result.results[0].text == "[]"
