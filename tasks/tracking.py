"""The one object that talks to MLflow. Every flow run is one MLflow run; weak learners are nested runs.

Everything goes through an explicit run id and `MlflowClient` (no global active run), so tasks in other threads
or processes can log to the same run. What is logged comes from the steps' files, not from their Python
objects: a step served from Prefect's cache still gets its metrics and artifacts into the new run.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
EXPERIMENT = "incompat"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def flatten(values: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return flat


def dvc_stage_hashes(project: Path = Path(".")) -> dict[str, str]:
    """One short hash per stage of dvc.lock (what DVC last reproduced here), for tagging; empty without DVC."""
    import hashlib

    import yaml

    lock = project / "dvc.lock"
    if not lock.exists():
        return {}
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except (OSError, yaml.YAMLError):
        return {}
    return {f"dvc.stage.{name}": hashlib.sha256(json.dumps(entry, sort_keys=True, default=str).encode())
            .hexdigest()[:16] for name, entry in stages.items()}


class Tracker:
    """Owns the MLflow connection for one flow run."""

    def __init__(self, experiment: str = EXPERIMENT, uri: str | None = None):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = uri or tracking_uri()
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        self.experiment_id = self._experiment(experiment)
        self.run_id: str | None = None

    def _experiment(self, name: str) -> str:
        # Two flows starting at once may both try to create the experiment: the loser reads the winner's.
        for attempt in range(5):
            found = self.client.get_experiment_by_name(name)
            if found is not None:
                return found.experiment_id
            try:
                return self.client.create_experiment(name, artifact_location=self._artifact_location())
            except Exception:
                time.sleep(0.2 * (attempt + 1))
        raise RuntimeError(f"MLflow ({self.uri}): cannot create or find experiment {name!r}")

    def _artifact_location(self) -> str | None:
        """Artifacts beside a SQLite store (mlflow.db + mlruns/), not wherever the first run happened to start."""
        if self.uri.startswith("sqlite:///"):
            return (Path(self.uri[len("sqlite:///"):]).resolve().parent / "mlruns").as_uri()
        return None

    @contextmanager
    def run(self, name: str, tags: dict[str, str] | None = None):
        """A top-level run, ended FINISHED or FAILED with the block."""
        from incompat.lineage import code_version

        code = code_version()
        all_tags = {"incompat.engine_sha256": code["engine_sha256"], "incompat.version": code["package"]}
        if code["git_commit"]:
            all_tags["mlflow.source.git.commit"] = code["git_commit"]
            all_tags["incompat.git_dirty"] = str(code["git_dirty"])
        all_tags.update(dvc_stage_hashes())
        all_tags.update(tags or {})
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        self.run_id = run.info.run_id
        try:
            yield self
        except BaseException:
            self.client.set_terminated(self.run_id, "FAILED")
            raise
        self.client.set_terminated(self.run_id, "FINISHED")

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_params(self, params: dict, run_id: str | None = None) -> None:
        from mlflow.entities import Param

        flat = flatten(params)
        items = [Param(k, v[:6000]) for k, v in sorted(flat.items())]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id or self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict, step: int = 0, run_id: str | None = None, prefix: str = "") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(prefix + k, float(v), now, step) for k, v in sorted(metrics.items())
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v]
        for i in range(0, len(values), 1000):
            self.client.log_batch(run_id or self.run_id, metrics=values[i:i + 1000])

    def log_rounds(self, rounds_path: Path) -> list[str]:
        """The ISPL trajectory: step metrics on the flow's run, and one nested run per weak learner with its
        own per-round curve and its core set's size (and poison in it, when ground truth was known)."""
        from mlflow.entities import Metric

        events = json.loads(Path(rounds_path).read_text())
        now = int(time.time() * 1000)
        metrics, per_learner, nested = [], {}, []
        step = 0
        for event in events:
            kind = event["kind"]
            if kind == "round":
                per_learner.setdefault(event["learner"], {"rounds": [], "summary": {}})["rounds"].append(event)
            elif kind == "learner":
                key = f"bag{event['bag']}-learner{event['index']}"
                per_learner.setdefault(key, {"rounds": [], "summary": {}})["summary"] = event
            if kind == "learner":
                continue
            stage = {"round": "ispl"}.get(kind, kind)
            for key in ("kept_fraction", "poison_kept", "mean_loss"):
                if key in event:
                    metrics.append(Metric(f"{stage}.{key}", float(event[key]), now, step))
            step += 1
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
        for name, learner in per_learner.items():
            child = self.client.create_run(self.experiment_id, run_name=name,
                                           tags={"mlflow.parentRunId": self.run_id, "incompat.kind": "weak_learner"})
            child_id = child.info.run_id
            curve = [Metric(f"round.{k}", float(r[k]), now, r["round"]) for r in learner["rounds"]
                     for k in ("kept_fraction", "poison_kept", "mean_loss", "train_size") if k in r]
            summary = {k: v for k, v in learner["summary"].items() if k in ("core_size", "agreement", "poison_kept")}
            if curve:
                self.client.log_batch(child_id, metrics=curve)
            self.log_metrics(summary, run_id=child_id, prefix="core.")
            self.client.set_terminated(child_id, "FINISHED")
            nested.append(child_id)
        return nested

    def log_dataset(self, path: Path, context: str, name: str | None = None) -> None:
        """A dataset input by reference: its location and its content digest (the canonical dataset digest)."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        from incompat.data import read_metadata

        meta = read_metadata(path)
        dataset = MetaDataset(resolve_dataset_source(str(Path(path).resolve())),
                              name=name or f"{context}:{Path(path).name}", digest=meta["dataset_digest"][:36])
        entity = dataset._to_mlflow_entity()
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(entity, tags=[
            InputTag("mlflow.data.context", context),
            InputTag("incompat.dataset_digest", meta["dataset_digest"]),
            InputTag("incompat.n_samples", str(meta.get("n_samples")))])])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if Path(path).is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_model(self, model_path: Path) -> None:
        """The retrained model as an MLflow PyTorch model (pickle format: the pt2 export is slow and needs an
        input example), plus the project's own weights file."""
        import mlflow
        import mlflow.pytorch

        from incompat.steps import load_model

        model, _ = load_model(model_path)
        self.log_artifact(model_path, "model_weights")
        with mlflow.start_run(run_id=self.run_id, nested=False):
            mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                     pip_requirements=[f"torch=={_version('torch')}"])
        # start_run(run_id=...) ends the run on exit; the flow is still going
        self.client.update_run(self.run_id, status="RUNNING")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def removed_manifest(removed_parquet: Path, out_csv: Path) -> Path:
    """The removed samples as a small CSV (id, label, class, scores) that a reviewer can open anywhere."""
    import csv

    import pyarrow.parquet as pq

    from incompat.data import read_metadata

    names = read_metadata(removed_parquet).get("class_names", [])
    table = pq.read_table(removed_parquet, columns=["sample_id", "label", "digest", "suspicion", "vote_agreement",
                                                    "refinement_correct"]).to_pylist()
    with open(out_csv, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["sample_id", "label", "class_name", "suspicion", "vote_agreement", "refinement_correct",
                         "digest"])
        for row in table:
            label = row["label"]
            writer.writerow([row["sample_id"], label, names[label] if label < len(names) else "",
                             f"{row['suspicion']:.6f}", f"{row['vote_agreement']:.6f}",
                             f"{row['refinement_correct']:.6f}", row["digest"]])
    return out_csv

