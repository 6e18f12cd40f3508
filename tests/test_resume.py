"""SIGKILL in the middle of clustering, then the same command again: it resumes at the next weak learner (the
finished steps come from Prefect's cache, the finished learners from their checkpoints) and produces the same
keep-mask as a run that was never interrupted."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from incompat.data import write_dataset
from tests.conftest import make_imageset
from tests.test_cli_pipeline import TINY_PROFILE

PROFILE = {**TINY_PROFILE, "boost": 4, "data_fraction": 0.8, "core_epochs": 6, "refinement_rounds": 2}


def _project(root: Path) -> Path:
    root.mkdir(parents=True)
    write_dataset(make_imageset(n_per_class=40, n_classes=10, size=32, prefix="train"), root / "train.parquet")
    write_dataset(make_imageset(n_per_class=3, n_classes=10, size=32, seed=1, prefix="test"), root / "test.parquet")
    params = {"ingest": {"source": "train.parquet", "test_source": "test.parquet", "subset": None, "seed": 0},
              "poison": {"scenario": "paper:100:15"},
              "train": {"model": "small_cnn", "width": 8, "epochs": 1, "batch_size": 64},
              "defense": {"profile": "resume"}, "defense_profiles": {"resume": PROFILE}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def _command(root: Path) -> tuple[list[str], dict]:
    env = {**os.environ, "PREFECT_HOME": str(root / ".prefect"), "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db",
           "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)
    cli = Path(sys.executable).with_name("incompat")
    return [str(cli), "evaluate", "--no-retrain", "--quiet"], env


def _keep_mask(root: Path):
    return pq.read_table(root / "data" / "cluster" / "scores.parquet").column("kept").to_pylist()


def test_sigkill_mid_clustering_resumes_at_the_next_learner_with_the_same_result(tmp_path):
    reference = _project(tmp_path / "reference")
    command, env = _command(reference)
    subprocess.run(command, cwd=reference, env=env, check=True, timeout=600)

    victim = _project(tmp_path / "victim")
    command, env = _command(victim)
    checkpoints = victim / "data" / "checkpoints"
    proc = subprocess.Popen(command, cwd=victim, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (checkpoints / "learner-b00-00.npz").exists():
        assert proc.poll() is None, f"the run ended before its first learner: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "no learner checkpoint within 300 s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the flow and Prefect's temporary server with it
    proc.wait(timeout=30)
    assert not (checkpoints / "learner-b00-03.npz").exists(), "killed too late: clustering had finished"
    assert not (victim / "data" / "cluster" / "scores.parquet").exists()
    finished = sorted(checkpoints.glob("learner-*.npz"))
    stamps = {p.name: p.stat().st_mtime_ns for p in finished}
    ingest_stamp = (victim / "data" / "raw" / "ingest.json").stat().st_mtime_ns

    subprocess.run(command, cwd=victim, env=env, check=True, timeout=600)
    # the finished learners were loaded, not retrained; the finished steps were not run again
    assert {p.name: p.stat().st_mtime_ns for p in finished} == stamps
    assert (victim / "data" / "raw" / "ingest.json").stat().st_mtime_ns == ingest_stamp
    assert (checkpoints / "learner-b00-03.npz").exists()
    assert _keep_mask(victim) == _keep_mask(reference)
