"""render_policy_grid writes a PNG of originals and augmented samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfaugment.trainer.policy.render import CELL_GAP, cell_scale, render_policy_grid


def test_grid_png_has_expected_size_and_changed_columns(tmp_path: Path) -> None:
    images = (torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 255).to(
        torch.uint8
    )
    path = render_policy_grid("Invert", images, tmp_path / "grid.png", samples_per_image=4)
    scale = cell_scale(16, 16)
    assert scale == 4  # small images are upscaled to cells of at least 64 px
    cell = 16 * scale
    grid = np.asarray(Image.open(path))
    assert grid.shape == (3 * cell + 2 * CELL_GAP, 5 * cell + 4 * CELL_GAP, 3)
    for row in range(3):
        top = row * (cell + CELL_GAP)
        original = grid[top : top + cell, 0:cell]
        expected = np.repeat(np.repeat(images[row].permute(1, 2, 0).numpy(), 4, 0), 4, 1)
        assert np.array_equal(original, expected)
        for column in range(1, 5):
            left = column * (cell + CELL_GAP)
            sample = grid[top : top + cell, left : left + cell].astype(int)
            assert np.array_equal(sample, 255 - expected.astype(int))  # Invert, p = 1


def test_grid_of_grayscale_images_and_bad_input(tmp_path: Path) -> None:
    images = torch.full((2, 1, 70, 80), 40, dtype=torch.uint8)
    path = render_policy_grid(
        "randaugment:2:30", images, tmp_path / "gray.png", samples_per_image=2
    )
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 70 + CELL_GAP, 3 * 80 + 2 * CELL_GAP, 3)  # no upscaling needed
    with pytest.raises(TypeError, match="expected uint8"):
        render_policy_grid("none", images.float(), tmp_path / "x.png")
