"""The one object that talks to MLflow. Every flow run is one MLflow run; weak learners are nested runs.

Everything goes through an explicit run id and `MlflowClient` (no global active run), so tasks in other threads
or processes can log to the same run. What is logged comes from the steps' files, not from their Python
objects: a step served from Prefect's cache still gets its metrics and artifacts into the new run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
EXPERIMENT = "incompat"
# How many of a dataset's first images go into a logged model's input example.
MODEL_EXAMPLE_IMAGES = 2


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


def metric_key(name: str) -> str:
    """`name` with every character MLflow refuses in a metric key (anything but letters, digits, `_ - . `
    and space; `/` and `:` too, which mean paths or are refused on Windows) replaced by `_`: a key built from
    data must not fail a run at its end."""
    key = re.sub(r"[^A-Za-z0-9_.\- ]", "_", name)[:250]
    return "_" if key.strip(".") == "" else key


def class_metric_key(prefix: str, label: int, n_classes: int) -> str:
    """A per-class metric key by class index (`removed_per_class.07`): class names are data (GTSRB's have
    parentheses and slashes) and go into a mapping artifact instead. Zero-padded so keys sort by index."""
    return f"{prefix}{label:0{max(2, len(str(max(n_classes - 1, 0))))}d}"


def run_context_tags(source_name: str | None = None) -> dict[str, str]:
    """`mlflow.user` and `mlflow.source.*`, which MLflow's fluent API sets and `MlflowClient.create_run` does
    not. A run started by a Prefect deployment (a worker, a schedule) is a JOB named after the deployment;
    anything else is LOCAL, named after the command that started it (`incompat sanitize`)."""
    user = _user()
    deployment, flow_name = _prefect_deployment()
    if deployment:
        source_type = "JOB"
        name = source_name or f"prefect deployment {flow_name}/{deployment}"
    else:
        source_type = "LOCAL"
        argv = [a for a in sys.argv if a]
        program = Path(argv[0]).name if argv else "<console>"
        command = argv[1] if len(argv) > 1 and not argv[1].startswith("-") else ""
        name = source_name or (f"{program} {command}" if program == "incompat" and command else
                               (argv[0] if argv else "<console>"))
    return {"mlflow.user": user, "mlflow.source.name": name[:500], "mlflow.source.type": source_type}


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # no USER/LOGNAME and no passwd entry (a container's arbitrary uid)
        return f"uid-{os.getuid()}" if hasattr(os, "getuid") else "unknown"


def _prefect_deployment() -> tuple[str | None, str | None]:
    try:
        from prefect.runtime import deployment, flow_run

        return deployment.name, flow_run.flow_name
    except Exception:  # outside a flow run Prefect's runtime answers None; never let tagging fail a run
        return None, None


def dvc_stage_tags(env: dict | None = None) -> dict[str, str]:
    """`dvc.stage` and one short hash per stage of dvc.lock, only for a run that DVC started as a stage
    command (DVC sets DVC_STAGE and DVC_ROOT for those): a dvc.lock that merely lies in the working folder says
    nothing about a run that never went through DVC."""
    env = os.environ if env is None else env
    stage = env.get("DVC_STAGE")
    if not stage:
        return {}
    return {"dvc.stage": stage, **dvc_stage_hashes(Path(env.get("DVC_ROOT") or "."))}


def dvc_stage_hashes(project: Path = Path(".")) -> dict[str, str]:
    """One short hash per stage of `project`'s dvc.lock (what DVC last reproduced there); empty without one."""
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


def params_in_use(params, groups: tuple[str, ...], **extra) -> dict:
    """The parameters a run used, for `Tracker.log_params`: the active profile's name, the defense config it
    resolves to (profile + the `defense` group's own keys), and the typed values of the other `groups` the flow
    reads. The `defense_profiles` map is not a run's parameters: the profiles not chosen were half of every
    run's params."""
    values: dict = {"profile": params.profile}
    for group in groups:
        value = getattr(params, group)
        values[group] = value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value)
    return {**values, **extra}


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
        self._inherited_tags: dict[str, str] = {}

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
        all_tags = {**run_context_tags(), "incompat.engine_sha256": code["engine_sha256"],
                    "incompat.version": code["package"]}
        if code["git_commit"]:
            all_tags["mlflow.source.git.commit"] = code["git_commit"]
            all_tags["incompat.git_dirty"] = str(code["git_dirty"])
        all_tags.update(dvc_stage_tags())
        all_tags.update(tags or {})
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        self.run_id = run.info.run_id
        self._inherited_tags = {k: v for k, v in all_tags.items() if k.startswith(("mlflow.source.", "dvc."))
                                or k in ("mlflow.user", "incompat.engine_sha256", "incompat.version",
                                         "incompat.git_dirty")}
        try:
            yield self
        except BaseException:
            self.client.set_terminated(self.run_id, "FAILED")
            raise
        self.client.set_terminated(self.run_id, "FINISHED")

    def nested_run(self, name: str, tags: dict[str, str] | None = None) -> str:
        """A child of this run (weak learner, grid scenario) with the same user/source/commit tags; the caller
        ends it with `client.set_terminated`."""
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={**self._inherited_tags, **(tags or {}), "mlflow.parentRunId": self.run_id})
        return run.info.run_id

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
        values = [Metric(metric_key(prefix + k), float(v), now, step) for k, v in sorted(metrics.items())
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
            for key in ("kept_fraction", "poison_kept", "mean_loss", "suspects", "poison_suspected"):
                if key in event:
                    metrics.append(Metric(f"{stage}.{key}", float(event[key]), now, step))
            step += 1
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
        for name, learner in per_learner.items():
            child_id = self.nested_run(name, tags={"incompat.kind": "weak_learner"})
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

    def log_removed_per_class(self, removed_parquet: Path) -> dict[str, int]:
        """Removed samples per class as metrics keyed by class index (`removed_per_class.07`), and the index ->
        class name mapping as the artifact `sanitization/class_names.json`. Counted from removed.parquet itself
        (labels and the class names in its metadata), so the figures do not depend on how metrics.json is laid
        out."""
        import numpy as np
        import pyarrow.parquet as pq

        from incompat.data import read_metadata

        names = list(read_metadata(removed_parquet).get("class_names") or [])
        labels = pq.read_table(removed_parquet, columns=["label"]).column("label").to_numpy()
        n_classes = max(len(names), int(labels.max()) + 1 if len(labels) else 0)
        counts = np.bincount(labels.astype(np.int64), minlength=n_classes) if n_classes else np.zeros(0, int)
        per_class = {class_metric_key("removed_per_class.", i, n_classes): int(c) for i, c in enumerate(counts)}
        self.log_metrics(per_class)
        mapping = {key.rsplit(".", 1)[1]: names[i] if i < len(names) else str(i)
                   for i, key in enumerate(per_class)}
        self.client.log_dict(self.run_id, mapping, "sanitization/class_names.json")
        return per_class

    def log_report(self, report_html: Path) -> None:
        """The report and what sits beside it for it (figures/, evaluation.json), never the folder it lies in:
        in a sanitization run folder that is the datasets and checkpoints too."""
        report_html = Path(report_html)
        self.log_artifact(report_html, "report")
        for extra in (report_html.parent / "figures", report_html.parent / "evaluation.json"):
            if extra.is_dir():
                self.log_artifact(extra, f"report/{extra.name}")
            elif extra.is_file():
                self.log_artifact(extra, "report")

    def log_model(self, model_path: Path, example_dataset: Path, registered_model_name: str | None = None) -> str:
        """The trained model as an MLflow model that needs nothing of this project: the network with its
        training set's normalisation inside (incompat.models.RawImageClassifier: uint8 images (N, H, W, C) in,
        logits (N, classes) out), exported with torch.export (`pt2`: a graph, no pickle, so loading imports no
        `incompat` and runs no code from the file), with a signature, an input example (the first images of
        `example_dataset`) and the class names in the model's metadata. The project's own weights file goes
        beside it (`model_weights/`). Returns the model URI."""
        import mlflow.pytorch
        import torch

        from incompat.data import read_dataset
        from incompat.models import RawImageClassifier
        from incompat.steps import load_model

        model, state = load_model(model_path)
        examples = read_dataset(example_dataset)
        if examples.image_shape[2] != state["in_channels"]:
            raise ValueError(f"{example_dataset}: images have {examples.image_shape[2]} channels, the model "
                             f"{model_path} takes {state['in_channels']}")
        packaged = RawImageClassifier(model, state["mean"], state["std"]).eval()
        self.log_artifact(model_path, "model_weights")
        with torch.no_grad():
            info = mlflow.pytorch.log_model(
                packaged, name="model", run_id=self.run_id, serialization_format="pt2",
                input_example=examples.images[:MODEL_EXAMPLE_IMAGES],
                pip_requirements=[f"torch=={_version('torch').split('+')[0]}", f"mlflow=={_version('mlflow')}"],
                metadata={"class_names": list(examples.class_names),
                          "input": "uint8 images (N, H, W, C), pixel values 0-255, as stored in the dataset",
                          "output": "logits (N, classes); the predicted class is the argmax"},
                registered_model_name=registered_model_name)
        return info.model_uri


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

