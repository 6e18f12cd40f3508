"""`incompat ingest`, `sanitize` and `pipeline` end to end on tiny synthetic data with a tiny profile."""

import json
import re

import pytest
import yaml

from flows.cli import main
from incompat.data import read_dataset, write_dataset
from tests.conftest import make_imageset

TINY_PROFILE = {
    "bags": 1, "boost": 2, "warmup_epochs": 2, "refit_epochs": 1, "refit_rounds": 2, "core_epochs": 4,
    "class_floor": 1.0, "refinement_rounds": 1, "refinement_epochs": 2,
    "learner_train": {"model": "small_cnn", "width": 8, "batch_size": 32, "lr": 0.1, "augment": False},
    # Learners this small do not learn the tiny images and remove whole classes, which the filter step refuses by
    # default: the tests that use this profile check the plumbing, not the defense (tests/test_class_loss.py does).
    "allow_class_loss": True,
}


@pytest.fixture
def project(tmp_path):
    write_dataset(make_imageset(n_per_class=30, n_classes=10, size=32, prefix="train"), tmp_path / "train.parquet")
    write_dataset(make_imageset(n_per_class=5, n_classes=10, size=32, seed=1, prefix="test"),
                  tmp_path / "test.parquet")
    params = {
        "ingest": {"source": str(tmp_path / "train.parquet"), "test_source": str(tmp_path / "test.parquet"),
                   "subset": 200, "seed": 0},
        "poison": {"scenario": "paper:100:15"},
        "train": {"model": "small_cnn", "width": 8, "epochs": 1, "batch_size": 64, "lr": 0.05},
        "defense": {"profile": "tiny"},
        "defense_profiles": {"tiny": TINY_PROFILE},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def test_ingest_cli_subset_and_json(project, capsys):
    out = project / "raw.parquet"
    assert main(["ingest", str(project / "train.parquet"), "--out", str(out), "--subset", "100", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_samples"] == 100
    ds = read_dataset(out, verify=True)
    assert list(ds.class_counts()) == [10] * 10


def test_ingest_cli_bad_source_exits_1_with_the_file_named(project, capsys):
    bad = project / "bad.parquet"
    bad.write_bytes(b"\x00" * 10)
    assert main(["ingest", str(bad), "--out", str(project / "x.parquet")]) == 1
    err = capsys.readouterr().err
    assert "bad.parquet" in err and "Traceback" not in err
    assert not (project / "x.parquet").exists()


def test_sanitize_cli_writes_outputs(project, capsys, mlflow_store):
    assert main(["poison", str(project / "train.parquet"), "--scenario", "paper:100:15",
                 "--out", str(project / "p")]) == 0
    capsys.readouterr()
    rc = main(["sanitize", str(project / "p" / "train.parquet"), "--out", str(project / "run"),
               "--truth", str(project / "p" / "truth.parquet"), "--params", str(project / "params.yaml"),
               "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["poison_total"] == 3 and result["n_samples"] == 300
    for name in ("clean.parquet", "removed.parquet", "scores.parquet", "metrics.json", "rounds.json",
                 "lineage.json", "report.html"):
        assert (project / "run" / name).exists()
    assert result["profile"] == "tiny"
    # --truth reaches the report: true poisons are counted and framed in the suspicious grid
    assert "shown are truly poison" in (project / "run" / "report.html").read_text()
    # `incompat report` on the run folder (no truth.parquet in it) shows no ground truth unless given --truth
    assert main(["report", str(project / "run"), "--out", str(project / "plain")]) == 0
    assert "shown are truly poison" not in (project / "plain" / "report.html").read_text()
    capsys.readouterr()
    assert main(["report", str(project / "run"), "--out", str(project / "framed"),
                 "--truth", str(project / "p" / "truth.parquet"), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["suspicious"]
    html = (project / "framed" / "report.html").read_text()
    assert "shown are truly poison" in html
    # the JSON counts are the page's: one framed tile per poison shown
    assert sum(c["poison_shown"] for c in shown.values()) == html.count('data-poison="1"') > 0


def test_pipeline_runs_end_to_end(project, capsys, monkeypatch, mlflow_store):
    monkeypatch.chdir(project)
    # Mirror pairs named by class for the final training: the retrain step must turn them into labels (fit
    # refuses names). The defense's side is tested in test_ispl (its tiny learners train without augmentation).
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["flip_pairs"] = [["class0", "class1"]]
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    rc = main(["pipeline", "--params", "params.yaml", "--data-dir", "data"])
    assert rc == 0
    out = capsys.readouterr().out
    # the end of a run says where everything is
    for what in ("cleaned dataset: data/clean/clean.parquet", "report:", "MLflow run:", "Prefect run:"):
        assert what in out
    # attack success and the paper's targeted misclassification, before and after, side by side
    assert re.search(r"attack success [0-9.]+ -> [0-9.]+; targeted misclassification [0-9.]+ -> [0-9.]+", out)
    evaluation = json.loads((project / "data" / "reports" / "evaluation.json").read_text())
    assert 0 <= evaluation["attack_success_rate_after"] <= 1
    assert evaluation["train_size_before"] == 200
    assert (project / "data" / "clean" / "clean.parquet").exists()
    assert (project / "data" / "models" / "after.pt").exists()
    assert (project / "data" / "reports" / "report.html").exists()
