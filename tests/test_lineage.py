"""Lineage records against forgery and hostile paths, and step manifests that do not change between identical runs.

One small run folder (ingest -> cluster -> filter on 90 tiny images, the engine steps without Prefect) is built per
module and copied for each test; the tests edit the copy as an attacker would.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from flows.sanitize import incoming_batches
from incompat import lineage, steps
from incompat.config import load_params
from incompat.data import DataError, read_metadata, write_dataset
from incompat.ispl import DefenseConfig
from tests.conftest import make_imageset
from tests.test_cli_pipeline import TINY_PROFILE


def _params(project: Path):
    defense = {"profile": "tiny"}
    if "allow_class_loss" in DefenseConfig.__dataclass_fields__:  # tiny weak learners may miss a class whole
        defense["allow_class_loss"] = True
    (project / "params.yaml").write_text(yaml.safe_dump({
        "ingest": {"source": "train.parquet", "test_source": None, "subset": None, "seed": 0},
        "defense": defense, "defense_profiles": {"tiny": TINY_PROFILE}}))
    return load_params(project / "params.yaml")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    project = tmp_path_factory.mktemp("lineage") / "project"
    project.mkdir()
    write_dataset(make_imageset(n_per_class=30, n_classes=3, size=16), project / "train.parquet")
    params = _params(project)
    layout = steps.Layout(project / "run", flat=True)
    steps.run_ingest(layout, params.ingest, sources=[str(project / "train.parquet")], test_source=None, subset=None)
    steps.run_cluster(layout, params, truth=None)
    steps.run_filter(layout, params, truth=None)
    return project


@pytest.fixture
def project(built, tmp_path):
    """A copy of the built project: its record's relative paths lead into the copy, its absolute ones to `built`."""
    copy = tmp_path / "project"
    shutil.copytree(built, copy)
    return copy


def _record(project):
    return json.loads((project / "run" / "lineage.json").read_text())


def _write_record(project, record):
    (project / "run" / "lineage.json").write_text(json.dumps(record, indent=2))


def _lineage(*args):
    return main(["lineage", *map(str, args)])


def test_an_intact_run_verifies_and_says_what_is_verified(project, capsys):
    assert _lineage(project / "run" / "clean.parquet") == 0
    out = capsys.readouterr().out
    assert "ingest:" in out and "cluster:" in out and "filter:" in out  # the chain, readable
    assert "[       ok] output: clean" in out and "[       ok] manifest: ingest" in out
    assert "not authenticity" in out
    record = _record(project)
    assert read_metadata(project / "run" / "clean.parquet")[lineage.BINDING_KEY] == record["content_digest"]
    assert read_metadata(project / "run" / "removed.parquet")[lineage.BINDING_KEY] == record["content_digest"]


# --- defect: paths that reach a reader ---------------------------------------------------------------------------

@pytest.mark.timeout(20)
def test_incoming_fifo_device_link_and_escaping_link_are_refused_without_reading(tmp_path):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    write_dataset(make_imageset(n_per_class=2), incoming / "a.parquet")
    assert incoming_batches(str(incoming)) == [str(incoming / "a.parquet")]

    os.mkfifo(incoming / "batch.npz")
    with pytest.raises(DataError, match=r"batch\.npz: a FIFO, not a regular file"):
        incoming_batches(str(incoming))
    (incoming / "batch.npz").unlink()

    (incoming / "batch.npz").symlink_to("/dev/zero")
    with pytest.raises(DataError, match=r"batch\.npz: resolves to /dev/zero, outside the incoming folder"):
        incoming_batches(str(incoming))
    (incoming / "batch.npz").unlink()

    outside = tmp_path / "elsewhere.parquet"
    write_dataset(make_imageset(n_per_class=2, prefix="x"), outside)
    (incoming / "b.parquet").symlink_to(outside)
    with pytest.raises(DataError, match=r"b\.parquet: resolves to .*elsewhere\.parquet, outside the incoming"):
        incoming_batches(str(incoming))
    (incoming / "b.parquet").unlink()

    os.mkfifo(tmp_path / "pipe")  # the incoming location itself
    with pytest.raises(DataError, match=r"pipe: a FIFO, not a regular file"):
        incoming_batches(str(tmp_path / "pipe"))


@pytest.mark.timeout(20)
def test_digests_never_open_a_fifo_or_a_device(tmp_path):
    os.mkfifo(tmp_path / "pipe.parquet")
    (tmp_path / "zero.npz").symlink_to("/dev/zero")
    for path in (tmp_path / "pipe.parquet", tmp_path / "zero.npz"):
        with pytest.raises(DataError, match="not a regular file"):
            lineage.digest(path)
        with pytest.raises(DataError, match="not a regular file"):
            lineage.file_sha256(path)


@pytest.mark.timeout(120, method="thread")
def test_sanitize_with_a_fifo_batch_fails_at_once_naming_it(tmp_path, monkeypatch, mlflow_store, capsys):
    monkeypatch.chdir(tmp_path)
    _params(tmp_path)
    write_dataset(make_imageset(n_per_class=30, n_classes=3, size=16), tmp_path / "train.parquet")
    (tmp_path / "incoming").mkdir()
    os.mkfifo(tmp_path / "incoming" / "batch.npz")
    assert main(["sanitize", "train.parquet", "--incoming", "incoming", "--out", "out"]) == 1
    err = capsys.readouterr().err
    assert "incoming/batch.npz: a FIFO, not a regular file" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "clean.parquet").exists()


def _forge_reference(project, target: Path, role="base"):
    """Point the ingest step's source at `target` and reseal the record, as a forger without a key can."""
    record = _record(project)
    ingest = next(m for m in record["chain"] if m["step"] == "ingest")
    ref = next(r for r in ingest["inputs"] if r["role"] == role)
    ref["path"] = os.path.relpath(target, project / "run")
    ref["abs"] = str(target)
    _write_record(project, lineage.seal(record))


@pytest.mark.timeout(30)
def test_lineage_reads_no_fifo_no_device_and_nothing_outside_its_roots(project, tmp_path, capsys):
    os.mkfifo(project / "pipe.parquet")
    _forge_reference(project, project / "pipe.parquet")
    assert _lineage(project / "run") == 1
    captured = capsys.readouterr()
    assert "pipe.parquet: a FIFO, not a regular file" in captured.out + captured.err

    (project / "zero.parquet").symlink_to("/dev/zero")
    _forge_reference(project, project / "zero.parquet")
    assert _lineage(project / "run") == 1
    assert "/dev/zero" in capsys.readouterr().out  # reported where it leads, never read

    secret = tmp_path / "private" / "shadow"
    secret.parent.mkdir()
    secret.write_text("root:$6$secret-hash:19000:0:99999:7:::\n")
    _forge_reference(project, secret)
    assert _lineage(project / "run", "--json") == 1  # the forged record no longer matches the datasets' binding
    report = json.loads(capsys.readouterr().out)
    check = next(c for c in report["checks"] if c["role"] == "ingest: base")
    assert check["status"] == "outside" and Path(check["path"]) == secret.resolve()
    assert lineage.file_sha256(secret)[:12] not in json.dumps(report)
    # a folder the user names is read (here: not a dataset, as the record says it is)
    assert _lineage(project / "run", "--json", "--root", secret.parent) == 1
    report = json.loads(capsys.readouterr().out)
    check = next(c for c in report["checks"] if c["role"] == "ingest: base")
    assert check["status"] == "error" and "not a readable Parquet file" in check["detail"]


@pytest.mark.timeout(20)
def test_a_record_that_is_a_fifo_or_a_device_is_not_read(project, capsys):
    record = project / "run" / "lineage.json"
    record.unlink()
    record.symlink_to("/dev/zero")
    assert _lineage(project / "run") == 1
    assert "no lineage record" in capsys.readouterr().err
    record.unlink()
    os.mkfifo(record)
    assert _lineage(record) == 1
    with pytest.raises(DataError, match="a FIFO, not a regular file"):
        lineage.read_record(record)  # swapped in after find_record's check: refused, not waited on


# --- defect: lineage passed what it must catch -------------------------------------------------------------------

def test_a_deleted_clean_parquet_fails_even_where_the_original_still_exists(project, built, capsys):
    (project / "run" / "clean.parquet").unlink()
    assert (built / "run" / "clean.parquet").exists()  # where the record's absolute path leads
    assert _lineage(project / "run" / "clean.parquet") == 1
    assert "output: clean" in capsys.readouterr().err
    assert _lineage(project / "run") == 1


def test_a_foreign_parquet_in_the_run_folder_is_not_verified_by_the_record_beside_it(project, capsys):
    foreign = project / "run" / "foreign.parquet"
    write_dataset(make_imageset(n_per_class=5, seed=3, prefix="f"), foreign)
    assert _lineage(foreign) == 1
    err = capsys.readouterr().err
    assert "foreign.parquet: not an output of" in err and len(err.strip().splitlines()) == 1


def test_a_dataset_linked_in_from_elsewhere_is_refused(project, built, capsys):
    clean = project / "run" / "clean.parquet"
    clean.unlink()
    clean.symlink_to(built / "run" / "clean.parquet")  # the same bytes, but not the record's own file
    assert _lineage(project / "run") == 1
    assert "outside the record's folder" in capsys.readouterr().err


@pytest.mark.parametrize("edit", ["params", "counts", "paths", "run id"])
def test_an_edited_record_is_caught_whether_or_not_its_digests_are_recomputed(project, capsys, edit):
    record = _record(project)
    if edit == "params":
        record["params"]["defense"]["seed"] = 12345
    elif edit == "counts":
        record["counts"]["n_removed"] += 1
    elif edit == "paths":
        record["sources"][0]["path"] = "../somewhere/else.parquet"
    else:
        record["mlflow_run_id"] = "forged-run"
    _write_record(project, record)
    assert _lineage(project / "run") == 1
    assert "edited after it was written" in capsys.readouterr().err
    if edit != "run id":  # the per-run keys are outside the binding (see test_per_run_keys...): the key covers them
        _write_record(project, lineage.seal(record))
        assert _lineage(project / "run") == 1
        assert "not the data this record was written with" in capsys.readouterr().err


def _swap_clean(project):
    """Replace clean.parquet by other data and update its digest everywhere in the record."""
    record = _record(project)
    old = record["outputs"][0]["digest"]
    new = write_dataset(make_imageset(n_per_class=4, seed=5, prefix="swap"), project / "run" / "clean.parquet")
    text = json.dumps(record).replace(old, new)
    return json.loads(text)


def test_a_swapped_clean_parquet_with_its_digest_updated_in_the_record_is_caught(project, capsys):
    record = _swap_clean(project)
    _write_record(project, record)
    assert _lineage(project / "run" / "clean.parquet") == 1
    assert "edited after it was written" in capsys.readouterr().err
    _write_record(project, lineage.seal(record))  # digests recomputed too
    assert _lineage(project / "run" / "clean.parquet") == 1
    assert "not the data this record was written with" in capsys.readouterr().err


def test_a_consistent_forgery_passes_without_a_key_and_fails_with_one(project, monkeypatch, capsys):
    monkeypatch.setenv(lineage.KEY_ENV, "the lab's secret")
    steps.run_filter(steps.Layout(project / "run", flat=True), _params(project), truth=None)  # signed
    assert _record(project)["signature"]["alg"] == "hmac-sha256"
    assert _lineage(project / "run") == 0
    assert "integrity and authenticity" in capsys.readouterr().out

    # the forger rewrites data, record and binding consistently, keeping the old signature (no key to renew it)
    record = _swap_clean(project)
    monkeypatch.delenv(lineage.KEY_ENV)
    sealed = lineage.seal(record)
    sealed["signature"] = record["signature"]
    for name in ("clean.parquet", "removed.parquet"):
        lineage.bind_dataset(project / "run" / name, sealed["content_digest"])
    _write_record(project, sealed)
    assert _lineage(project / "run") == 0  # no checksum can catch this ...
    out = capsys.readouterr().out
    assert "not authenticity" in out and "set $INCOMPAT_LINEAGE_KEY to check the signature" in out
    monkeypatch.setenv(lineage.KEY_ENV, "the lab's secret")
    assert _lineage(project / "run") == 1  # ... but the key does
    assert "HMAC does not match" in capsys.readouterr().err
    del sealed["signature"]
    _write_record(project, sealed)
    assert _lineage(project / "run") == 1
    assert "not signed" in capsys.readouterr().err


@pytest.mark.parametrize("damage, key", [
    (lambda r: r.pop("counts"), "'counts' is missing"),
    (lambda r: r.pop("outputs"), "'outputs' is missing"),
    (lambda r: r["chain"][0]["inputs"][0].pop("digest"), "'chain[0].inputs[0].digest' is missing"),
    (lambda r: r["chain"][1].__setitem__("outputs", {"a": 1}), "'chain[1].outputs' is dict"),
    (lambda r: r["outputs"][0].__setitem__("kind", "socket"), "'outputs[0].kind' is 'socket'"),
    (lambda r: r.__setitem__("params", ["tiny"]), "'params' is list"),
])
def test_a_record_missing_keys_or_with_wrong_types_is_one_line_naming_file_and_key(project, capsys, damage, key):
    record = _record(project)
    damage(record)
    _write_record(project, record)
    assert _lineage(project / "run") == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "lineage.json" in err and key in err
    assert "Traceback" not in err and "KeyError" not in err


# --- defect: manifests that change between identical runs ---------------------------------------------------------

def test_ingest_twice_on_the_same_input_writes_byte_identical_files(tmp_path, monkeypatch):
    """data/raw is one DVC output: a manifest with a time or a git commit in it would make `poison` rerun."""
    write_dataset(make_imageset(n_per_class=5), tmp_path / "train.parquet")
    params = _params(tmp_path)
    layout = steps.Layout(tmp_path / "data")
    runs = []
    for i in range(2):
        monkeypatch.setattr(lineage, "now", lambda i=i: f"2026-01-0{i + 1}T00:00:00+00:00")
        monkeypatch.setattr(lineage, "_CODE_VERSION", {**lineage.code_version(), "git_commit": f"commit{i}",
                                                       "git_dirty": bool(i)})
        steps.run_ingest(layout, params.ingest, sources=[str(tmp_path / "train.parquet")], test_source=None,
                         subset=None)
        runs.append({p.name: p.read_bytes() for p in sorted(layout.raw.iterdir())})
    assert set(runs[0]) == {"train.parquet", "ingest.json"}
    assert runs[0] == runs[1]


def test_per_run_keys_leave_the_cleaned_datasets_byte_identical(project, monkeypatch):
    """The filter step run again (new time, new run ids, a cluster step rerun by other code in another wall time
    with the same scores): the record is new, clean.parquet (a DVC output that `retrain` depends on) is not."""
    run, params = project / "run", _params(project)
    steps.run_filter(steps.Layout(run, flat=True), params, truth=None, run_context={"mlflow_run_id": "one-run"})
    before = {name: (run / name).read_bytes() for name in ("clean.parquet", "removed.parquet", "lineage.json")}
    monkeypatch.setattr(lineage, "now", lambda: "2030-01-01T00:00:00+00:00")
    monkeypatch.setattr(lineage, "_CODE_VERSION", {**lineage.code_version(), "git_commit": "another-commit"})
    cluster = json.loads((run / "cluster.json").read_text())
    cluster["summary"]["wall_seconds"] += 12.5
    cluster["code"]["engine_sha256"] = "0" * 64
    (run / "cluster.json").write_text(json.dumps(cluster, indent=2))
    steps.run_filter(steps.Layout(run, flat=True), params, truth=None, run_context={"mlflow_run_id": "another-run"})
    assert (run / "clean.parquet").read_bytes() == before["clean.parquet"]
    assert (run / "removed.parquet").read_bytes() == before["removed.parquet"]
    assert (run / "lineage.json").read_bytes() != before["lineage.json"]
    assert lineage.verify(run).ok
