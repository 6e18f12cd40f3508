"""From a dataset to its sanitized outputs: run ISPL+B, split kept/removed, score, count, write.

Outputs in the run directory (each written atomically):
  clean.parquet    the kept samples (canonical format)
  removed.parquet  the removed samples, with their suspicion scores, most suspicious first
  scores.parquet   sample_id, label, kept, suspicion, vote_agreement, refinement_correct for every sample
  metrics.json     counts, cost and time; with ground truth also poison_total/poison_removed/clean_removed
  rounds.json      the per-round ISPL trajectory (plots)
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
    out_dir = Path(out_dir)
    recorder = RoundRecorder(truth_mask, forward=observe)
    source_digest = dataset.dataset_digest()  # hashes every sample: once, for the checkpoints and the metrics
    result = run_defense(dataset.images, dataset.labels, dataset.n_classes, cfg,
                         checkpoint_dir=checkpoint_dir if checkpoint_dir is not None else out_dir / "checkpoints",
                         observe=recorder, progress=progress, device=device, fingerprint=source_digest)
    outputs = write_outputs(dataset, result, out_dir, truth_mask, recorder.events,
                            {"source_digest": source_digest, **(extra_metrics or {})})
    return result, outputs


def write_outputs(dataset: ImageSet, result: DefenseResult, out_dir: Path, truth_mask: np.ndarray | None,
                  events: list[dict], extra_metrics: dict) -> SanitizeOutputs:
    import pyarrow as pa
    import pyarrow.parquet as pq

    keep = result.keep_mask
    removed_idx = np.flatnonzero(~keep)
    removed_idx = removed_idx[np.argsort(-result.suspicion[removed_idx], kind="stable")]
    clean_path, removed_path = out_dir / "clean.parquet", out_dir / "removed.parquet"
    clean_digest = write_dataset(dataset.subset(np.flatnonzero(keep)), clean_path)
    removed_digest = write_dataset(
        dataset.subset(removed_idx), removed_path,
        extra_columns={"suspicion": result.suspicion[removed_idx],
                       "vote_agreement": result.vote_agreement[removed_idx],
                       "refinement_correct": result.refinement_correct[removed_idx]})
    scores = pa.table({
        "sample_id": pa.array(dataset.sample_ids.astype(str).tolist()),
        "label": pa.array(dataset.labels),
        "kept": pa.array(keep),
        "suspicion": pa.array(result.suspicion.astype(np.float64)),
        "vote_agreement": pa.array(result.vote_agreement.astype(np.float64)),
        "refinement_correct": pa.array(result.refinement_correct.astype(np.float64)),
    })
    scores_path = out_dir / "scores.parquet"
    with atomic_output(scores_path) as tmp:
        pq.write_table(scores, tmp)
    n = len(dataset)
    removed_per_class = np.bincount(dataset.labels[~keep], minlength=dataset.n_classes)
    metrics = {
        "n_samples": n,
        "n_kept": int(keep.sum()),
        "n_removed": int((~keep).sum()),
        "removed_fraction": float((~keep).mean()),
        "removed_per_class": {name: int(c) for name, c in zip(dataset.class_names, removed_per_class)},
        "n_learners": len(result.learners),
        "train_sample_passes": int(result.meter.train_samples),
        "inference_sample_passes": int(result.meter.infer_samples),
        "epoch_equivalents": float(result.meter.epoch_equivalents(n)),
        "wall_seconds": float(result.wall_seconds),
        "clean_digest": clean_digest,
        "removed_digest": removed_digest,
    }
    if truth_mask is not None:
        metrics.update(detection_confusion(~keep, truth_mask))
    metrics.update(extra_metrics)
    metrics_path, rounds_path = out_dir / "metrics.json", out_dir / "rounds.json"
    write_text_atomic(rounds_path, json.dumps(_jsonable(events), indent=1))
    write_text_atomic(metrics_path, json.dumps(_jsonable(metrics), indent=2, sort_keys=True))
    return SanitizeOutputs(clean_path, removed_path, scores_path, metrics_path, rounds_path, metrics)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
