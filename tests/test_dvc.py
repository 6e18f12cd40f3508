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


STEPS = ("ingest", "poison", "cluster", "filter", "retrain", "evaluate", "report")
CODE_DIRS = ("incompat/", "flows/", "tasks/")


def _tiny_project(folder: Path) -> None:
    """Tiny data and a params.yaml with the active profile `tiny` and an unused one."""
    write_dataset(make_imageset(n_per_class=20, n_classes=10, size=32, prefix="train"), folder / "train.parquet")
    write_dataset(make_imageset(n_per_class=3, n_classes=10, size=32, seed=1, prefix="test"),
                  folder / "test.parquet")
    params = {"ingest": {"source": "train.parquet", "test_source": "test.parquet", "subset": None, "seed": 0},
              "poison": {"scenario": "paper:100:15"},
              "train": {"model": "small_cnn", "width": 8, "epochs": 1, "batch_size": 64},
              "defense": {"profile": "tiny", "alpha": None},
              "defense_profiles": {"tiny": TINY_PROFILE, "unused": {"boost": 3, "anomaly_z": 8.0}}}
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _git_ignore_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in (root / "data").rglob(".gitignore"))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git + DVC repo holding the project's dvc.yaml, .dvc/config, the code it depends on, the .gitignore files
    of data/, and tiny data."""
    repo = tmp_path_factory.mktemp("dvcrepo")
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    for package in ("incompat", "flows", "tasks"):
        shutil.copytree(ROOT / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "bench" / "scenarios", repo / "bench" / "scenarios")  # a dep of the poison stage
    for path in _git_ignore_files(ROOT):
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / path, repo / path)
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    _tiny_project(repo)
    _run(["git", "init", "-q"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"], repo)
    return repo


@pytest.fixture
def reproduced(repo):
    """The repo with every stage reproduced (a no-op when an earlier test already did)."""
    _run(["dvc", "repro"], repo)
    return repo


def _changed_stages(repo: Path) -> set[str]:
    return set(json.loads(_run(["dvc", "status", "--json"], repo).stdout))


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


# --- the deps of each stage: the code it runs, the parameters it reads -------------------------------------------

_LIST_MODULES = """
import json, os, sys
import numpy, pyarrow.parquet, torch, yaml  # third-party, loaded once: each step's process is forked from here

for name in sys.argv[1:]:
    read_end, write_end = os.pipe()
    if os.fork() == 0:
        os.close(read_end)
        from flows.cli import main
        code = main(["step", name]) if name != "grid" else 0
        if name == "grid":  # `incompat grid`: the CLI configures Prefect, then runs the grid flow
            import flows.grid, tasks.runtime
        files = [m.__file__ for key, m in list(sys.modules.items())
                 if key.split(".")[0] in ("incompat", "flows", "tasks") and getattr(m, "__file__", None)]
        os.write(write_end, json.dumps({"name": name, "code": code, "files": files}).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as fh:
        print(fh.read() or json.dumps({"name": name, "code": None, "files": []}), flush=True)
    os.wait()
"""


@pytest.fixture(scope="module")
def step_code(tmp_path_factory):
    """The project's source files each `incompat step NAME` loads, measured rather than listed by hand: every
    step run in order on tiny data, each in a fresh process (forked before any project module is imported)."""
    work = tmp_path_factory.mktemp("steps")
    _tiny_project(work)
    run = _run([sys.executable, "-c", _LIST_MODULES, *STEPS, "grid"], work)
    measured = {}
    for line in run.stdout.splitlines():
        if line.startswith('{"name"'):
            result = json.loads(line)
            assert result["code"] == 0, f"incompat step {result['name']} failed: {run.stderr[-2000:]}"
            measured[result["name"]] = {Path(f).resolve().relative_to(ROOT).as_posix() for f in result["files"]}
    assert set(measured) == set(STEPS) | {"grid"}, run.stderr[-2000:]
    return measured


def _code_deps(stage: dict) -> set[str]:
    return {d for d in stage["deps"] if d.startswith(CODE_DIRS)}


def test_every_stage_depends_on_exactly_the_code_its_step_loads(step_code):
    assert "incompat/steps.py" in step_code["cluster"] and "flows/cli.py" in step_code["cluster"]
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    wrong = {name: {"missing": sorted(step_code[name] - _code_deps(stages[name])),
                    "not loaded": sorted(_code_deps(stages[name]) - step_code[name])} for name in STEPS}
    assert not any(v["missing"] or v["not loaded"] for v in wrong.values()), f"dvc.yaml code deps: {wrong}"
    # the grid runs every step but the report, and the flow and tasks around them
    grid = set().union(*(step_code[name] for name in STEPS if name != "report"), step_code["grid"])
    stage = yaml.safe_load((ROOT / "bench" / "dvc.yaml").read_text())["stages"]["paper_grid"]
    assert _code_deps(stage) == grid, (f"bench/dvc.yaml missing {sorted(grid - _code_deps(stage))}, "
                                       f"not loaded {sorted(_code_deps(stage) - grid)}")


def test_editing_a_code_file_marks_the_stages_that_run_it_changed(reproduced):
    assert _changed_stages(reproduced) == set()
    for path, expected in (("incompat/steps.py", set(STEPS)), ("flows/cli.py", set(STEPS)),
                           ("incompat/report.py", {"report"}), ("incompat/sanitize.py", {"cluster", "filter"})):
        source = reproduced / path
        original = source.read_bytes()
        source.write_bytes(original + b"\n# an edit\n")
        try:
            assert _changed_stages(reproduced) == expected, path
        finally:
            source.write_bytes(original)
    assert _changed_stages(reproduced) == set()


def _edit_params(repo: Path, edit) -> bytes:
    path = repo / "params.yaml"
    original = path.read_bytes()
    params = yaml.safe_load(original)
    edit(params)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return original


def test_only_the_active_defense_profile_invalidates_clustering(reproduced):
    original = _edit_params(reproduced, lambda p: p["defense_profiles"]["unused"].update(anomaly_z=5.0))
    try:
        # the report shows the whole params.yaml; nothing that computes reads the unused profile
        assert _changed_stages(reproduced) == {"report"}
    finally:
        (reproduced / "params.yaml").write_bytes(original)
    original = _edit_params(reproduced, lambda p: p["defense_profiles"]["tiny"].update(core_epochs=3))
    try:
        assert _changed_stages(reproduced) == {"cluster", "filter", "report"}
    finally:
        (reproduced / "params.yaml").write_bytes(original)
    original = _edit_params(reproduced, lambda p: p["defense"].update(profile="unused"))
    try:
        assert {"cluster", "filter"} <= _changed_stages(reproduced)
    finally:
        (reproduced / "params.yaml").write_bytes(original)


# --- what git tracks --------------------------------------------------------------------------------------------

def _ignored(repo: Path, path: str) -> bool:
    return _run(["git", "check-ignore", "-q", path], repo, check=False).returncode == 0


def test_git_tracks_dvc_lock_and_the_uncached_metrics_and_ignores_every_cached_output(reproduced):
    """DVC's convention: dvc.lock and the `cache: false` metrics/plots are committed with the code; every cached
    output is ignored by a .gitignore that is already committed (a repro adds no entry)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    uncached, cached = [], []
    for stage in stages.values():
        for entry in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
            path, options = next(iter(entry.items())) if isinstance(entry, dict) else (entry, {})
            (uncached if options.get("cache") is False else cached).append(path)
    assert {"data/clean/metrics.json", "data/reports/evaluation.json", "data/cluster/curves.json"} <= set(uncached)
    assert (reproduced / "dvc.lock").exists() and not _ignored(reproduced, "dvc.lock")
    assert [p for p in uncached if _ignored(reproduced, p)] == []
    assert [p for p in cached if not _ignored(reproduced, p)] == []
    first = _run(["git", "rev-list", "--max-parents=0", "HEAD"], reproduced).stdout.strip()
    for path in _git_ignore_files(reproduced):
        committed = _run(["git", "show", f"{first}:{path.as_posix()}"], reproduced, check=False)
        assert committed.returncode == 0 and committed.stdout == (reproduced / path).read_text(), (
            f"dvc repro changed or added {path}: commit the project's version of it")


def test_make_clean_removes_the_outputs_and_keeps_the_tracked_gitignore_files(tmp_path):
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    kept = _git_ignore_files(ROOT)
    for path in kept:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / path, tmp_path / path)
    outputs = ["data/raw/train.parquet", "data/cluster/scores.parquet", "data/clean/clean.parquet",
               "data/reports/figures/a.png", "data/models/after.pt"]
    for path in outputs:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x")
    _run(["make", "--no-print-directory", "clean"], tmp_path)
    assert [p for p in outputs if (tmp_path / p).exists()] == []
    assert [p for p in kept if not (tmp_path / p).exists()] == []
