"""The trial reconstruction's pure parts: where the test crop is taken, and how its result is said."""

from __future__ import annotations

import numpy as np
import pytest

from engine.advisor.trial import ANIME_MODEL, PHOTO_MODEL, SEARCH_SIDE, TRIAL_CROP, TrialResult, pick_crop


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


def test_the_gap_is_the_official_pair_s_even_when_a_users_model_leads_a_side():
    assert TrialResult(photo_psnr=27.4, anime_psnr=25.6, crop=(0, 0, 128, 128), seconds=0.4).gap_db == \
        pytest.approx(-1.8)
    scores = {PHOTO_MODEL: 24.0, ANIME_MODEL: 25.5, "4x-mine": 27.0}
    sides = {PHOTO_MODEL: "photo", ANIME_MODEL: "anime", "4x-mine": "photo"}
    result = TrialResult(27.0, 25.5, (0, 0, 64, 64), 0.1, scores=scores, sides=sides)
    assert result.gap_db == pytest.approx(1.5) and result.best("photo") == "4x-mine"


def test_a_large_image_s_crop_lands_on_its_detail_and_inside_it():
    """The window is searched on a copy at most SEARCH_SIDE long; the crop is the full-size one, in the image."""
    image = np.full((2000, 3000, 3), 128, np.uint8)
    image[1500:1700, 2700:2900] = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    x, y, w, h = pick_crop(image)
    assert (w, h) == (TRIAL_CROP, TRIAL_CROP) and x + w <= 3000 and y + h <= 2000
    assert 2700 - w < x < 2900 and 1500 - h < y < 1700  # overlaps the detailed patch
    assert max(image.shape[:2]) > SEARCH_SIDE
    x, y, w, h = pick_crop(image[:, -130:])  # the edge: the window never leaves the image
    assert x + w <= 130 and y + h <= 2000
