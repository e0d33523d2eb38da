from __future__ import annotations

from bot.agent import prompts
from bot.agent.feedback import chat_output, cut_middle, model_feedback
from runner.results import ErrorInfo, ExecutionResult, RichResult


def test_cut_middle_keeps_head_and_tail() -> None:
    text = "A" * 500 + "B" * 500
    cut = cut_middle(text, 200)
    assert cut.startswith("A" * 80) and cut.endswith("B" * 80)
    assert "characters cut" in cut and len(cut) < 260
    assert cut_middle("short", 200) == "short"


def test_feedback_starts_like_training_data_and_carries_traceback() -> None:
    result = ExecutionResult(stdout="before\n", error=ErrorInfo("ZeroDivisionError", "division by zero",
                                                               "Traceback...\nZeroDivisionError: division by zero"))
    fb = model_feedback(result, 1000, [], [])
    assert fb.startswith("Execution result:\n")
    assert "before" in fb and "ZeroDivisionError: division by zero" in fb


def test_empty_output_gets_a_nudge() -> None:
    assert model_feedback(ExecutionResult(), 1000, [], []) == prompts.FEEDBACK_PREFIX + prompts.EMPTY_OUTPUT


def test_images_become_placeholders_and_results_text_is_shown() -> None:
    result = ExecutionResult(results=[RichResult({"text/plain": "<Figure>", "image/png": "iVBO"}),
                                      RichResult({"text/plain": "   a\n0  1"}, kind="execute_result")])
    fb = model_feedback(result, 1000, ["figure-1.png"], [])
    assert "[image figure-1.png shown to the user]" in fb
    assert "<Figure>" not in fb and "a\n0  1" in fb
    assert chat_output(result) == "   a\n0  1"


def test_long_output_is_cut_for_the_model_but_not_for_the_chat() -> None:
    result = ExecutionResult(stdout="x" * 5000)
    assert len(model_feedback(result, 400, [], [])) < 500
    assert len(chat_output(result)) == 5000


def test_timeout_and_restart_are_explained() -> None:
    result = ExecutionResult(timed_out=True, duration_s=30.2, restarted=True)
    assert "Timed out after 30 s" in model_feedback(result, 1000, [], [])
    restarted = ExecutionResult(stdout="hi", restarted=True)
    assert prompts.SESSION_RESTARTED in model_feedback(restarted, 1000, [], [])
