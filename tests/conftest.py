import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from incompat.data import ImageSet

# Prefect reads its settings when first imported: one temporary home (server database, result cache) for the
# whole test session, never the project's .prefect/.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="incompat-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_DIR / "prefect")
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{_SESSION_DIR / 'mlflow-unused.db'}")
from tasks.runtime import configure  # noqa: E402

configure(_SESSION_DIR)


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


@pytest.fixture(scope="session")
def _mlflow_template():
    """One migrated MLflow database per session; each test gets a copy (migrating takes seconds, copying ms)."""
    from mlflow.tracking import MlflowClient

    path = _SESSION_DIR / "mlflow-template.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch, _mlflow_template):
    """A real, empty MLflow store for this test: `sqlite:///<tmp>/mlflow.db`, artifacts under <tmp>."""
    db = tmp_path / "mlflow.db"
    shutil.copy(_mlflow_template, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri
