"""The project's dvc.yaml in a real, temporary DVC repo on tiny synthetic data."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from incompat.data import write_dataset
from tests.conftest import make_imageset
from tests.test_cli_pipeline import TINY_PROFILE

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


def _run(args, cwd, check=True):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git + DVC repo holding the project's dvc.yaml, .dvc/config, the code it depends on, and tiny data."""
    repo = tmp_path_factory.mktemp("dvcrepo")
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    shutil.copytree(ROOT / "incompat", repo / "incompat", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "data").mkdir()
    shutil.copy(ROOT / "data" / ".gitignore", repo / "data" / ".gitignore")
    (repo / ".gitignore").write_text("/.dvc-storage/\n")
    write_dataset(make_imageset(n_per_class=20, n_classes=10, size=32, prefix="train"), repo / "train.parquet")
    write_dataset(make_imageset(n_per_class=3, n_classes=10, size=32, seed=1, prefix="test"), repo / "test.parquet")
    params = {"ingest": {"source": "train.parquet", "test_source": "test.parquet", "subset": None, "seed": 0},
              "poison": {"scenario": "paper:100:15"},
              "train": {"model": "small_cnn", "width": 8, "epochs": 1, "batch_size": 64},
              "defense": {"profile": "tiny", "alpha": None}, "defense_profiles": {"tiny": TINY_PROFILE}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"], repo)
    return repo


def _ran(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


def test_repro_runs_every_stage_then_nothing_then_only_what_a_param_touches(repo):
    first = _run(["dvc", "repro"], repo)
    assert _ran(first.stdout) == ["ingest", "poison", "cluster", "filter", "retrain", "evaluate", "report"]
    metrics = json.loads((repo / "data" / "clean" / "metrics.json").read_text())
    assert metrics["poison_total"] == 2 and metrics["n_samples"] == 200
    record = json.loads((repo / "data" / "clean" / "lineage.json").read_text())
    assert record["dvc_stage"] == "filter"
    assert _run(["dvc", "repro"], repo).stdout.count("Running stage") == 0

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["epochs"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_run(["dvc", "repro"], repo).stdout) == ["retrain", "evaluate", "report"]

    dag = _run(["dvc", "dag", "--md"], repo).stdout
    names = dict(re.findall(r'(node\d+)\["(\w+)"\]', dag))
    edges = {(names[a], names[b]) for a, b in re.findall(r"(node\d+)-->(node\d+)", dag)}
    assert {("ingest", "poison"), ("poison", "cluster"), ("cluster", "filter"), ("filter", "retrain"),
            ("retrain", "evaluate"), ("evaluate", "report")} <= edges
    shown = json.loads(_run(["dvc", "metrics", "show", "--json"], repo).stdout)
    assert shown  # metrics.json and evaluation.json are declared metrics
    plots = _run(["dvc", "plots", "show", "--json"], repo).stdout
    assert "curves.json" in plots

    # the default local remote: push, lose the cache and the outputs, pull them back
    _run(["git", "add", "-A"], repo)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "run"], repo)
    _run(["dvc", "push"], repo)
    digest = next(ref["digest"] for ref in record["outputs"] if ref["role"] == "clean")  # metrics: numbers only
    shutil.rmtree(repo / ".dvc" / "cache")
    (repo / "data" / "clean" / "clean.parquet").unlink()
    _run(["dvc", "pull"], repo)
    from incompat.data import read_dataset

    assert read_dataset(repo / "data" / "clean" / "clean.parquet", verify=True).dataset_digest() == digest


def test_exp_run_with_the_papers_alpha(repo):
    result = _run(["dvc", "exp", "run", "-S", "defense.alpha=3"], repo)
    assert "cluster" in _ran(result.stdout)
    table = _run(["dvc", "exp", "show", "--json"], repo).stdout
    assert "defense.alpha" in table or '"alpha": 3' in table
