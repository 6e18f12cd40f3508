"""The sanitization report: sections, embedded images, tile order, escaping, optional inputs, errors."""

import base64
import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from incompat.data import write_dataset
from incompat.report import SECTION_IDS, ReportError, ReportSources, write_report
from tests.conftest import make_imageset

HOSTILE = "<script>alert(1)</script>/.."
POISON_ROWS = [41, 44, 47, 50]  # in class 2, relabelled nothing: the trigger is a bright corner pixel
REMOVED_CLEAN_ROWS = [25, 27, 45, 52, 58]  # classes 1 (the hostile name) and 2; class 0 keeps everything


def make_run(root: Path, *, optional: bool = True) -> ReportSources:
    """A tiny sanitized run laid out as the pipeline does: 60 images 8x8, 3 classes, 4 poisons, 10 removed."""
    dataset = make_imageset(n_per_class=20, n_classes=3, size=8, seed=1)
    dataset.class_names[1] = HOSTILE
    dataset.images[POISON_ROWS, 0, 0, :] = (255, 0, 255)
    dataset.extra_metadata["scenario"] = "test-scenario"
    n = len(dataset)
    (root / "poisoned").mkdir(parents=True)
    (root / "clean").mkdir()
    (root / "reports").mkdir()
    source_digest = write_dataset(dataset, root / "poisoned" / "train.parquet")

    rng = np.random.default_rng(0)
    poison = np.zeros(n, dtype=bool)
    poison[POISON_ROWS] = True
    kept = np.ones(n, dtype=bool)
    kept[POISON_ROWS + REMOVED_CLEAN_ROWS] = False
    suspicion = np.where(kept, rng.uniform(0.0, 0.45, n), rng.uniform(0.55, 0.9, n))
    suspicion[POISON_ROWS[:3]] = [0.99, 0.97, 0.95]  # the fourth poison ranks among the removed clean ones
    order = rng.permutation(n)  # scores are not in dataset order
    pq.write_table(pa.table({
        "sample_id": pa.array([str(s) for s in dataset.sample_ids[order]]),
        "label": pa.array(dataset.labels[order]),
        "kept": pa.array(kept[order]),
        "suspicion": pa.array(suspicion[order]),
        "vote_agreement": pa.array(rng.uniform(0, 1, n)[order]),
        "refinement_correct": pa.array(rng.uniform(0, 1, n)[order]),
    }), root / "clean" / "scores.parquet")
    if not optional:
        return ReportSources.discover(root)

    pq.write_table(pa.table({"sample_id": pa.array([str(s) for s in dataset.sample_ids]),
                             "is_poison": pa.array(poison)}), root / "poisoned" / "truth.parquet")
    removed_per_class = {name: int(((~kept) & (dataset.labels == c)).sum())
                         for c, name in enumerate(dataset.class_names)}
    (root / "clean" / "metrics.json").write_text(json.dumps({
        "n_samples": n, "n_kept": int(kept.sum()), "n_removed": int((~kept).sum()),
        "removed_per_class": removed_per_class, "epoch_equivalents": 12.5, "wall_seconds": 3.25,
        "clean_digest": "c" * 64, "removed_digest": "r" * 64, "source_digest": source_digest, "profile": "cpu",
        "poison_total": 4, "poison_removed": 4, "clean_removed": 5, "clean_total": 56, "recall": 1.0,
        "precision": 4 / 9}))
    events = []
    for learner in range(2):
        for it in range(3):
            events.append({"kind": "round", "learner": f"bag0-learner{learner}", "round": it,
                           "kept_fraction": 0.3 + 0.1 * it, "kept": 18 + it, "poison_kept": 3 - it})
        events.append({"kind": "learner", "bag": 0, "index": learner, "core_size": 20, "agreement": 0.5,
                       "poison_kept": 1})
    events.append({"kind": "vote", "kept_fraction": 0.8, "poison_kept": 1})
    events += [{"kind": "refinement", "round": r, "kept_fraction": 0.83, "kept": 50, "poison_kept": 0}
               for r in range(2)]
    (root / "clean" / "rounds.json").write_text(json.dumps(events))
    (root / "reports" / "evaluation.json").write_text(json.dumps({
        "scenario": "test-scenario", "clean_accuracy_before": 0.9, "clean_accuracy_after": 0.88,
        "attack_success_rate_before": 0.95, "attack_success_rate_after": 0.05,
        "targeted_misclassification_before": 0.5, "targeted_misclassification_after": 0.02,
        "train_size_before": n, "train_size_after": int(kept.sum())}))
    (root / "lineage.json").write_text(json.dumps({
        "code_version": "abc123", "mlflow_run_id": "run-1", "prefect_flow_run_id": "flow-1",
        "digests": {"source": source_digest, "clean": "c" * 64}, "note": HOSTILE}))
    (root / "params.yaml").write_text("defense:\n  profile: cpu\n  boost: 4\ntrain:\n  epochs: 15\n")
    with open(root / "reports" / "baselines.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["method", "poison_total", "poison_removed", "clean_removed", "asr_before", "asr_after",
                         "acc_before", "acc_after"])
        writer.writerow(["spectral signatures", 4, 1, 5, 0.95, 0.9, 0.9, 0.89])
        writer.writerow([HOSTILE, 4, 0, 2, 0.95, 0.95, 0.9, 0.9])
    return ReportSources.discover(root)


def _sections(text: str) -> list[str]:
    return re.findall(r'<section id="([^"]+)"', text)


def _data_images(text: str) -> list[Image.Image]:
    images = []
    for payload in re.findall(r'src="data:image/png;base64,([^"]+)"', text):
        img = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
        img.load()
        images.append(img)
    return images


def _tile_blocks(text: str) -> list[tuple[str, list[tuple[str, float, int]]]]:
    """[(class name as escaped in the page, [(sample id, suspicion, poison flag), ...]), ...] in page order."""
    blocks = []
    for name, body in re.findall(r'<div class="class-block" data-class="([^"]*)">(.*?)</div></div>', text):
        tiles = re.findall(r'data-sample-id="([^"]+)" data-suspicion="([^"]+)" data-poison="(\d)"', body)
        blocks.append((name, [(sid, float(s), int(p)) for sid, s, p in tiles]))
    return blocks


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One report of the full synthetic run, shared by the tests that only read it (a report takes ~0.5 s)."""
    root = tmp_path_factory.mktemp("report")
    sources = make_run(root / "run")
    paths = write_report(sources, root / "out", top_k=5)
    return sources, paths, paths["html"].read_text(encoding="utf-8")


def test_discover_finds_the_pipeline_layout(tmp_path):
    sources = make_run(tmp_path / "run")
    run = tmp_path / "run"
    assert sources.dataset == run / "poisoned" / "train.parquet"
    assert sources.scores == run / "clean" / "scores.parquet"
    assert sources.metrics == run / "clean" / "metrics.json"
    assert sources.rounds == run / "clean" / "rounds.json"
    assert sources.truth == run / "poisoned" / "truth.parquet"
    assert sources.evaluation == run / "reports" / "evaluation.json"
    assert sources.lineage == run / "lineage.json"
    assert sources.params == run / "params.yaml"
    assert sources.baselines == run / "reports" / "baselines.csv"


def test_every_section_is_present_once_in_order(full_run):
    _, paths, text = full_run
    assert _sections(text) == list(SECTION_IDS)
    assert paths["html"].name == "report.html"
    assert sorted(p.name for p in paths["figures"]) == ["score-distribution.png", "suspicious.png", "trajectory.png"]
    for figure in paths["figures"]:
        assert figure.parent == paths["html"].parent / "figures"
        assert Image.open(figure).format == "PNG"
    assert not [p for p in paths["html"].parent.rglob(".*tmp-*")]  # atomic writes left nothing behind


def test_embedded_images_decode_and_nothing_else_is_loaded(full_run):
    _, paths, text = full_run
    images = _data_images(text)
    n_tiles = sum(len(tiles) for _, tiles in _tile_blocks(text))
    assert n_tiles > 0 and len(images) == n_tiles + 2  # tiles + trajectory + score distribution
    tile_sizes = {img.size for img in images[:n_tiles]}
    assert tile_sizes == {(128, 128)}  # 8x8 enlarged 16x, nearest neighbour
    # Self-contained: every src is a data URI, every link an in-page anchor, no script, a strict CSP.
    assert re.findall(r'src="(?!data:image/png;base64,)', text) == []
    assert all(href.startswith("#") for href in re.findall(r'href="([^"]*)"', text))
    assert "<script" not in text.lower()
    assert "default-src 'none'" in text
    # The enlargement is nearest-neighbour: the poison's magenta corner pixel is a solid 16x16 block.
    poison_tile = next(img for img in images[:n_tiles] if img.getpixel((0, 0))[:3] == (255, 0, 255))
    block = np.asarray(poison_tile.convert("RGB"))[:16, :16]
    assert (block == (255, 0, 255)).all()


def test_tiles_ordered_by_suspicion_classes_by_removals(full_run):
    _, _, text = full_run
    blocks = _tile_blocks(text)
    # Class 2: 4 poisons + 3 clean removed; class 1: 2 removed; class 0: none (not shown).
    assert [name for name, _ in blocks] == ["class2", "&lt;script&gt;alert(1)&lt;/script&gt;/.."]
    for _, tiles in blocks:
        scores = [s for _, s, _ in tiles]
        assert scores == sorted(scores, reverse=True)
        assert len(tiles) == 5  # top_k
    class2 = blocks[0][1]
    assert [sid for sid, _, _ in class2[:3]] == ["s-0041", "s-0044", "s-0047"]
    assert {sid for sid, _, p in class2 if p} == {"s-0041", "s-0044", "s-0047", "s-0050"} & {s for s, _, _ in class2}
    assert all(p == 0 for _, _, p in blocks[1][1])


def test_equal_scores_are_flagged_and_not_ordered_by_sample_id(tmp_path):
    """Sample ids follow ingest order, which can correlate with the ground truth: ties must not be broken by id."""
    sources = make_run(tmp_path / "run", optional=False)
    table = pq.read_table(sources.scores)
    labels = table.column("label").to_numpy()
    suspicion = np.where(labels == 2, 0.9, table.column("suspicion").to_numpy())  # all of class 2 tie
    kept = np.where(labels == 2, False, table.column("kept").to_numpy())
    table = table.set_column(table.column_names.index("suspicion"), "suspicion", pa.array(suspicion))
    table = table.set_column(table.column_names.index("kept"), "kept", pa.array(kept))
    pq.write_table(table, sources.scores)
    text = write_report(sources, tmp_path / "out", top_k=8)["html"].read_text(encoding="utf-8")
    name, tiles = _tile_blocks(text)[0]
    assert name == "class2"
    ids = [sid for sid, _, _ in tiles]
    assert len(ids) == 8 and ids != sorted(ids)
    assert "20 samples of this class score 0.9: which of them are shown is arbitrary" in text
    again = write_report(sources, tmp_path / "out2", top_k=8)["html"].read_text(encoding="utf-8")
    assert [sid for sid, _, _ in _tile_blocks(again)[0][1]] == ids  # arbitrary but stable


def test_counts_detection_and_evaluation_figures(full_run):
    _, _, text = full_run
    detection = re.search(r'<section id="detection">(.*?)</section>', text).group(1)
    assert re.search(r"<th>poison</th><td[^>]*>4</td><td[^>]*>0</td><td>4</td>", detection)
    assert re.search(r"<th>clean</th><td[^>]*>5</td><td[^>]*>51</td><td>56</td>", detection)
    assert "100.0%" in detection and "44.44%" in detection
    evaluation = re.search(r'<section id="evaluation">(.*?)</section>', text).group(1)
    assert "95.0%" in evaluation and "5.0%" in evaluation and "-90.0 pts" in evaluation
    summary = re.search(r'<section id="summary">(.*?)</section>', text).group(1)
    assert "12.5 epoch-equivalents" in summary and "3.2 s" in summary
    baselines = re.search(r'<section id="baselines">(.*?)</section>', text).group(1)
    assert "this run" in baselines and "spectral signatures" in baselines


def test_hostile_strings_are_escaped(full_run):
    _, _, text = full_run
    assert HOSTILE not in text
    assert "alert(1)" in text  # it is shown...
    assert "&lt;script&gt;alert(1)&lt;/script&gt;/.." in text  # ...as text
    assert "<script" not in text.lower()


def test_missing_optional_files_leave_their_sections_out(tmp_path):
    full = make_run(tmp_path / "run")
    out = tmp_path / "out"
    write_report(full, out)
    assert (out / "figures" / "trajectory.png").exists()
    minimal = ReportSources(dataset=full.dataset, scores=full.scores)
    paths = write_report(minimal, out, title=HOSTILE)  # rewrites the same directory
    text = paths["html"].read_text(encoding="utf-8")
    assert _sections(text) == ["summary", "notes", "per-class", "suspicious", "score-distribution"]
    assert not (out / "figures" / "trajectory.png").exists()  # no stale figure from the earlier report
    assert sorted(p.name for p in paths["figures"]) == ["score-distribution.png", "suspicious.png"]
    assert 'data-poison="1"' not in text
    assert f"<title>{HOSTILE}" not in text and "<title>&lt;script&gt;" in text
    for img in _data_images(text):
        assert img.size[0] > 0


def test_rounds_without_poison_counts_and_discover_without_extras(tmp_path):
    sources = make_run(tmp_path / "run", optional=False)
    assert (sources.metrics, sources.truth, sources.rounds, sources.lineage) == (None, None, None, None)
    rounds = tmp_path / "rounds.json"
    rounds.write_text(json.dumps([{"kind": "round", "learner": "a$b$", "round": 0, "kept_fraction": 0.5},
                                  {"kind": "vote", "kept_fraction": 0.7}]))
    sources.rounds = rounds
    text = write_report(sources, tmp_path / "out")["html"].read_text(encoding="utf-8")
    assert "trajectory" in _sections(text)
    assert "detection" not in _sections(text)


def test_missing_scores_is_an_error_naming_the_file(tmp_path):
    sources = make_run(tmp_path / "run")
    sources.scores.unlink()
    with pytest.raises(ReportError, match=r"run: no scores\.parquet"):
        ReportSources.discover(tmp_path / "run")
    with pytest.raises(ReportError, match=r"scores\.parquet: no such file"):
        write_report(sources, tmp_path / "out")
    assert not (tmp_path / "out" / "report.html").exists()


def test_missing_dataset_and_foreign_scores_are_errors(tmp_path):
    sources = make_run(tmp_path / "run", optional=False)
    pq.write_table(pa.table({"sample_id": ["s-0000", "nope"], "kept": [True, False], "suspicion": [0.1, 0.9]}),
                   tmp_path / "foreign.parquet")
    with pytest.raises(ReportError, match=r"foreign\.parquet row 1: sample 'nope' is not in the dataset"):
        write_report(ReportSources(dataset=sources.dataset, scores=tmp_path / "foreign.parquet"), tmp_path / "o")
    sources.dataset.unlink()
    with pytest.raises(ReportError, match=r"run: no dataset file"):
        ReportSources.discover(tmp_path / "run")
    with pytest.raises(ReportError, match=r"train\.parquet: no such file"):
        write_report(sources, tmp_path / "out")
    with pytest.raises(ReportError, match="no such run directory"):
        ReportSources.discover(tmp_path / "absent")
