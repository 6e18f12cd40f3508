"""MLflow tracking against real temporary stores: keys built from data, what a run stores, a model that stands
on its own, and the tags and params a platform team filters runs by."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from incompat.data import ImageSet, write_dataset
from tasks.tracking import Tracker, params_in_use
from tests.conftest import make_imageset
from tests.test_cli_pipeline import TINY_PROFILE

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# GTSRB's 43 class names as its parquet's schema metadata gives them (shared/data/gtsrb/train.parquet), copied
# so the test needs no data files.
GTSRB_CLASS_NAMES = [
    "speed limit 20", "speed limit 30", "speed limit 50", "speed limit 60", "speed limit 70", "speed limit 80",
    "end of speed limit 80", "speed limit 100", "speed limit 120", "no passing", "no passing for vehicles over 3.5 t",
    "right of way at next intersection", "priority road", "yield", "stop", "no vehicles",
    "vehicles over 3.5 t prohibited", "no entry", "general caution", "dangerous curve left", "dangerous curve right",
    "double curve", "bumpy road", "slippery road", "road narrows on the right", "road work", "traffic signals",
    "pedestrians", "children crossing", "bicycles crossing", "beware of ice/snow", "wild animals crossing",
    "end of all speed and passing limits", "turn right ahead", "turn left ahead", "ahead only",
    "go straight or right", "go straight or left", "keep right", "keep left", "roundabout mandatory",
    "end of no passing", "end of no passing by vehicles over 3.5 t",
]
# Names as other GTSRB releases and users' image folders spell them: MLflow refuses parentheses in a metric key.
PUNCTUATED_NAMES = ["speed limit (20km/h)", "speed limit (30km/h)", "beware of ice/snow", "end of no passing (>3.5t)",
                    "stop: 100%", "yield", "keep right", "no entry", "road work", "priority road"]


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _all_artifacts(client, run_id, path=None) -> list[str]:
    found = []
    for item in client.list_artifacts(run_id, path):
        found += _all_artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return found


def _renamed(images: ImageSet, names: list[str]) -> ImageSet:
    return ImageSet(images.images, images.labels, images.sample_ids, names)


# --- defects 1 and 2: a sanitize run with punctuated class names, and what it stores ------------------------

@pytest.fixture
def punctuated_project(tmp_path, monkeypatch, mlflow_store):
    dataset = make_imageset(n_per_class=20, n_classes=len(PUNCTUATED_NAMES), size=32, prefix="train")
    write_dataset(_renamed(dataset, PUNCTUATED_NAMES), tmp_path / "signs.parquet")
    # what the defense removes does not matter here, only that the run gets to its logging
    params = {"defense": {"profile": "tiny", "allow_class_loss": True}, "defense_profiles": {"tiny": TINY_PROFILE}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_sanitize_run_with_punctuated_class_names_finishes_and_stores_no_datasets(punctuated_project,
                                                                                  mlflow_store, capsys):
    from flows.cli import main

    assert main(["sanitize", "signs.parquet", "--out", "run", "--json"]) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    client = _client(mlflow_store)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"

    # per-class counts keyed by class index, the names in a mapping artifact
    per_class = {k: v for k, v in run.data.metrics.items() if k.startswith("removed_per_class.")}
    assert sorted(per_class) == [f"removed_per_class.{i:02d}" for i in range(len(PUNCTUATED_NAMES))]
    metrics = json.loads((punctuated_project / "run" / "metrics.json").read_text())
    assert sum(per_class.values()) == metrics["n_removed"] == run.data.metrics["n_removed"]
    mapping = json.loads(Path(client.download_artifacts(run.info.run_id, "sanitization/class_names.json",
                                                        str(punctuated_project))).read_text())
    assert mapping == {f"{i:02d}": name for i, name in enumerate(PUNCTUATED_NAMES)}

    # the report and its figures, never the run folder's datasets or checkpoints
    artifacts = _all_artifacts(client, run.info.run_id)
    assert "report/report.html" in artifacts and "sanitization/removed_samples.csv" in artifacts
    assert any(p.startswith("report/figures/") and p.endswith(".png") for p in artifacts)
    assert not [p for p in artifacts if p.endswith(".parquet") or "checkpoint" in p], artifacts
    assert list((punctuated_project / "run").glob("*.parquet"))  # they are there, just not in the store
    contexts = {t.value for d in run.inputs.dataset_inputs for t in d.tags if t.key == "mlflow.data.context"}
    assert {"ingested", "cleaned", "removed"} <= contexts  # referenced as inputs with digests instead


def test_gtsrb_class_names_are_logged_by_index_with_their_names(tmp_path, mlflow_store):
    n = len(GTSRB_CLASS_NAMES)
    labels = np.concatenate([np.arange(n), np.arange(n), [7, 7, 7]])  # class 7 removed five times, others twice
    images = np.zeros((len(labels), 8, 8, 3), dtype=np.uint8)
    removed = ImageSet(images, labels, [f"r-{i}" for i in range(len(labels))], GTSRB_CLASS_NAMES)
    write_dataset(removed, tmp_path / "removed.parquet")
    tracker = Tracker()
    with tracker.run("gtsrb names"):
        logged = tracker.log_removed_per_class(tmp_path / "removed.parquet")
    client = _client(mlflow_store)
    run = client.get_run(tracker.run_id)
    per_class = {k: v for k, v in run.data.metrics.items() if k.startswith("removed_per_class.")}
    assert per_class == logged and len(per_class) == n
    assert per_class["removed_per_class.07"] == 5 and per_class["removed_per_class.42"] == 2
    mapping = json.loads(Path(client.download_artifacts(tracker.run_id, "sanitization/class_names.json",
                                                        str(tmp_path))).read_text())
    assert mapping["07"] == "speed limit 100" and mapping["30"] == "beware of ice/snow"
    assert list(mapping.values()) == GTSRB_CLASS_NAMES


def test_a_metric_key_built_from_data_never_fails_the_run(mlflow_store):
    tracker = Tracker()
    with tracker.run("odd keys"):
        tracker.log_metrics({"speed limit (20km/h)": 1.0, "a/../b": 2.0, "ok_key": 3.0}, prefix="x.")
    metrics = _client(mlflow_store).get_run(tracker.run_id).data.metrics
    assert metrics == {"x.speed limit _20km_h_": 1.0, "x.a_.._b": 2.0, "x.ok_key": 3.0}


# --- defect 3: a model that needs nothing of this project ----------------------------------------------------

LOAD_WITHOUT_INCOMPAT = textwrap.dedent("""
    import importlib.util, sys
    project = sys.argv[4]
    # the venv installs incompat in editable mode: drop its finder, and any path entry of the project itself
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    sys.path[:] = [p for p in sys.path if p.rstrip("/") != project.rstrip("/")]
    for top in ("incompat", "tasks", "flows"):
        assert importlib.util.find_spec(top) is None, top

    class Refuse:  # anything that still tries to import the project fails loudly
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name.split(".")[0] in ("incompat", "tasks", "flows"):
                raise ImportError(f"blocked: {name}")
            return None

    sys.meta_path.insert(0, Refuse)
    import numpy as np
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(sys.argv[1])
    np.save(sys.argv[3], model.predict(np.load(sys.argv[2])))
    assert not [m for m in sys.modules if m.split(".")[0] == "incompat"]
""")


def test_logged_model_predicts_raw_images_without_the_project(tmp_path, mlflow_store):
    import mlflow.models

    from incompat.steps import save_model
    from incompat.training import TensorData, TrainConfig, fit, predict

    train = make_imageset(n_per_class=30, n_classes=3, size=8, seed=0, prefix="train")
    test = make_imageset(n_per_class=15, n_classes=3, size=8, seed=1, prefix="test")
    data = TensorData(train.images, train.labels, num_classes=3)
    cfg = TrainConfig(model="small_cnn", width=8, epochs=4, batch_size=32, lr=0.1, augment=False, threads=1)
    model = fit(data, cfg, progress=False)
    save_model(model, tmp_path / "after.pt", cfg, 3, 3, data.mean, data.std)
    write_dataset(test, tmp_path / "test.parquet")
    tracker = Tracker()
    with tracker.run("model"):
        uri = tracker.log_model(tmp_path / "after.pt", example_dataset=tmp_path / "test.parquet",
                                registered_model_name="signs-classifier")
    # the trainer's own way: normalised with the training set's statistics, outside the model
    expected = predict(model, TensorData(test.images, test.labels, mean=data.mean, std=data.std, num_classes=3))
    assert (expected == test.labels).mean() >= 0.9  # a model worth checking

    info = mlflow.models.get_model_info(uri)
    spec = info.signature.inputs.inputs[0]
    assert spec.type == np.dtype("uint8") and tuple(spec.shape) == (-1, 8, 8, 3)
    assert info.saved_input_example_info is not None
    assert info.metadata["class_names"] == ["class0", "class1", "class2"]
    (version,) = _client(mlflow_store).search_model_versions("name='signs-classifier'")
    assert version.run_id == tracker.run_id  # registered, when a name is given

    np.save(tmp_path / "images.npy", test.images)
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(MLFLOW_TRACKING_URI=mlflow_store, MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
    proc = subprocess.run([sys.executable, "-I", "-c", LOAD_WITHOUT_INCOMPAT, uri, str(tmp_path / "images.npy"),
                           str(tmp_path / "logits.npy"), str(PROJECT_ROOT)], cwd=empty, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logits = np.load(tmp_path / "logits.npy")
    assert logits.shape == (len(test), 3)
    assert (logits.argmax(1) == expected).all()


# --- defect 4: who and what started a run, DVC tags only for DVC, params in use only -------------------------

def test_runs_carry_user_and_source_tags_and_nested_runs_inherit_them(tmp_path, mlflow_store, monkeypatch):
    import getpass

    monkeypatch.delenv("DVC_STAGE", raising=False)
    tracker = Tracker()
    rounds = tmp_path / "rounds.json"
    rounds.write_text(json.dumps([{"kind": "round", "learner": "bag0-learner0", "round": 0, "kept_fraction": 0.5},
                                  {"kind": "learner", "bag": 0, "index": 0, "core_size": 10}]))
    with tracker.run("local"):
        (child_id,) = tracker.log_rounds(rounds)
    client = _client(mlflow_store)
    tags = client.get_run(tracker.run_id).data.tags
    assert tags["mlflow.user"] == getpass.getuser()
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"]
    assert len(tags["mlflow.source.git.commit"]) == 40
    child = client.get_run(child_id).data.tags
    assert child["mlflow.parentRunId"] == tracker.run_id
    assert {k: child[k] for k in ("mlflow.user", "mlflow.source.type", "mlflow.source.git.commit")} == \
        {k: tags[k] for k in ("mlflow.user", "mlflow.source.type", "mlflow.source.git.commit")}

    # a run a Prefect deployment started (a worker, a schedule) is a JOB named after the deployment
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__NAME", "nightly-sanitize")
    monkeypatch.setenv("PREFECT__RUNTIME__FLOW_RUN__FLOW_NAME", "sanitize")
    with tracker.run("scheduled"):
        pass
    tags = client.get_run(tracker.run_id).data.tags
    assert tags["mlflow.source.type"] == "JOB"
    assert tags["mlflow.source.name"] == "prefect deployment sanitize/nightly-sanitize"


def test_dvc_tags_only_on_runs_dvc_started(tmp_path, mlflow_store, monkeypatch):
    lock = {"schema": "2.0", "stages": {"ingest": {"cmd": "incompat step ingest", "outs": []},
                                        "filter": {"cmd": "incompat step filter", "outs": []}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    tracker = Tracker()
    with tracker.run("not a DVC stage"):
        pass
    client = _client(mlflow_store)
    assert not [k for k in client.get_run(tracker.run_id).data.tags if k.startswith("dvc.")]

    # DVC runs a stage's command with DVC_STAGE and DVC_ROOT set (dvc/stage/run.py)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("DVC_STAGE", "filter")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    with tracker.run("a DVC stage"):
        pass
    tags = client.get_run(tracker.run_id).data.tags
    assert tags["dvc.stage"] == "filter"
    assert {"dvc.stage.ingest", "dvc.stage.filter"} <= set(tags)


def test_params_are_the_active_profile_resolved_not_every_profile(tmp_path, mlflow_store):
    from incompat.config import load_params

    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    assert len(raw["defense_profiles"]) >= 3  # several profiles, one in use
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(tmp_path / "params.yaml", profile="cpu_crossfit", defense_overrides={"seed": 3})
    tracker = Tracker()
    with tracker.run("params"):
        tracker.log_params(params_in_use(params, ("ingest", "poison", "train", "defense"), scenario="s"))
    logged = _client(mlflow_store).get_run(tracker.run_id).data.params
    assert not [k for k in logged if k.startswith("defense_profiles")]
    assert logged["profile"] == "cpu_crossfit" and logged["scenario"] == "s"
    assert logged["defense.seed"] == "3"
    assert logged["defense.anomaly_z"] == str(raw["defense_profiles"]["cpu_crossfit"]["anomaly_z"])
    assert logged["train.epochs"] == str(params.train.epochs) and logged["ingest.seed"] == str(params.ingest.seed)
    assert not [k for k in logged if k.startswith("grid.")]  # a group this flow does not read
