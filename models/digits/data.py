"""The digits data: splits, the deterministic "shifted" transform, and the stream file.

scikit-learn ships the 1,797 8x8 digits inside the package, so nothing is downloaded. The
"shifted" split stands for a camera in the field: each image is rotated, scaled, translated,
partly occluded and noised, with a seeded generator so every build gives the same split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

# Seeds: one per use, so the test split's shift never leaks into training or validation.
SPLIT_SEED = 20261124
TEST_SHIFT_SEED = 1
VAL_SHIFT_SEED = 2
TRAIN_AUG_SEED = 3
MIXED_ORDER_SEED = 4
FIDELITY_SEED = 5
PIXEL_MAX = 16.0
# Shift strengths, picked so the shift hurts a small model clearly more than a large one.
MAX_ROTATION_DEG = 15.0
SCALE_RANGE = (0.85, 1.12)
MAX_TRANSLATION_PX = 1.0
NOISE_STD = 1.2
OCCLUSION_PROB = 0.35
VAL_SHIFT_COPIES = 3
TRAIN_AUG_COPIES = 8


@dataclass(frozen=True)
class Splits:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_splits() -> Splits:
    """60/20/20 stratified split of the digits, images as float32 [N, 8, 8] in 0..16."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype(np.float32)
    y = d.target.astype(np.int64)
    x_tr, x_rest, y_tr, y_rest = train_test_split(x, y, test_size=0.4, random_state=SPLIT_SEED,
                                                  stratify=y)
    x_val, x_te, y_val, y_te = train_test_split(x_rest, y_rest, test_size=0.5,
                                                random_state=SPLIT_SEED, stratify=y_rest)
    return Splits(x_tr, y_tr, x_val, y_val, x_te, y_te)


def shift(images: np.ndarray, seed: int) -> np.ndarray:
    """Deterministically distort a batch of 8x8 images (0..16) like a camera in the field."""
    rng = np.random.default_rng(seed)
    out = np.empty_like(images, dtype=np.float32)
    centre = np.array([3.5, 3.5])
    for i, img in enumerate(images):
        angle = np.deg2rad(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
        scale = rng.uniform(*SCALE_RANGE)
        t = rng.uniform(-MAX_TRANSLATION_PX, MAX_TRANSLATION_PX, size=2)
        c, s = np.cos(angle), np.sin(angle)
        # affine_transform maps output coordinates to input coordinates: invert the motion.
        m = np.array([[c, s], [-s, c]]) / scale
        offset = centre - m @ (centre + t)
        warped = ndimage.affine_transform(img, m, offset=offset, order=1, mode="constant", cval=0.0)
        if rng.random() < OCCLUSION_PROB:
            h, w = (2, 2) if rng.random() < 0.5 else (1, 3)
            r0, c0 = rng.integers(0, 8 - h + 1), rng.integers(0, 8 - w + 1)
            warped[r0:r0 + h, c0:c0 + w] = 0.0
        warped = warped + rng.normal(0.0, NOISE_STD, size=warped.shape)
        out[i] = np.clip(warped, 0.0, PIXEL_MAX)
    return out


def training_set(s: Splits) -> tuple[np.ndarray, np.ndarray]:
    """Clean training images plus shifted copies drawn with the training seed."""
    xs = [s.x_train] + [shift(s.x_train, TRAIN_AUG_SEED * 100 + k) for k in range(TRAIN_AUG_COPIES)]
    return np.concatenate(xs), np.tile(s.y_train, TRAIN_AUG_COPIES + 1)


def validation_set(s: Splits) -> tuple[np.ndarray, np.ndarray]:
    """Validation drawn like the mixed stream: half clean, half shifted.

    The shifted half holds several distorted copies of each validation image; the clean images
    are repeated as often so both halves weigh the same, as in the mixed stream.
    """
    k = VAL_SHIFT_COPIES
    shifted = [shift(s.x_val, VAL_SHIFT_SEED * 100 + i) for i in range(k)]
    x = np.concatenate([np.tile(s.x_val, (k, 1, 1)), *shifted])
    y = np.tile(s.y_val, 2 * k)
    return x, y


def fidelity_set(s: Splits, seed: int = FIDELITY_SEED) -> tuple[np.ndarray, np.ndarray]:
    """The fidelity set a bundle carries: every validation image once clean and once shifted
    (one of its validation copies, picked at random), shuffled: drawn like the mixed stream,
    from validation data only."""
    rng = np.random.default_rng(seed)
    copies = np.stack([shift(s.x_val, VAL_SHIFT_SEED * 100 + i) for i in range(VAL_SHIFT_COPIES)])
    pick = rng.integers(0, VAL_SHIFT_COPIES, size=len(s.x_val))
    shifted = copies[pick, np.arange(len(s.x_val))]
    x = np.concatenate([s.x_val, shifted])
    y = np.concatenate([s.y_val, s.y_val])
    order = rng.permutation(len(y))
    return np.ascontiguousarray(x[order], dtype=np.float32), y[order]


def test_streams(s: Splits) -> dict[str, np.ndarray]:
    """The three demo streams (clean, shifted, mixed) as arrays for the stream file."""
    shifted = shift(s.x_test, TEST_SHIFT_SEED)
    mixed_x = np.concatenate([s.x_test, shifted])
    mixed_y = np.concatenate([s.y_test, s.y_test])
    order = np.random.default_rng(MIXED_ORDER_SEED).permutation(len(mixed_y))
    return {
        "clean_x": s.x_test, "clean_y": s.y_test,
        "shifted_x": shifted, "shifted_y": s.y_test.copy(),
        "mixed_x": mixed_x[order], "mixed_y": mixed_y[order],
    }


def write_streams(path: Path, streams: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, allow_pickle=False, **streams)
