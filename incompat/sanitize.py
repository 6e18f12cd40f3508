"""From a dataset to its sanitized outputs: run ISPL+B, split kept/removed, score, count, write.

Two steps, each with its own outputs (written atomically), so the pipeline can cache and rerun them apart:
cluster -> scores.parquet, rounds.json, curves.json; filter -> clean.parquet, removed.parquet, metrics.json.
  clean.parquet    the kept samples (canonical format)
  removed.parquet  the removed samples, with their suspicion scores, most suspicious first
  scores.parquet   sample_id, label, kept, suspicion, vote_agreement, refinement_correct for every sample
  metrics.json     counts, cost and time; with ground truth also poison_total/poison_removed/clean_removed
  rounds.json      the per-round ISPL trajectory; curves.json the same as flat records (plots)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from incompat.data import DataError, ImageSet, write_dataset
from incompat.files import atomic_output, write_text_atomic
from incompat.ispl import DefenseConfig, DefenseResult, run_defense
from incompat.metrics import detection_confusion


@dataclass
class SanitizeOutputs:
    clean: Path
    removed: Path
    scores: Path
    metrics: Path
    rounds: Path
    metrics_values: dict


def read_truth(path: str | os.PathLike, dataset: ImageSet) -> np.ndarray:
    """Ground truth (`sample_id`, `is_poison`) aligned to the dataset's rows. Only for metrics."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["sample_id", "is_poison"])
    except Exception as exc:
        raise DataError(f"{path}: cannot read ground truth ({exc})") from None
    truth = dict(zip(table.column("sample_id").to_pylist(), table.column("is_poison").to_pylist()))
    missing = [sid for sid in dataset.sample_ids if sid not in truth]
    if missing:
        raise DataError(f"{path}: no ground truth for {len(missing)} sample(s), e.g. {missing[0]!r}")
    return np.array([bool(truth[sid]) for sid in dataset.sample_ids])


class RoundRecorder:
    """Collects the ISPL trajectory; with a poison mask (metrics only) it also records poison still kept."""

    def __init__(self, poison_mask: np.ndarray | None = None, forward=None):
        self.poison_mask = poison_mask
        self.events: list[dict] = []
        self.forward = forward

    def __call__(self, kind: str, info: dict) -> None:
        record = {k: v for k, v in info.items() if not k.endswith("_indices")}
        record["kind"] = kind
        indices = info.get("kept_indices", info.get("core_indices"))
        if self.poison_mask is not None and indices is not None:
            record["poison_kept"] = int(self.poison_mask[indices].sum())
        self.events.append(record)
        if self.forward:
            self.forward(kind, record)


def sanitize(dataset: ImageSet, cfg: DefenseConfig, out_dir: str | os.PathLike, *,
             truth_mask: np.ndarray | None = None, checkpoint_dir: str | os.PathLike | None = None,
             progress: bool = False, device: str | None = None, observe=None,
             extra_metrics: dict | None = None) -> tuple[DefenseResult, SanitizeOutputs]:
    """Cluster and filter in one go, every output in `out_dir` (the pipeline runs the two as separate steps)."""
    out_dir = Path(out_dir)
    result, events, source_digest = cluster(dataset, cfg, truth_mask=truth_mask, progress=progress, device=device,
                                            observe=observe, checkpoint_dir=checkpoint_dir if checkpoint_dir
                                            is not None else out_dir / "checkpoints")
    cluster_files = write_cluster_outputs(dataset, result, events, out_dir)
    scores = read_scores(cluster_files["scores"], dataset)
    cost = cluster_cost(result, len(dataset))
    outputs = write_filter_outputs(dataset, scores, out_dir, truth_mask,
                                   {"source_digest": source_digest, **cost, **(extra_metrics or {})})
    return result, SanitizeOutputs(outputs["clean"], outputs["removed"], cluster_files["scores"],
                                   outputs["metrics"], cluster_files["rounds"], outputs["metrics_values"])


def cluster(dataset: ImageSet, cfg: DefenseConfig, *, truth_mask: np.ndarray | None = None,
            checkpoint_dir: str | os.PathLike | None = None, progress: bool = False, device: str | None = None,
            observe=None) -> tuple[DefenseResult, list[dict], str]:
    """Run ISPL+B; returns the result, the per-round events (with poison still kept when a truth mask is given:
    the defense itself never sees it) and the dataset digest the checkpoints are keyed by."""
    cfg = cfg.for_classes(dataset.class_names)
    recorder = RoundRecorder(truth_mask, forward=observe)
    source_digest = dataset.dataset_digest()  # hashes every sample: once, for the checkpoints and the metrics
    result = run_defense(dataset.images, dataset.labels, dataset.n_classes, cfg, checkpoint_dir=checkpoint_dir,
                         observe=recorder, progress=progress, device=device, fingerprint=source_digest)
    return result, recorder.events, source_digest


def cluster_cost(result: DefenseResult, n_samples: int) -> dict:
    return {
        "n_learners": len(result.learners),
        "train_sample_passes": int(result.meter.train_samples),
        "inference_sample_passes": int(result.meter.infer_samples),
        "epoch_equivalents": float(result.meter.epoch_equivalents(n_samples)),
        "wall_seconds": float(result.wall_seconds),
    }


def write_cluster_outputs(dataset: ImageSet, result: DefenseResult, events: list[dict],
                          out_dir: str | os.PathLike) -> dict[str, Path]:
    """scores.parquet (the keep-mask and every score), rounds.json (the raw trajectory) and curves.json (the
    trajectory as flat records, one per round, for `dvc plots` and MLflow step metrics)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    scores = pa.table({
        "sample_id": pa.array(dataset.sample_ids.astype(str).tolist()),
        "label": pa.array(dataset.labels),
        "kept": pa.array(result.keep_mask),
        "suspicion": pa.array(result.suspicion.astype(np.float64)),
        "vote_agreement": pa.array(result.vote_agreement.astype(np.float64)),
        "refinement_correct": pa.array(result.refinement_correct.astype(np.float64)),
    })
    paths = {"scores": out_dir / "scores.parquet", "rounds": out_dir / "rounds.json",
             "curves": out_dir / "curves.json"}
    with atomic_output(paths["scores"]) as tmp:
        pq.write_table(scores, tmp)
    write_text_atomic(paths["rounds"], json.dumps(_jsonable(events), indent=1))
    write_text_atomic(paths["curves"], json.dumps(curves(events, len(dataset)), indent=1))
    return paths


def curves(events: list[dict], n_samples: int) -> list[dict]:
    """One record per ISPL round, refinement round and the vote, numbered in the order they happened."""
    records = []
    for event in events:
        if event["kind"] == "learner":
            continue
        stage = event.get("learner", event["kind"])
        record = {"step": len(records), "stage": stage, "kept_fraction": float(event["kept_fraction"])}
        if "mean_loss" in event:
            record["mean_loss"] = float(event["mean_loss"])
        if "poison_kept" in event:
            record["poison_kept"] = int(event["poison_kept"])
        records.append(record)
    return records


@dataclass
class Scores:
    keep_mask: np.ndarray
    suspicion: np.ndarray
    vote_agreement: np.ndarray
    refinement_correct: np.ndarray


def read_scores(path: str | os.PathLike, dataset: ImageSet) -> Scores:
    """scores.parquet aligned to the dataset's rows; refuses scores computed for another dataset."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise DataError(f"{path}: cannot read scores ({exc})") from None
    ids = table.column("sample_id").to_pylist() if "sample_id" in table.column_names else []
    if ids != dataset.sample_ids.astype(str).tolist():
        raise DataError(f"{path}: the scores are for another dataset (sample ids differ from the dataset's)")
    column = {name: table.column(name).to_numpy() for name in
              ("kept", "suspicion", "vote_agreement", "refinement_correct")}
    return Scores(column["kept"].astype(bool), column["suspicion"], column["vote_agreement"],
                  column["refinement_correct"])


def write_filter_outputs(dataset: ImageSet, scores: Scores, out_dir: str | os.PathLike,
                         truth_mask: np.ndarray | None, extra_metrics: dict,
                         metadata: dict | None = None) -> dict:
    """clean.parquet, removed.parquet (most suspicious first, with the scores) and metrics.json."""
    out_dir = Path(out_dir)
    keep = scores.keep_mask
    removed_idx = np.flatnonzero(~keep)
    removed_idx = removed_idx[np.argsort(-scores.suspicion[removed_idx], kind="stable")]
    clean_path, removed_path = out_dir / "clean.parquet", out_dir / "removed.parquet"
    clean_digest = write_dataset(dataset.subset(np.flatnonzero(keep)), clean_path, metadata=metadata)
    removed_digest = write_dataset(
        dataset.subset(removed_idx), removed_path, metadata=metadata,
        extra_columns={"suspicion": scores.suspicion[removed_idx],
                       "vote_agreement": scores.vote_agreement[removed_idx],
                       "refinement_correct": scores.refinement_correct[removed_idx]})
    n = len(dataset)
    removed_per_class = np.bincount(dataset.labels[~keep], minlength=dataset.n_classes)
    metrics = {
        "n_samples": n,
        "n_kept": int(keep.sum()),
        "n_removed": int((~keep).sum()),
        "removed_fraction": float((~keep).mean()) if n else 0.0,
        "removed_per_class": {name: int(c) for name, c in zip(dataset.class_names, removed_per_class)},
        "clean_digest": clean_digest,
        "removed_digest": removed_digest,
    }
    if truth_mask is not None:
        metrics.update(detection_confusion(~keep, truth_mask))
    metrics.update(extra_metrics)
    metrics_path = out_dir / "metrics.json"
    write_text_atomic(metrics_path, json.dumps(_jsonable(metrics), indent=2, sort_keys=True))
    return {"clean": clean_path, "removed": removed_path, "metrics": metrics_path,
            "metrics_values": _jsonable(metrics)}


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
