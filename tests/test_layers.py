"""The house's plan, checked: each package of ``bot`` (and ``runner``) imports only the layers
below it, so a newcomer can read the dependency order from the folder names alone.

    bot.core                      settings, errors, jobs, limits, notebook: imports nothing else
    bot.llm  bot.queue  runner    the model backends; everything in Redis; the sandbox (runner: bot.core only)
    bot.ops                       metrics, health server, doctor
    bot.agent                     the refine loop (reads runner's ExecutionResult)
    bot.worker                    generates and executes; never imports an adapter
    bot.adapters                  Slack, Discord; never import the worker
    bot.adapters.console, bot.bench, bot.evaluation, bot.cli, runner.cli: entry points, may use all
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

ALLOWED: dict[str, set[str]] = {
    "core": {"core"},
    "llm": {"core", "llm"},
    "queue": {"core", "queue"},
    "ops": {"core", "queue", "runner", "ops"},
    "agent": {"core", "llm", "ops", "runner", "agent"},
    "runner": {"core", "runner"},
    "worker": {"core", "queue", "llm", "agent", "ops", "runner", "worker"},
    "adapters": {"core", "queue", "ops", "adapters"},
}
ENTRY_POINTS = {"bot", "bot.cli", "bot.adapters.console", "runner.cli"}
ENTRY_PACKAGES = ("bot.bench", "bot.evaluation")


def _layer(module: str) -> str | None:
    """The layer a module belongs to, or None for an entry point (which may import anything)."""
    if module in ENTRY_POINTS or module.startswith(ENTRY_PACKAGES):
        return None
    parts = module.split(".")
    if parts[0] == "runner":
        return "runner"
    if parts[0] == "bot" and len(parts) > 1:
        return parts[1]
    return None


def _modules() -> list[tuple[str, Path]]:
    found = []
    for pkg in ("bot", "runner"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if "image" in path.relative_to(ROOT).parts:  # runner/image: the sandbox's own code, run inside
                continue
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found.append((".".join(parts), path))
    return found


def _imports(path: Path) -> set[str]:
    """Every bot/runner module ``path`` imports, at any depth in the file (lazy imports count)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n.split(".")[0] in ("bot", "runner")}


def _target_layer(name: str) -> str | None:
    """The layer of an imported name (``bot.queue.stream.JobQueue`` → queue); None for ``bot`` itself."""
    parts = name.split(".")
    if parts[0] == "runner":
        return "runner"
    if len(parts) == 1 or parts[1] == "__version__":
        return None
    if ".".join(parts[:3]) == "bot.adapters.console":
        return "console"
    return parts[1]


@pytest.mark.parametrize("module,path", _modules(), ids=lambda v: v if isinstance(v, str) else "")
def test_imports_go_one_way(module: str, path: Path) -> None:
    layer = _layer(module)
    if layer is None:
        return
    assert layer in ALLOWED, f"{module}: package {layer!r} is not in the plan (tests/test_layers.py)"
    wrong = sorted(n for n in _imports(path) if (t := _target_layer(n)) is not None and t not in ALLOWED[layer])
    assert not wrong, f"{module} ({layer}) imports {wrong}; {layer} may import only {sorted(ALLOWED[layer])}"


def test_the_plan_has_no_cycles() -> None:
    """A layer may not, through the others, come back to itself."""
    for start in ALLOWED:
        seen: set[str] = set()
        todo = [t for t in ALLOWED[start] if t != start]
        while todo:
            layer = todo.pop()
            assert layer != start, f"{start} can reach itself through {sorted(seen)}"
            if layer not in seen:
                seen.add(layer)
                todo += [t for t in ALLOWED[layer] if t != layer]


def test_no_flat_modules_left_beside_the_packages() -> None:
    flat = sorted(p.name for p in (ROOT / "bot").glob("*.py") if p.name not in ("__init__.py", "cli.py"))
    assert not flat, f"bot/ should hold packages and the cli entry point only, found {flat}"
