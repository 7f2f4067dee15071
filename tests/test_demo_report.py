"""What the demo's report concludes from its own table (visuray.demo.report), without running the demo."""

from __future__ import annotations

import pytest

from visuray.demo.report import DINO_ROW, PRETRAINED_ROW, dino_adaptation_note

pytestmark = pytest.mark.unit


def table(pretrained: float, dino: float) -> list[dict]:
    return [
        {"embedding": "raw pixels (16x16 RGB)", "recall@1": 0.29},
        {"embedding": PRETRAINED_ROW, "recall@1": pretrained},
        {"embedding": DINO_ROW, "recall@1": dino},
    ]


def test_a_dino_stage_that_scores_below_the_weights_as_they_are_is_said_not_to_pay() -> None:
    note = dino_adaptation_note(table(pretrained=0.630, dino=0.553), dino_steps=20)
    assert note == (
        "DINO continued on this catalog for 20 steps scores Recall@1 0.553 against 0.630 for the pretrained "
        "weights as they are: at the demo's budget domain-adaptive DINO does not pay, so the fine-tuned model "
        "starts from the ImageNet weights, not from the DINO model."
    )
    assert "does not pay" in (dino_adaptation_note(table(0.6, 0.6), 20) or "")  # a tie buys nothing either


def test_a_dino_stage_that_scores_above_them_is_said_to_improve_and_a_missing_row_says_nothing() -> None:
    note = dino_adaptation_note(table(pretrained=0.55, dino=0.61), dino_steps=40)
    assert note is not None and note.endswith(
        "it improves on them here, on the photos it adapted to (without their labels)."
    )
    assert dino_adaptation_note(table(0.5, 0.6)[:2], 40) is None
