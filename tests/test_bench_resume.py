"""bench/bench_defense.py --resume: a stopped benchmark goes on without writing a method twice, judges a newly
added method's neutralisation against the oracle row it already holds, and adds peers for detection only."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import yaml

from incompat.data import write_dataset
from tests.conftest import make_imageset
from tests.test_cli_pipeline import TINY_PROFILE

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = "paper-s100-id15-3to7-pattern-0.1"


def _bench(tmp_path, methods, *extra):
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_defense.py"), "--dataset", "cifar10",
         "--scenarios", "paper:100:15", "--methods", methods, "--params", str(tmp_path / "params.yaml"),
         "--cache", str(tmp_path / "cache"), "--csv", str(tmp_path / "out.csv"), "--threads", "1", *extra],
        capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout


def _rows(tmp_path):
    with open(tmp_path / "out.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _setup(tmp_path):
    (tmp_path / "cache").mkdir()
    write_dataset(make_imageset(n_per_class=20, n_classes=10, size=32, prefix="train"),
                  tmp_path / "cache" / "cifar10-train.parquet")
    write_dataset(make_imageset(n_per_class=4, n_classes=10, size=32, seed=1, prefix="test"),
                  tmp_path / "cache" / "cifar10-test.parquet")
    params = {"train": {"model": "small_cnn", "width": 8, "epochs": 1, "batch_size": 64, "threads": 1},
              "defense": {"profile": "tiny"}, "defense_profiles": {"tiny": TINY_PROFILE}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))


def test_resume_adds_only_the_missing_methods(tmp_path):
    _setup(tmp_path)
    _bench(tmp_path, "none,oracle")  # the run that "stopped" after two methods
    first = _rows(tmp_path)
    assert [r["method"] for r in first] == ["none", "oracle"]
    assert all(r["scenario"] == SCENARIO for r in first)

    out = _bench(tmp_path, "none,oracle,spectral", "--resume")
    rows = _rows(tmp_path)
    assert [r["method"] for r in rows] == ["none", "oracle", "spectral"]
    assert rows[:2] == first  # the recorded rows are left as they were
    assert f"{SCENARIO} none: already in" in out
    # the oracle was not retrained, yet its TMR from the CSV still gives spectral's verdict
    assert rows[2]["tmr_after"] != "" and rows[2]["neutralised"] in ("0", "1")

    out = _bench(tmp_path, "none,oracle,spectral", "--resume")
    assert f"# {SCENARIO}: every method already in" in out
    assert _rows(tmp_path) == rows

    # a peer added for detection only: its removal is measured, its kept set is not retrained
    out = _bench(tmp_path, "none,oracle,spectral,spectre", "--resume", "--peers-detect-only")
    added = _rows(tmp_path)
    assert added[:3] == rows and added[3]["method"] == "spectre"
    assert added[3]["recall_pct"] != "" and added[3]["clean_removed"] != ""
    assert added[3]["tmr_after"] == added[3]["acc_after"] == added[3]["retrain_seconds"] == ""
    assert added[3]["tmr_before"] != ""  # the none model is trained again: the peers read its features
    assert f"{SCENARIO} none: already in" in out and "(this run: TMR" in out


def test_resume_reads_back_the_undefended_model_it_kept(tmp_path):
    # The peers of a resumed run read the model the table's `none` row measured, not a second training of it.
    _setup(tmp_path)
    ck = str(tmp_path / "ck")
    _bench(tmp_path, "none,oracle", "--checkpoints", ck)
    kept = list((tmp_path / "ck").rglob("none-*.pt"))
    assert len(kept) == 1
    none = _rows(tmp_path)[0]

    out = _bench(tmp_path, "none,oracle,spectral", "--resume", "--peers-detect-only", "--checkpoints", ck)
    assert "none: model read back from" in out
    rows = _rows(tmp_path)
    assert [r["method"] for r in rows] == ["none", "oracle", "spectral"]
    # evaluated again, the read-back model gives exactly the recorded figures
    assert rows[2]["tmr_before"] == none["tmr_after"] and rows[2]["acc_before"] == none["acc_after"]
    assert f"(this run: TMR {float(none['tmr_after']):.2f}%, accuracy {float(none['acc_after']):.2f}%)" in out

    # settings other than the kept model's: trained again, not read back
    recorded = _rows(tmp_path)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["train"]["epochs"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = _bench(tmp_path, "none,oracle,spectral,ac", "--resume", "--peers-detect-only", "--checkpoints", ck)
    assert "model read back" not in out and len(list((tmp_path / "ck").rglob("none-*.pt"))) == 2
    assert _rows(tmp_path)[:3] == recorded
