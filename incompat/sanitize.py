"""From a dataset to its sanitized outputs: run ISPL+B, split kept/removed, score, count, write.

Two steps, each with its own outputs (written atomically), so the pipeline can cache and rerun them apart:
cluster -> scores.parquet, rounds.json, curves.json; filter -> clean.parquet, removed.parquet, metrics.json.
  clean.parquet    the kept samples (canonical format)
  removed.parquet  the removed samples, with their suspicion scores, most suspicious first
  scores.parquet   sample_id, label, kept, suspicion, vote_agreement, refinement_correct for every sample
  metrics.json     numbers only (a DVC metric): counts, per-class loss, cost and time; with ground truth also
                   poison_total/poison_removed/clean_removed. Digests, the profile and the removals per class are
                   in lineage.json.
  rounds.json      the raw trajectory: every ISPL round of every weak learner, the vote, the refinement rounds
  curves.json      what the defense keeps after the vote and after each refinement round, as shares of all samples
                   (one meaning per axis: the learners' ISPL rounds are shares of their own active sets, so they
                   stay in rounds.json)

The filter step refuses a keep-mask that removes a whole class, or more than `max_class_removed` of any class,
before it writes anything (ClassLossError), unless `allow_class_loss`: weak learners that never learned a class
call all of it wrong, and a clean set without that class is a silently broken dataset, not a sanitized one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from incompat.data import DataError, ImageSet, write_dataset
from incompat.files import atomic_output, write_text_atomic
from incompat.ispl import DefenseConfig, DefenseResult, run_defense
from incompat.metrics import detection_confusion

log = logging.getLogger(__name__)


class ClassLossError(DataError):
    """The keep-mask removes a whole class, or more of a class than the defense may: nothing was written."""


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
        if self.poison_mask is not None and "suspect_indices" in info:  # the trigger stage's suspects
            record["poison_suspected"] = int(self.poison_mask[info["suspect_indices"]].sum())
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
                                   {"source_digest": source_digest, **cost, **(extra_metrics or {})},
                                   max_class_removed=cfg.max_class_removed, allow_class_loss=cfg.allow_class_loss)
    return result, SanitizeOutputs(outputs["clean"], outputs["removed"], cluster_files["scores"],
                                   outputs["metrics"], cluster_files["rounds"], outputs["metrics_values"])


def cluster(dataset: ImageSet, cfg: DefenseConfig, *, truth_mask: np.ndarray | None = None,
            checkpoint_dir: str | os.PathLike | None = None, progress: bool = False, device: str | None = None,
            observe=None) -> tuple[DefenseResult, list[dict], str]:
    """Run ISPL+B; returns the result, the per-round events (with poison still kept when a truth mask is given:
    the defense itself never sees it) and the dataset digest the checkpoints are keyed by."""
    cfg = cfg.for_classes(dataset.class_names)
    # The class-loss guard acts in the filter step only: at its defaults here, so that overriding it after a
    # refusal reuses the checkpointed refinement instead of running it again.
    cfg = dataclasses.replace(cfg, max_class_removed=DefenseConfig.max_class_removed,
                              allow_class_loss=DefenseConfig.allow_class_loss)
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
    """What the defense keeps, as a share of all samples: step 0 after the vote, step r + 1 after refinement round
    r (from the round itself, so a resumed run that did not replay the early rounds leaves a gap, not a shift).
    The learners' ISPL rounds measure a share of each learner's own active set: another axis, left to rounds.json."""
    records = []
    for event in events:
        if event["kind"] not in ("vote", "refinement"):
            continue
        fraction = float(event["kept_fraction"])
        record = {"step": 0 if event["kind"] == "vote" else int(event["round"]) + 1, "stage": event["kind"],
                  "kept": int(event.get("kept", round(fraction * n_samples))), "kept_fraction": fraction}
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


def class_loss(dataset: ImageSet, keep_mask: np.ndarray, max_class_removed: float, allow_class_loss: bool,
               clean_path: Path) -> dict:
    """The share of each class the keep-mask removes. A class removed whole, or beyond `max_class_removed`, stops
    the filter step (ClassLossError naming the classes and shares) unless `allow_class_loss`; the numbers returned
    are metrics either way (class_loss_overridden = 1 when the guard was overridden)."""
    total = np.bincount(dataset.labels, minlength=dataset.n_classes)
    removed = np.bincount(dataset.labels[~keep_mask], minlength=dataset.n_classes)
    share = removed / np.maximum(total, 1)
    emptied = (total > 0) & (removed == total)
    over = np.flatnonzero(emptied | (share > max_class_removed))
    over = over[np.argsort(-share[over], kind="stable")]
    detail = ", ".join(f"{dataset.class_names[c]!r} {removed[c]}/{total[c]} ({share[c]:.0%}"
                       f"{', the whole class' if emptied[c] else ''})" for c in over)
    if len(over) and not allow_class_loss:
        raise ClassLossError(
            f"{clean_path}: not written: the keep-mask removes {len(over)} class(es) whole or beyond "
            f"defense.max_class_removed={max_class_removed:g}: {detail}. Weak learners that never learned a class "
            "call all of it wrong (train them longer, e.g. learner_train.epochs or core_epochs); to keep this "
            "keep-mask anyway set defense.allow_class_loss=true (--set allow_class_loss=true)")
    if len(over):
        log.warning("%s: class-loss guard overridden (allow_class_loss): %s", clean_path, detail)
    return {"max_class_removed_fraction": float(share.max()) if len(share) else 0.0,
            "n_classes_emptied": int(emptied.sum()), "n_classes_over_limit": int(len(over)),
            "class_loss_overridden": int(len(over) > 0)}


def numeric_metrics(metrics: dict) -> dict:
    """The numbers of a metrics dict (bools as 0/1), what metrics.json holds: `dvc metrics show` and `dvc exp
    show` get one column per number; digests, names and per-class tables belong in lineage.json."""
    return {k: int(v) if isinstance(v, bool) else v for k, v in _jsonable(metrics).items()
            if isinstance(v, (int, float))}


def write_filter_outputs(dataset: ImageSet, scores: Scores, out_dir: str | os.PathLike,
                         truth_mask: np.ndarray | None, extra_metrics: dict,
                         metadata: dict | None = None, *,
                         max_class_removed: float = DefenseConfig.max_class_removed,
                         allow_class_loss: bool = DefenseConfig.allow_class_loss) -> dict:
    """clean.parquet, removed.parquet (most suspicious first, with the scores) and metrics.json; the class-loss
    guard runs first, so a refused keep-mask leaves every output as it was."""
    out_dir = Path(out_dir)
    keep = scores.keep_mask
    guard = class_loss(dataset, keep, max_class_removed, allow_class_loss, out_dir / "clean.parquet")
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
    metrics.update(guard)
    if truth_mask is not None:
        metrics.update(detection_confusion(~keep, truth_mask))
    metrics.update(extra_metrics)
    metrics_path = out_dir / "metrics.json"
    write_text_atomic(metrics_path, json.dumps(numeric_metrics(metrics), indent=2, sort_keys=True))
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
