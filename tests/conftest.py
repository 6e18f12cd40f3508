import numpy as np
import pytest

from incompat.data import ImageSet


def make_imageset(n_per_class=20, n_classes=3, size=8, seed=0, prefix="s"):
    """Tiny learnable images: each class brightens its own horizontal band, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), n_per_class)
    images = rng.integers(0, 80, size=(len(labels), size, size, 3), dtype=np.uint8)
    band = max(1, size // n_classes)
    for c in range(n_classes):
        images[labels == c, c * band:(c + 1) * band, :, :] += 150
    ids = [f"{prefix}-{i:04d}" for i in range(len(labels))]
    return ImageSet(images, labels, ids, [f"class{c}" for c in range(n_classes)])


@pytest.fixture
def tiny_set():
    return make_imageset()
