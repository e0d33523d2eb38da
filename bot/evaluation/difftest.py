"""EvalPlus-style differential testing. This module runs INSIDE the sandbox, never on the host.

grading.py sends its source into a check's fresh kernel. ``prepare`` runs the task's reference
solution (``prompt + canonical_solution``, as EvalPlus computes its expected outputs) on the base
and plus inputs and keeps outputs and per-input time limits; ``verdict`` then calls the model's
function on the same inputs and compares the way EvalPlus does:

* equal, or within ``atol`` for float outputs (``atol`` 1e-6 when the task gives none), with
  NumPy's ``assert_allclose`` tolerance (``|out - exp| <= atol + 1e-7 * |exp|``, NaN equals NaN);
* each input within ``max(min_limit, factor * reference time)`` (EvalPlus: 1 s and 4x);
* the special oracles of OpenCodeInterpreter's EvalPlus fork (HumanEval/32 ``find_zero``: the
  output must be a root; MBPP ``are_equivalent``, ``sum_div`` and the not-None tasks).

On a mismatch it prints what OpenCodeInterpreter's harness showed its model ("The results aren't
as expected." with the input, the expected and the actual output) and returns None; on a pass it
returns the nonce the host is waiting for. An exception raised by the model's function is
printed with the input that raised it and the traceback from the model's own frames on.

Only the standard library is used, so a sandbox image without NumPy still grades.
"""

from __future__ import annotations

import copy
import json
import math
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any

# MBPP+ stores arguments that its functions take as tuples, sets or complex numbers as JSON lists
# and strings; EvalPlus converts them back per task (evalplus/data/mbpp.py). The same conversions,
# by recipe name, and the MBPP task numbers each applies to.
MBPP_RECIPES: dict[str, tuple[int, ...]] = {
    "args_to_tuples": (2, 116, 132, 143, 222, 261, 273, 394, 399, 421, 424, 429, 470, 560, 579, 596, 616,
                       630, 726, 740, 744, 809),
    "inner_lists_to_tuples": (63, 64, 70, 94, 120, 237, 272, 299, 400, 409, 417, 438, 473, 614, 780),
    "first_arg_inner_to_tuples": (75, 413, 444, 753),
    "second_arg_to_tuple": (106, 750),
    "sets_115": (115,),
    "float_complex_124": (124,),
    "first_arg_to_tuple": (250, 307, 405, 446, 617, 720, 763, 808),
    "args_to_nested_tuples": (259, 401, 445),
    "tuple_of_tuples_278": (278,),
    "dict_values_to_tuples": (722,),
    "complex_252": (252,),
    "all_to_tuples": (580, 615, 791),
}

# Oracles by (suite, entry point), as in OpenCodeInterpreter's EvalPlus fork.
ORACLES: dict[tuple[str, str], str] = {
    ("humaneval", "find_zero"): "root",
    ("mbpp", "are_equivalent"): "always",
    ("mbpp", "sum_div"): "or_zero",
    ("mbpp", "check_str"): "not_none",
    ("mbpp", "text_match_three"): "not_none",
    ("mbpp", "text_starta_endb"): "not_none",
}


def mbpp_recipe(task_number: int) -> str | None:
    return next((name for name, ids in MBPP_RECIPES.items() if task_number in ids), None)


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _convert(recipe: str | None, inp: list[Any]) -> Any:
    if recipe is None:
        return inp
    if recipe == "args_to_tuples":
        return [tuple(a) for a in inp]
    if recipe == "inner_lists_to_tuples":
        return [[tuple(x) for x in a] for a in inp]
    if recipe == "first_arg_inner_to_tuples":
        return [[tuple(x) for x in inp[0]], *inp[1:]]
    if recipe == "second_arg_to_tuple":
        return [inp[0], tuple(inp[1]), *inp[2:]]
    if recipe == "sets_115":  # an empty list becomes {} (a dict), exactly as EvalPlus does
        return [[set(x) if isinstance(x, list) and len(x) else {} for x in inp[0]]]
    if recipe == "float_complex_124":
        return [float(inp[0]), complex(inp[1])]
    if recipe == "first_arg_to_tuple":
        return [tuple(inp[0]), *inp[1:]]
    if recipe == "args_to_nested_tuples":
        return [tuple(tuple(x) for x in a) for a in inp]
    if recipe == "tuple_of_tuples_278":
        return [tuple(tuple(x) if isinstance(x, list) else x for x in inp[0])]
    if recipe == "dict_values_to_tuples":
        return [{k: tuple(v) for k, v in inp[0].items()}, *inp[1:]]
    if recipe == "complex_252":
        return [complex(inp[0])]
    if recipe == "all_to_tuples":
        return _tuples(inp)
    raise ValueError(f"unknown input recipe {recipe!r}")


def deserialize(recipe: str | None, inputs: list[list[Any]]) -> list[Any]:
    return [_convert(recipe, inp) for inp in inputs]


def is_floats(x: Any) -> bool:
    """EvalPlus's test for float outputs (an empty list counts, as there)."""
    if isinstance(x, float):
        return True
    if isinstance(x, list | tuple):
        return all(isinstance(i, float) for i in x)
    return type(x).__name__ == "ndarray" and str(getattr(x, "dtype", "")) in ("float64", "float32")


def close(out: Any, exp: Any, atol: float) -> bool:
    """NumPy's ``assert_allclose(out, exp, atol=atol)`` (rtol 1e-7) for numbers and sequences of them."""
    if isinstance(exp, list | tuple) or isinstance(out, list | tuple):
        if not (isinstance(exp, list | tuple) and isinstance(out, list | tuple)) or len(out) != len(exp):
            return False
        return all(close(o, e, atol) for o, e in zip(out, exp, strict=True))
    if not all(isinstance(v, int | float) for v in (out, exp)):
        return False
    if math.isnan(out) or math.isnan(exp):
        return bool(math.isnan(out) and math.isnan(exp))
    if math.isinf(out) or math.isinf(exp):
        return bool(out == exp)
    return bool(abs(out - exp) <= atol + 1e-7 * abs(exp))


def _poly(xs: list[float], x: float) -> float:
    return sum(c * math.pow(x, i) for i, c in enumerate(xs))


def matches(out: Any, exp: Any, inp: Any, oracle: str | None, atol: float) -> bool:
    if oracle == "root":  # any root will do; EvalPlus's corrected check (abs) is used
        try:
            return bool(abs(_poly(inp[0], out)) <= atol)
        except (TypeError, ValueError, OverflowError):
            return False
    if oracle == "always":
        return True
    if oracle == "not_none":
        return bool((out if isinstance(out, bool) else out is not None) == exp)
    try:
        exact = bool(out == exp)
    except Exception:
        exact = False
    if oracle == "or_zero":
        exact = exact or out == 0
    tol = atol if atol else (1e-6 if is_floats(exp) else 0.0)
    if not exact and tol:
        return close(out, exp, tol)
    return exact


class _Expired(Exception):
    """Raised in the model's function when its time for one input is up."""


def call_with_limit(fn: Callable[..., Any], args: Any, limit_s: float) -> tuple[Any, bool]:
    """``fn(*args)`` with an alarm after ``limit_s``; (output, expired). A function that swallows
    the alarm still counts as expired."""
    expired = False

    def on_alarm(signum: int, frame: object) -> None:
        nonlocal expired
        expired = True
        raise _Expired

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    try:
        out = fn(*args)
    except _Expired:
        return None, True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return out, expired


_STATE: dict[str, Any] = {}


def prepare(reference: str, entry_point: str, inputs_json: str, recipe: str | None, oracle: str | None,
            atol: float, min_limit: float, factor: float) -> tuple[float, ...]:
    """Run the reference on every input group; keep inputs, expected outputs and time limits.

    Returns each group's time budget (EvalPlus: the sum of its per-input limits + 1 s)."""
    groups: dict[str, list[list[Any]]] = json.loads(inputs_json)
    namespace: dict[str, Any] = {"__name__": "__reference__"}
    exec(compile(reference, "<reference>", "exec"), namespace)
    fn = namespace[entry_point]
    budgets = []
    for name, raw in groups.items():
        inputs = deserialize(recipe, raw)
        expected, limits = [], []
        for inp in inputs:
            args = copy.deepcopy(inp)
            started = time.perf_counter()
            out = fn(*args)
            limits.append(max(min_limit, factor * (time.perf_counter() - started)))
            expected.append(out is not None if oracle == "not_none" else out)
        _STATE[name] = (inputs, expected, limits)
        budgets.append(round(sum(limits) + 1.0, 3))
    _STATE["config"] = (oracle, atol)
    return tuple(budgets)


SHOWN_CHARS = 1000


def shown(value: Any) -> str:
    """A value as printed in feedback, its middle cut when long (inputs can be 10^5-element lists)."""
    text = str(value)
    if len(text) <= SHOWN_CHARS:
        return text
    half = SHOWN_CHARS // 2
    return f"{text[:half]} ...[{len(text) - 2 * half} characters cut]... {text[-half:]}"


def _own_traceback(exc: BaseException) -> str:
    """The exception as Python prints it, from the model's first frame on (this module's frames cut)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == _HERE:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def verdict(namespace: dict[str, Any], entry_point: str, group: str, nonce: str) -> str | None:
    """``nonce`` if the function ``entry_point`` of ``namespace`` gives the expected output for
    every input of ``group``; else None, after printing what went wrong as the model should see it."""
    fn = namespace.get(entry_point)
    if not callable(fn):
        print(f"NameError: name {entry_point!r} is not defined (the tests call {entry_point}(...))")
        return None
    inputs, expected, limits = _STATE[group]
    oracle, atol = _STATE["config"]
    for inp, exp, limit in zip(inputs, expected, limits, strict=True):
        try:
            out, expired = call_with_limit(fn, copy.deepcopy(inp), limit)
        except Exception as exc:
            print(f"Input: {shown(inp)}\n{_own_traceback(exc)}", end="")
            return None
        if expired:
            print(f"Execution timed out after {limit:.2f} s.\nInput: {shown(inp)}")
            return None
        if not matches(out, exp, inp, oracle, atol):
            print(f"The results aren't as expected.\nInput: {shown(inp)}\nExpected Output: {shown(exp)}\n"
                  f"Actual Output: {shown(out)}")
            return None
    return nonce


_HERE = verdict.__code__.co_filename
