"""A run's outputs: one writer of a folder at a time, written as one unit (a failure part-way leaves the finished set
that was there), metrics.json numbers only, curves.json one meaning per axis."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from incompat import lineage
from incompat.data import write_dataset
from incompat.files import OutputLocked, hold_folder
from incompat.steps import Layout, exclusive_run, run_filter
from tests.conftest import make_imageset
from tests.test_class_loss import folder, params, write_scores
from tests.test_cli_pipeline import TINY_PROFILE


def snapshot(layout: Layout) -> dict:
    return {p: p.read_bytes() for p in layout.output_files() if p.exists()}


def finished(tmp_path) -> tuple[Layout, object, dict]:
    """A folder holding a finished, verifying set: dataset, scores, cluster manifest, clean/removed/metrics/lineage."""
    layout, dataset = folder(tmp_path / "run", n_per_class=(12, 12, 12))
    keep = np.ones(len(dataset), dtype=bool)
    keep[::5] = False
    write_scores(layout, dataset, keep)
    run_filter(layout, params())
    assert lineage.verify(layout.lineage).ok
    return layout, dataset, snapshot(layout)


def full_disk_after_first_file(monkeypatch):
    import incompat.sanitize

    real, calls = incompat.sanitize.write_dataset, []

    def writer(*args, **kwargs):
        calls.append(args[1])
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(incompat.sanitize, "write_dataset", writer)
    return calls


# --- one unit -------------------------------------------------------------------------------------------------

def test_full_disk_mid_filter_in_a_rerun_leaves_the_old_set_intact_and_verifying(tmp_path, monkeypatch):
    """The rerun's cluster step has already replaced the scores when the filter step runs out of disk after its
    first file: the old scores come back with the old clean data, and the lineage still verifies."""
    layout, dataset, before = finished(tmp_path)
    calls = full_disk_after_first_file(monkeypatch)
    with pytest.raises(OSError) as failed, exclusive_run(layout):
        write_scores(layout, dataset, dataset.labels != 99)  # new scores: keep everything
        run_filter(layout, params())
    assert failed.value.errno == errno.ENOSPC and len(calls) == 2  # clean.parquet written, removed.parquet not
    assert snapshot(layout) == before
    assert lineage.verify(layout.lineage).ok
    assert not list(layout.root.glob(".incompat-previous*"))


def test_full_disk_mid_filter_step_alone_keeps_its_previous_files(tmp_path, monkeypatch):
    """The filter step on its own (a DVC stage): its four files are one unit too."""
    layout, dataset, before = finished(tmp_path)
    keep = np.ones(len(dataset), dtype=bool)
    keep[1::4] = False
    write_scores(layout, dataset, keep)
    before = {p: before[p] for p in layout.filter_files()}
    full_disk_after_first_file(monkeypatch)
    with pytest.raises(OSError) as failed:
        run_filter(layout, params())
    assert failed.value.errno == errno.ENOSPC
    assert {p: p.read_bytes() for p in layout.filter_files()} == before


def test_a_run_killed_part_way_is_undone_when_the_next_run_takes_the_folder(tmp_path):
    layout, dataset, before = finished(tmp_path)
    killer = (f"import os, signal\nfrom incompat.files import write_text_atomic\n"
              f"from incompat.steps import Layout, exclusive_run\n"
              f"layout = Layout({str(layout.root)!r}, flat=True)\n"
              "with exclusive_run(layout):\n"
              "    write_text_atomic(layout.scores, 'half of a new run')\n"
              "    layout.clean.unlink()\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", killer], timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert layout.scores.read_bytes() == b"half of a new run"  # what a reader of the folder sees until then
    with exclusive_run(layout):  # the lock died with the process; the old set is back before the block runs
        assert snapshot(layout) == before
    assert lineage.verify(layout.lineage).ok


def test_a_first_run_that_fails_keeps_what_it_finished_for_the_next_to_resume(tmp_path):
    layout = Layout(tmp_path / "run", flat=True)
    with pytest.raises(RuntimeError), exclusive_run(layout):
        write_dataset(make_imageset(), layout.raw_train)
        raise RuntimeError("the cluster step failed")
    assert layout.raw_train.exists()


# --- one writer -----------------------------------------------------------------------------------------------

def test_a_second_writer_fails_at_once_naming_the_holder_and_a_killed_holder_frees_the_folder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom incompat.files import hold_folder\n"
         "with hold_folder(sys.argv[1]):\n    print('held', flush=True)\n    sys.stdin.read()", str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with pytest.raises(OutputLocked) as locked, hold_folder(tmp_path):
            pass
        assert time.monotonic() - start < 5
        message = str(locked.value)
        assert f"pid {holder.pid} on " in message and "hold_folder" not in message.split("command:")[0]
        assert "started 20" in message and "command: -c " in message and "\n" not in message
    finally:
        holder.kill()
        holder.wait(timeout=30)
    with hold_folder(tmp_path):  # the kernel dropped the dead holder's lock
        pass


WAITING_RUN = """
import sys, time
from pathlib import Path
import incompat.sanitize
go, real = Path(sys.argv[1]), incompat.sanitize.cluster
def cluster_when_told(*args, **kwargs):
    while not go.exists():
        time.sleep(0.05)
    return real(*args, **kwargs)
incompat.sanitize.cluster = cluster_when_told
from flows.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_two_runs_into_one_folder_one_fails_fast_naming_the_other_which_completes(tmp_path, mlflow_store):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"defense": {"profile": "tiny"},
                                                          "defense_profiles": {"tiny": TINY_PROFILE}}))
    write_dataset(make_imageset(n_per_class=20, n_classes=10, size=32), tmp_path / "set.parquet")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / ".prefect"), "OMP_NUM_THREADS": "1"}
    args = ["sanitize", "set.parquet", "--out", "run", "--json"]
    first = subprocess.Popen([sys.executable, "-c", WAITING_RUN, str(tmp_path / "go"), *args], cwd=tmp_path,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock, deadline = tmp_path / "run" / ".incompat.lock", time.monotonic() + 300
        while f'"pid": {first.pid},' not in (lock.read_text() if lock.exists() else ""):
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first run did not take the folder within 300 s"
            time.sleep(0.1)
        second = subprocess.run([str(Path(sys.executable).with_name("incompat")), *args], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 1
        assert second.stderr.count("\n") == 1 and "another run is writing this folder" in second.stderr
        assert f"pid {first.pid} " in second.stderr and "sanitize set.parquet --out run" in second.stderr
        assert first.poll() is None  # still waiting: the second run did not wait for it
    finally:
        (tmp_path / "go").touch()
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    result = json.loads(out)
    layout = Layout(tmp_path / "run", flat=True)
    assert lineage.verify(layout.lineage).ok
    assert result["n_samples"] == 200 and result["n_kept"] + result["n_removed"] == 200
    assert json.loads(layout.metrics.read_text())["n_removed"] == result["n_removed"]
    # every file the run left is one the unit covers (or the lock, or the checkpoints)
    left = {p for p in layout.root.rglob("*") if p.is_file() and "checkpoints" not in p.relative_to(layout.root).parts}
    assert left - set(layout.output_files()) == {lock}


# --- metrics.json and curves.json -----------------------------------------------------------------------------

def test_metrics_json_holds_numbers_only_and_the_run_reports_the_same_counts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flows.cli import _counts_line
    from incompat.report import ReportSources, _load_run

    layout, dataset = folder(tmp_path / "run", n_per_class=(12, 12, 12))
    poison = np.zeros(len(dataset), dtype=bool)
    poison[:4] = True
    pq.write_table(pa.table({"sample_id": dataset.sample_ids.astype(str).tolist(), "is_poison": poison}),
                   tmp_path / "truth.parquet")
    keep = ~poison
    keep[20] = False
    write_scores(layout, dataset, keep)
    result = run_filter(layout, params(), truth=tmp_path / "truth.parquet")
    metrics = json.loads(layout.metrics.read_text())
    assert metrics and all(type(v) in (int, float) for v in metrics.values()), metrics
    assert {k: metrics[k] for k in ("n_samples", "n_kept", "n_removed", "poison_removed", "clean_removed")} == \
        {"n_samples": 36, "n_kept": 31, "n_removed": 5, "poison_removed": 4, "clean_removed": 1}
    assert _counts_line(result) == _counts_line(metrics)
    # the digests and the removals per class are in lineage.json, where the report finds them
    record = json.loads(layout.lineage.read_text())
    assert record["removed_per_class"] == {"class0": 4, "class1": 1, "class2": 0}
    run = _load_run(ReportSources.discover(layout.root))
    assert run.metrics["clean_digest"] == result["clean_digest"]
    assert run.metrics["source_digest"] == dataset.dataset_digest()


def test_curves_hold_one_quantity_per_axis(tmp_path):
    """Each row is the share of all samples kept after the vote (step 0) or refinement round r (step r + 1); the
    learners' ISPL rounds (shares of their own active sets) are not mixed in."""
    from incompat.sanitize import curves

    n = 200
    events = [{"kind": "round", "learner": "b0.l0", "round": 0, "kept_fraction": 0.9, "kept": 171, "mean_loss": 1.0},
              {"kind": "round", "learner": "b0.l0", "round": 1, "kept_fraction": 0.5, "kept": 95, "mean_loss": 0.5},
              {"kind": "learner", "bag": 0, "index": 0, "core_size": 95, "poison_kept": 1},
              {"kind": "vote", "kept_fraction": 0.8, "poison_kept": 6},
              {"kind": "refinement", "round": 0, "kept_fraction": 0.85, "kept": 170, "poison_kept": 3},
              {"kind": "refinement", "round": 1, "kept_fraction": 0.9, "kept": 180, "poison_kept": 1}]
    rows = curves(events, n)
    assert [(r["step"], r["stage"]) for r in rows] == [(0, "vote"), (1, "refinement"), (2, "refinement")]
    assert all(set(r) == {"step", "stage", "kept", "kept_fraction", "poison_kept"} for r in rows)
    assert all(r["kept"] == round(r["kept_fraction"] * n) for r in rows)
    # a resumed refinement that did not replay its first round keeps each round at its own step
    assert [r["step"] for r in curves(events[3:4] + events[5:], n)] == [0, 2]
