"""The filter step refuses a keep-mask that removes a whole class, or more than `max_class_removed` of a class,
before it writes anything; with `allow_class_loss` it writes, and metrics.json and the report say so. Tiny
synthetic folders with hand-made scores: no training."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from incompat import lineage
from incompat.config import Params
from incompat.data import write_dataset
from incompat.files import atomic_output
from incompat.ispl import DefenseConfig
from incompat.sanitize import ClassLossError
from incompat.steps import Layout, run_filter
from tests.conftest import make_imageset


def write_scores(layout: Layout, dataset, keep_mask: np.ndarray) -> None:
    """scores.parquet and cluster.json as the cluster step writes them, for a keep-mask chosen by the test."""
    n = len(dataset)
    table = pa.table({"sample_id": pa.array(dataset.sample_ids.astype(str).tolist()),
                      "label": pa.array(dataset.labels), "kept": pa.array(keep_mask),
                      "suspicion": pa.array((~keep_mask).astype(np.float64) + np.linspace(0, 0.5, n)),
                      "vote_agreement": pa.array(np.ones(n)), "refinement_correct": pa.array(np.ones(n))})
    with atomic_output(layout.scores) as tmp:  # as every writer does: a new file renamed into place
        pq.write_table(table, tmp)
    lineage.write_manifest(
        layout.cluster_manifest, "cluster",
        inputs=[lineage.reference("dataset", layout.raw_train, layout.cluster, dataset.dataset_digest(), "dataset")],
        outputs=[lineage.reference("scores", layout.scores, layout.cluster)],
        summary={"epoch_equivalents": 1.5, "wall_seconds": 2.0, "n_learners": 1})


def folder(root, n_per_class=(10, 10, 10)):
    layout = Layout(root, flat=True)
    root.mkdir(parents=True, exist_ok=True)
    full = make_imageset(n_per_class=max(n_per_class), n_classes=len(n_per_class), size=8)
    dataset = full.subset(np.concatenate([np.flatnonzero(full.labels == c)[:n] for c, n in enumerate(n_per_class)]))
    write_dataset(dataset, layout.raw_train)
    return layout, dataset


def params(**defense) -> Params:
    return Params(defense=DefenseConfig.from_dict(defense), profile="test")


def test_a_keep_mask_that_drops_a_class_is_refused_naming_it_and_writes_nothing(tmp_path):
    layout, dataset = folder(tmp_path / "run")
    keep = dataset.labels != 1  # class1 removed whole
    write_scores(layout, dataset, keep)
    with pytest.raises(ClassLossError) as refused:
        run_filter(layout, params())
    message = str(refused.value)
    assert "'class1' 10/10 (100%, the whole class)" in message and "allow_class_loss" in message
    assert "\n" not in message
    for path in layout.filter_files():
        assert not path.exists(), path


def test_a_refused_keep_mask_leaves_an_existing_clean_set_as_it_was(tmp_path):
    layout, dataset = folder(tmp_path / "run")
    keep = np.ones(len(dataset), dtype=bool)
    keep[::7] = False  # a few samples of every class: a legitimate run
    write_scores(layout, dataset, keep)
    run_filter(layout, params())
    before = {p: p.read_bytes() for p in layout.filter_files()}
    assert lineage.verify(layout.lineage).ok

    keep = dataset.labels == 0  # classes 1 and 2 removed whole
    write_scores(layout, dataset, keep)
    with pytest.raises(ClassLossError, match="removes 2 class"):
        run_filter(layout, params())
    assert {p: p.read_bytes() for p in layout.filter_files()} == before


def test_more_than_max_class_removed_of_an_imbalanced_class_is_refused(tmp_path):
    layout, dataset = folder(tmp_path / "run", n_per_class=(40, 40, 12))
    keep = np.ones(len(dataset), dtype=bool)
    keep[np.flatnonzero(dataset.labels == 2)[:7]] = False  # 7 of 12 = 58% of the small class: 7.6% of all samples
    write_scores(layout, dataset, keep)
    with pytest.raises(ClassLossError, match=r"'class2' 7/12 \(58%\)"):
        run_filter(layout, params())
    out = run_filter(layout, params(max_class_removed=0.6))  # the limit is a parameter
    assert out["n_classes_over_limit"] == 0 and out["class_loss_overridden"] == 0


def test_a_legitimate_run_passes_the_guard_with_its_numbers_in_the_metrics(tmp_path):
    """The paper's rate: 20% of one class poisoned; a defense removing all of them and a few clean images."""
    layout, dataset = folder(tmp_path / "run", n_per_class=(50, 50, 50))
    keep = np.ones(len(dataset), dtype=bool)
    keep[np.flatnonzero(dataset.labels == 1)[:12]] = False  # 24% of the target class
    keep[np.flatnonzero(dataset.labels == 0)[:2]] = False
    write_scores(layout, dataset, keep)
    run_filter(layout, params())
    metrics = json.loads(layout.metrics.read_text())
    assert metrics["max_class_removed_fraction"] == pytest.approx(0.24)
    assert (metrics["n_classes_emptied"], metrics["n_classes_over_limit"], metrics["class_loss_overridden"]) == \
        (0, 0, 0)


def test_allow_class_loss_writes_the_set_and_metrics_and_report_say_it_was_overridden(tmp_path):
    from incompat.steps import run_report

    layout, dataset = folder(tmp_path / "run")
    keep = dataset.labels != 2
    write_scores(layout, dataset, keep)
    out = run_filter(layout, params(allow_class_loss=True))
    assert out["n_kept"] == 20
    metrics = json.loads(layout.metrics.read_text())
    assert metrics["class_loss_overridden"] == 1 and metrics["n_classes_emptied"] == 1
    assert metrics["max_class_removed_fraction"] == 1.0
    assert lineage.verify(layout.lineage).ok
    html = layout.report_html
    run_report(layout)
    text = html.read_text()
    assert "class-loss guard was overridden" in text and "class2 100%" in text


def test_the_guard_settings_are_checked_when_the_config_is_read():
    with pytest.raises(ValueError, match="max_class_removed"):
        DefenseConfig.from_dict({"max_class_removed": 0})
    with pytest.raises(ValueError, match="max_class_removed"):
        DefenseConfig.from_dict({"max_class_removed": 1.5})
