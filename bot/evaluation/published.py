"""The seed's published table: OpenCodeInterpreter's README, pass@1 in percent, as (base, plus).

Transcribed from README.md of OpenCodeInterpreter/OpenCodeInterpreter at commit
fd95eb7d8a32dbc96dcff9322bbc288784f8d16e (docs/EVAL.md cites it). Each cell there reads
"base (plus)": HumanEval (HumanEval+) and MBPP (MBPP+), measured with EvalPlus; "+ Execution
Feedback" is after exactly one round of feedback; "+ Synth. Human Feedback" (GPT-4 critiques) and
its "(Oracle)" variant were published for DS-6.7B and DS-33B only.
"""

from __future__ import annotations

from typing import Literal

Row = Literal["no_feedback", "execution_feedback", "human_feedback", "human_feedback_oracle"]
Cell = tuple[float, float]  # (base, plus)

SOURCE = ("OpenCodeInterpreter/OpenCodeInterpreter README.md @ fd95eb7d8a32dbc96dcff9322bbc288784f8d16e")

ROW_LABELS: dict[Row, str] = {
    "no_feedback": "no feedback",
    "execution_feedback": "+ execution feedback",
    "human_feedback": "+ synth. human feedback",
    "human_feedback_oracle": "+ synth. human feedback (oracle)",
}

# model -> row -> benchmark -> (base, plus)
PUBLISHED: dict[str, dict[Row, dict[str, Cell]]] = {
    "OpenCodeInterpreter-DS-1.3B": {
        "no_feedback": {"humaneval": (65.2, 61.0), "mbpp": (63.4, 52.4)},
        "execution_feedback": {"humaneval": (65.2, 62.2), "mbpp": (65.2, 55.6)},
    },
    "OpenCodeInterpreter-DS-6.7B": {
        "no_feedback": {"humaneval": (76.2, 72.0), "mbpp": (73.9, 63.7)},
        "execution_feedback": {"humaneval": (81.1, 78.7), "mbpp": (82.7, 72.4)},
        "human_feedback": {"humaneval": (87.2, 86.6), "mbpp": (86.2, 74.2)},
        "human_feedback_oracle": {"humaneval": (89.7, 86.6), "mbpp": (87.2, 75.2)},
    },
    "OpenCodeInterpreter-DS-33B": {
        "no_feedback": {"humaneval": (79.3, 74.3), "mbpp": (78.7, 66.4)},
        "execution_feedback": {"humaneval": (82.9, 80.5), "mbpp": (83.5, 72.2)},
        "human_feedback": {"humaneval": (88.4, 86.0), "mbpp": (87.5, 75.9)},
        "human_feedback_oracle": {"humaneval": (92.7, 89.7), "mbpp": (90.5, 79.5)},
    },
    "OpenCodeInterpreter-CL-7B": {
        "no_feedback": {"humaneval": (72.6, 67.7), "mbpp": (66.4, 55.4)},
        "execution_feedback": {"humaneval": (75.6, 70.1), "mbpp": (69.9, 60.7)},
    },
    "OpenCodeInterpreter-CL-13B": {
        "no_feedback": {"humaneval": (77.4, 73.8), "mbpp": (70.7, 59.2)},
        "execution_feedback": {"humaneval": (81.1, 76.8), "mbpp": (78.2, 67.2)},
    },
    "OpenCodeInterpreter-CL-34B": {
        "no_feedback": {"humaneval": (78.0, 72.6), "mbpp": (73.4, 61.4)},
        "execution_feedback": {"humaneval": (81.7, 78.7), "mbpp": (80.2, 67.9)},
    },
    "OpenCodeInterpreter-CL-70B": {
        "no_feedback": {"humaneval": (76.2, 70.7), "mbpp": (73.0, 61.9)},
        "execution_feedback": {"humaneval": (79.9, 77.4), "mbpp": (81.5, 69.9)},
    },
    "OpenCodeInterpreter-GM-7B": {
        "no_feedback": {"humaneval": (56.1, 50.0), "mbpp": (39.8, 34.6)},
        "execution_feedback": {"humaneval": (64.0, 54.3), "mbpp": (48.6, 40.9)},
    },
    "OpenCodeInterpreter-SC2-3B": {
        "no_feedback": {"humaneval": (65.2, 57.9), "mbpp": (62.7, 52.9)},
        "execution_feedback": {"humaneval": (67.1, 60.4), "mbpp": (63.4, 54.9)},
    },
    "OpenCodeInterpreter-SC2-7B": {
        "no_feedback": {"humaneval": (73.8, 68.9), "mbpp": (61.7, 51.1)},
        "execution_feedback": {"humaneval": (75.6, 69.5), "mbpp": (66.9, 55.4)},
    },
    "OpenCodeInterpreter-SC2-15B": {
        "no_feedback": {"humaneval": (75.6, 69.5), "mbpp": (71.2, 61.2)},
        "execution_feedback": {"humaneval": (77.4, 72.0), "mbpp": (74.2, 63.4)},
    },
}


def published_model(model: str) -> str | None:
    """The README's name for ``model`` (a Hub id like ``m-a-p/OpenCodeInterpreter-DS-6.7B``, or a
    local folder of that name), matched on its last path part without regard to case."""
    name = model.rstrip("/").rsplit("/", 1)[-1].lower()
    return next((known for known in PUBLISHED if known.lower() == name), None)


def published_rows(model: str, suite: str) -> dict[Row, Cell]:
    """The README's rows for ``model`` on ``suite`` (humaneval | mbpp); empty when it lists none."""
    known = published_model(model)
    if known is None:
        return {}
    return {row: cells[suite] for row, cells in PUBLISHED[known].items() if suite in cells}
