"""The trial reconstruction's pure parts: where the test crop is taken, and how its result is said."""

from __future__ import annotations

import numpy as np
import pytest

from engine.advisor.trial import TRIAL_CROP, TrialResult, pick_crop


def test_the_crop_is_the_most_detailed_window():
    rng = np.random.default_rng(0)
    image = np.full((400, 600, 3), 128, np.uint8)
    image[200:360, 400:560] = rng.integers(0, 255, (160, 160, 3), dtype=np.uint8)  # the only texture
    x, y, w, h = pick_crop(image)
    assert (w, h) == (TRIAL_CROP, TRIAL_CROP) and w % 4 == 0
    assert 400 <= x and x + w <= 560 and 200 <= y and y + h <= 360  # all inside the textured square


def test_small_images_get_a_smaller_crop_and_tiny_ones_are_refused():
    assert pick_crop(np.zeros((70, 90, 3), np.uint8))[2:] == (68, 68)
    with pytest.raises(ValueError):
        pick_crop(np.zeros((12, 40, 3), np.uint8))


def test_the_result_names_the_winner_and_the_margin():
    result = TrialResult(photo_psnr=27.4, anime_psnr=25.6, crop=(0, 0, 128, 128), seconds=0.4)
    assert result.winner == "photo" and result.photo_advantage_db == pytest.approx(1.8)
    assert result.sentence() == "on a test crop the photo model was 1.8 dB closer"
    assert TrialResult(20.0, 21.5, (0, 0, 64, 64), 0.1).winner == "anime"
