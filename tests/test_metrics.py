from __future__ import annotations

import numpy as np
import pytest

from ser.metrics import confusion_matrix, score, summarise

CLASSES = ["anger", "happy", "neutral", "sad"]


def test_scores_against_hand_computation() -> None:
    # reference: anger x3, happy x2, neutral x1; sad is absent from this test split
    labels = [0, 0, 0, 1, 1, 2]
    preds = [0, 0, 1, 1, 3, 2]
    result = score(labels, preds, CLASSES)
    # accuracy 4/6; recalls anger 2/3, happy 1/2, neutral 1/1 (sad absent: left out)
    assert result.wa == pytest.approx(100 * 4 / 6)
    assert result.ua == pytest.approx(100 * (2 / 3 + 1 / 2 + 1) / 3)
    # precisions anger 2/2, happy 1/2, neutral 1/1 -> F1 0.8, 0.5, 1.0
    assert result.f1 == pytest.approx(100 * (0.8 + 0.5 + 1.0) / 3)
    assert result.recall == pytest.approx({"anger": 200 / 3, "happy": 50.0, "neutral": 100.0})
    assert result.confusion == [[2, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]]


def test_perfect_and_empty() -> None:
    assert score([0, 1, 2, 3], [0, 1, 2, 3], CLASSES).ua == 100.0
    with pytest.raises(ValueError, match="non-zero"):
        score([], [], CLASSES)


def test_confusion_rows_are_reference() -> None:
    matrix = confusion_matrix([1, 1], [0, 0], 2)
    assert matrix.tolist() == [[0, 0], [2, 0]]


def test_summary_matches_numpy_over_grid() -> None:
    values = {"f1": [60.0, 70.0], "f2": [80.0, 82.0], "f3": [50.0, 40.0]}
    grid = np.array(list(values.values()))  # folds x repeats
    summary = summarise(values)
    assert summary.mean == pytest.approx(grid.mean())
    # per repeat: std over folds of [60, 80, 50] and [70, 82, 40]
    expected = (np.std([60, 80, 50]) + np.std([70, 82, 40])) / 2
    assert summary.std_over_folds == pytest.approx(expected)
    repeat_means = [np.mean([60, 80, 50]), np.mean([70, 82, 40])]
    assert summary.std_over_repeats == pytest.approx(np.std(repeat_means))
    assert summary.median_over_folds == pytest.approx((60 + 70) / 2)
    assert summary.median_over_repeats == pytest.approx(np.median(repeat_means))


def test_summary_single_run() -> None:
    summary = summarise({"only": [55.0]})
    assert (summary.mean, summary.std_over_folds, summary.std_over_repeats) == (55.0, 0.0, 0.0)
