from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from ser.plots import plot_confusion, row_percentages


def test_row_percentages_normalise_each_reference_class() -> None:
    got = row_percentages([[1, 3, 0], [0, 0, 0], [2, 2, 4]])
    np.testing.assert_allclose(got, [[25, 75, 0], [0, 0, 0], [25, 25, 50]])


def test_plot_confusion_writes_a_png_atomically(tmp_path: Path) -> None:
    path = plot_confusion([[5, 1], [2, 0]], ["anger", "sad"], tmp_path / "figs" / "cm.png")
    assert path == tmp_path / "figs" / "cm.png"
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert [p.name for p in path.parent.iterdir()] == ["cm.png"]  # no temporary file left


def test_plot_confusion_refuses_a_matrix_that_does_not_fit_the_classes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"shape \(2, 3\), expected \(2, 2\)"):
        plot_confusion([[1, 2, 3], [4, 5, 6]], ["a", "b"], tmp_path / "cm.png")
    assert not (tmp_path / "cm.png").exists()
