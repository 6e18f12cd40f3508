"""The pipeline's steps as file-to-file functions: ingest, poison, cluster, filter, retrain, evaluate, report.

One implementation, two drivers: the DVC stages run them through `incompat step NAME` and the Prefect tasks call
them directly. Each step reads the files of the steps before it (never their Python objects), writes its own
outputs atomically under a `Layout`, and writes a manifest (inputs, outputs, parameters, code version) last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from incompat import lineage
from incompat.config import IngestParams, Params
from incompat.data import DataError, ImageSet, check_unique_ids, read_dataset, write_dataset
from incompat.files import hold_folder, replace_together, write_text_atomic


@dataclass(frozen=True)
class Layout:
    """Where every step's files go under one root. The pipeline layout (data/ for DVC and the evaluate flow)
    has a folder per step; the flat layout (a sanitization run folder) keeps every file in the root."""

    root: Path
    flat: bool = False

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    def _dir(self, step: str) -> Path:
        return self.root if self.flat else self.root / step

    raw = property(lambda self: self._dir("raw"))
    raw_train = property(lambda self: self.raw / ("dataset.parquet" if self.flat else "train.parquet"))
    raw_test = property(lambda self: self.raw / "test.parquet")
    quarantine = property(lambda self: self.raw / "quarantine.json")
    ingest_manifest = property(lambda self: self.raw / "ingest.json")
    poisoned = property(lambda self: self._dir("poisoned"))
    poisoned_train = property(lambda self: self.poisoned / ("poisoned.parquet" if self.flat else "train.parquet"))
    truth = property(lambda self: self.poisoned / "truth.parquet")
    test_triggered = property(lambda self: self.poisoned / "test_triggered.parquet")
    scenario = property(lambda self: self.poisoned / "scenario.yaml")
    poison_manifest = property(lambda self: self.poisoned / "poison.json")
    cluster = property(lambda self: self._dir("cluster"))
    scores = property(lambda self: self.cluster / "scores.parquet")
    rounds = property(lambda self: self.cluster / "rounds.json")
    curves = property(lambda self: self.cluster / "curves.json")
    cluster_manifest = property(lambda self: self.cluster / "cluster.json")
    checkpoints = property(lambda self: self.root / "checkpoints")
    clean_dir = property(lambda self: self._dir("clean"))
    clean = property(lambda self: self.clean_dir / "clean.parquet")
    removed = property(lambda self: self.clean_dir / "removed.parquet")
    metrics = property(lambda self: self.clean_dir / "metrics.json")
    lineage = property(lambda self: self.clean_dir / "lineage.json")
    models = property(lambda self: self._dir("models"))
    model_before = property(lambda self: self.models / "before.pt")
    model_after = property(lambda self: self.models / "after.pt")
    retrain_manifest = property(lambda self: self.models / "retrain.json")
    reports = property(lambda self: self._dir("reports"))
    evaluation = property(lambda self: self.reports / "evaluation.json")
    report_html = property(lambda self: self.reports / "report.html")

    def output_files(self) -> list[Path]:
        """Every file a run writes under this layout (not the checkpoints): what a run replaces as one unit."""
        from incompat.report import FIGURE_NAMES

        files = [self.raw_train, self.raw_test, self.quarantine, self.ingest_manifest, self.poisoned_train,
                 self.truth, self.test_triggered, self.scenario, self.poison_manifest, self.scores, self.rounds,
                 self.curves, self.cluster_manifest, *self.filter_files(), self.model_before, self.model_after,
                 self.retrain_manifest, self.evaluation, self.report_html,
                 *(self.reports / "figures" / name for name in FIGURE_NAMES)]
        return list(dict.fromkeys(files))

    def filter_files(self) -> list[Path]:
        return [self.clean, self.removed, self.metrics, self.lineage]

    def sanitized_input(self) -> Path:
        """The dataset the defense ran on: the poisoned one in an evaluation, the ingested one otherwise."""
        return self.poisoned_train if self.poisoned_train.exists() else self.raw_train

    def truth_if_any(self) -> Path | None:
        return self.truth if self.truth.exists() and self.poisoned_train.exists() else None


@contextlib.contextmanager
def exclusive_run(layout: Layout, lock_dir: str | os.PathLike | None = None) -> Iterator[None]:
    """One run writes a folder at a time, and its outputs land as one unit: the folder (or `lock_dir`, e.g. the
    folder of versions) is locked for the whole block, and a block that fails puts back the finished set the folder
    held before (checkpoints are not part of it: a resumed run still finds them)."""
    with hold_folder(lock_dir if lock_dir is not None else layout.root), \
            replace_together(layout.root, layout.output_files(), "run"):
        yield


# --- ingest -------------------------------------------------------------------------------------------------

def merge(parts: list[tuple[str, ImageSet]]) -> tuple[ImageSet, dict]:
    """Concatenate datasets; a sample whose content digest (pixels + label) is already present is dropped and
    reported, not doubled. The same sample id with different content is an error (ids must stay stable)."""
    first_name, first = parts[0]
    seen_digest: dict[str, str] = {}
    seen_id: dict[str, str] = {}
    keep_parts, report = [], {"duplicates": [], "per_source": {}}
    for name, part in parts:
        if list(part.class_names) != list(first.class_names) or part.image_shape != first.image_shape:
            raise DataError(f"{name}: cannot merge with {first_name}: class names or image shape differ "
                            f"({list(part.class_names)[:5]}... {part.image_shape} vs "
                            f"{list(first.class_names)[:5]}... {first.image_shape})")
        keep = np.ones(len(part), dtype=bool)
        for row, (sid, digest) in enumerate(zip(part.sample_ids.astype(str), part.sample_digests())):
            if digest in seen_digest:
                keep[row] = False
                report["duplicates"].append({"source": name, "row": row, "sample_id": sid,
                                             "duplicate_of": seen_digest[digest]})
                continue
            if sid in seen_id:
                raise DataError(f"{name} row {row}: sample id {sid!r} is already used by a different sample in "
                                f"{seen_id[sid]}; give the batch distinct ids (e.g. a distinct file name)")
            seen_digest[digest], seen_id[sid] = sid, name
        keep_parts.append(part.subset(np.flatnonzero(keep)))
        report["per_source"][name] = {"rows": len(part), "added": int(keep.sum()),
                                      "duplicates": int((~keep).sum())}
    images = np.concatenate([p.images for p in keep_parts])
    labels = np.concatenate([p.labels for p in keep_parts])
    ids = np.concatenate([p.sample_ids.astype(object) for p in keep_parts])
    check_unique_ids(ids, "merged dataset")
    return ImageSet(images, labels, ids, list(first.class_names)), report


def run_ingest(layout: Layout, params: IngestParams, sources: list[str] | None = None,
               test_source: str | None = "params", subset: int | None | str = "params",
               known_digests: dict[str, str] | None = None) -> dict:
    """Read the source(s) (the first one is the base; later ones are incoming batches, merged), take the
    stratified subset when asked, write raw/train.parquet (+ raw/test.parquet) and raw/ingest.json.
    known_digests: source path -> digest the caller already computed (hashing a source is not repeated)."""
    from incompat.readers import read_source, subsample_stratified

    sources = [str(s) for s in (sources or [params.source])]
    test_source = params.test_source if test_source == "params" else test_source
    subset = params.subset if subset == "params" else subset
    size = tuple(params.image_size) if params.image_size else None
    parts, quarantine = [], []
    for source in sources:
        part, skipped = read_source(source, image_size=size, on_bad_sample=params.on_bad_sample)
        parts.append((source, part))
        quarantine += skipped
    dataset, merged = merge(parts) if len(parts) > 1 else (parts[0][1], {"duplicates": [], "per_source": {
        sources[0]: {"rows": len(parts[0][1]), "added": len(parts[0][1]), "duplicates": 0}}})
    n_merged = len(dataset)
    if subset is not None and subset < len(dataset):
        dataset = subsample_stratified(dataset, subset, params.seed)
    meta = {"ingest": {"sources": sources, "subset": subset, "seed": params.seed, "n_skipped": len(quarantine),
                       "n_duplicates": len(merged["duplicates"])}}
    test = None
    if test_source:  # read (and checked) before anything is written: a bad test set leaves the old outputs
        test, test_skipped = read_source(test_source, image_size=size, on_bad_sample=params.on_bad_sample)
        quarantine += test_skipped
    train_digest = write_dataset(dataset, layout.raw_train, metadata=meta)
    outputs = [lineage.reference("train", layout.raw_train, layout.raw, train_digest, "dataset")]
    if test is not None:
        test_digest = write_dataset(test, layout.raw_test, metadata={"ingest": {"sources": [test_source]}})
        outputs.append(lineage.reference("test", layout.raw_test, layout.raw, test_digest, "dataset"))
    if quarantine:
        # the same shape as `incompat ingest`'s quarantine file
        write_text_atomic(layout.quarantine, json.dumps({"sources": sources, "n_skipped": len(quarantine),
                                                         "skipped": quarantine}, indent=1, default=str) + "\n")
        outputs.append(lineage.reference("quarantine", layout.quarantine, layout.raw))
    elif layout.quarantine.exists():
        layout.quarantine.unlink()
    known = known_digests or {}
    inputs = [lineage.reference("base" if i == 0 else "incoming", s, layout.raw, known.get(s))
              for i, s in enumerate(sources)]
    if test_source:
        inputs.append(lineage.reference("test_source", test_source, layout.raw, known.get(test_source)))
    summary = {"n_samples": len(dataset), "n_merged": n_merged, "n_classes": dataset.n_classes,
               "n_skipped": len(quarantine), "n_duplicates": len(merged["duplicates"]),
               "dataset_digest": train_digest}
    lineage.write_manifest(layout.ingest_manifest, "ingest", inputs=inputs, outputs=outputs,
                           params=dataclasses.asdict(params),
                           summary={**summary, "per_source": merged["per_source"],
                                    "duplicates": merged["duplicates"][:1000]})
    return {**summary, "outputs": outputs}


# --- poison -------------------------------------------------------------------------------------------------

def run_poison(layout: Layout, scenario: str) -> dict:
    from incompat.poisoning import write_poisoned
    from incompat.safe_yaml import load_yaml

    test = layout.raw_test if layout.raw_test.exists() else None
    summary = write_poisoned(layout.raw_train, scenario, layout.poisoned, test_path=test)
    inputs = [lineage.reference("clean_train", layout.raw_train, layout.poisoned)]
    if test is not None:
        inputs.append(lineage.reference("clean_test", test, layout.poisoned))
    outputs = [lineage.reference(Path(f).stem, f, layout.poisoned) for f in summary["files"]]
    resolved = load_yaml(layout.scenario.read_text(), str(layout.scenario))
    lineage.write_manifest(layout.poison_manifest, "poison", inputs=inputs, outputs=outputs,
                           params={"scenario": scenario, "resolved": resolved}, summary={
                               k: summary[k] for k in ("scenario", "n_samples", "n_poison", "source", "target")})
    return {**{k: v for k, v in summary.items() if k != "files"}, "outputs": outputs}


# --- cluster and filter -------------------------------------------------------------------------------------

def _truth(layout: Layout, dataset: ImageSet, truth: Path | str | None) -> np.ndarray | None:
    """truth="layout": the poison step's ground truth when there is one; a path: that file; None: none."""
    from incompat.sanitize import read_truth

    path = layout.truth_if_any() if truth == "layout" else truth
    return read_truth(path, dataset) if path is not None else None


def run_cluster(layout: Layout, params: Params, *, truth: Path | str | None = "layout", progress: bool = False,
                observe=None) -> dict:
    """ISPL+B on the sanitized input. Ground truth, when present, only annotates the trajectory (poison still
    kept per round); the defense never reads it. Weak learners are checkpointed under checkpoints/, so a killed
    run resumes at the next learner."""
    from incompat.sanitize import cluster, cluster_cost, write_cluster_outputs

    dataset_path = layout.sanitized_input()
    dataset = read_dataset(dataset_path)
    truth_mask = _truth(layout, dataset, truth)
    result, events, digest = cluster(dataset, params.defense, truth_mask=truth_mask, checkpoint_dir=layout.checkpoints,
                                     progress=progress, observe=observe)
    files = write_cluster_outputs(dataset, result, events, layout.cluster)
    cost = cluster_cost(result, len(dataset))
    summary = {**cost, "n_samples": len(dataset), "n_kept": int(result.keep_mask.sum()),
               "n_removed": int(result.n_removed), "profile": params.profile}
    outputs = [lineage.reference(role, path, layout.cluster) for role, path in files.items()]
    lineage.write_manifest(
        layout.cluster_manifest, "cluster",
        inputs=[lineage.reference("dataset", dataset_path, layout.cluster, digest, "dataset")],
        outputs=outputs, params={"profile": params.profile, "defense": params.defense.to_dict()}, summary=summary)
    return {**summary, "outputs": outputs}


def run_filter(layout: Layout, params: Params, *, truth: Path | str | None = "layout",
               run_context: dict | None = None) -> dict:
    """The filter step; its files (clean, removed, metrics, lineage) are replaced as one unit: a failure part-way
    (a full disk, a refused keep-mask) leaves the set that was there, which still verifies."""
    with replace_together(layout.clean_dir, layout.filter_files(), "filter"):
        return _filter(layout, params, truth=truth, run_context=run_context)


def _filter(layout: Layout, params: Params, *, truth: Path | str | None, run_context: dict | None) -> dict:
    """Split the dataset by the cluster step's keep-mask into clean/removed, count, and write the lineage record
    (run_context: the ids of the MLflow and Prefect runs that produced it, when a flow drives the step)."""
    from incompat.sanitize import read_scores, write_filter_outputs

    dataset_path = layout.sanitized_input()
    dataset = read_dataset(dataset_path)
    scores = read_scores(layout.scores, dataset)
    truth_mask = _truth(layout, dataset, truth)
    cluster_summary = lineage.read_json(layout.cluster_manifest).get("summary", {})
    cost = {k: cluster_summary[k] for k in ("epoch_equivalents", "wall_seconds", "n_learners",
                                            "train_sample_passes", "inference_sample_passes")
            if k in cluster_summary}
    source_digest = read_dataset_digest(dataset_path)
    out = write_filter_outputs(dataset, scores, layout.clean_dir, truth_mask,
                               {"source_digest": source_digest, "profile": params.profile, **cost},
                               metadata={"sanitized_from": source_digest},
                               max_class_removed=params.defense.max_class_removed,
                               allow_class_loss=params.defense.allow_class_loss)
    metrics = out["metrics_values"]
    inputs = [lineage.reference("dataset", dataset_path, layout.clean_dir, source_digest, "dataset"),
              lineage.reference("scores", layout.scores, layout.clean_dir)]
    outputs = [lineage.reference("clean", layout.clean, layout.clean_dir, metrics["clean_digest"], "dataset"),
               lineage.reference("removed", layout.removed, layout.clean_dir, metrics["removed_digest"], "dataset")]
    record = build_lineage(layout, inputs, outputs, params, metrics, run_context or {})
    # sealed, and its content digest written into both datasets' metadata: the data names the record it came with
    lineage.write_record(layout.lineage, record, [layout.clean, layout.removed])
    return {**metrics, "outputs": outputs + [lineage.reference("lineage", layout.lineage, layout.clean_dir)]}


def read_dataset_digest(path: Path) -> str:
    from incompat.data import read_metadata

    return read_metadata(path)["dataset_digest"]


def build_lineage(layout: Layout, inputs: list[dict], outputs: list[dict], params: Params, metrics: dict,
                  run_context: dict) -> dict:
    """The chain of manifests that produced the cleaned dataset, found by following digests backwards from the
    filter step's inputs; every path is made relative to the record, so a copied run folder still verifies."""
    manifest_paths = [p for p in (layout.cluster_manifest, layout.poison_manifest, layout.ingest_manifest)
                      if p.exists()]
    candidates = [lineage.read_json(p) for p in manifest_paths]
    producers = {ref["digest"]: m for m in candidates for ref in m["outputs"]}
    filter_manifest = {"step": "filter", "code": lineage.engine_version(),
                       "params": {}, "inputs": inputs, "outputs": outputs,
                       "summary": {k: metrics[k] for k in ("n_samples", "n_kept", "n_removed") if k in metrics}}
    chain, todo, seen = [filter_manifest], list(inputs), set()
    while todo:
        ref = todo.pop()
        producer = producers.get(ref["digest"])
        if producer is None or id(producer) in seen:
            continue
        seen.add(id(producer))
        chain.append(producer)
        todo += producer["inputs"]
    chain.reverse()
    base = layout.clean_dir.resolve()
    for manifest in chain:
        for ref in manifest["inputs"] + manifest["outputs"]:
            ref["path"] = os.path.relpath(ref["abs"], base)
    # the manifest files themselves, so that the record is chained to them as well as to the data they name
    in_chain = {id(m) for m in chain}
    manifests = [lineage.reference(m["step"], p, base, kind="file") for m, p in zip(candidates, manifest_paths)
                 if id(m) in in_chain]
    scenario = next((m["params"].get("resolved") for m in chain if m["step"] == "poison"), None)
    ingest = next((m for m in chain if m["step"] == "ingest"), None)
    return {
        "lineage_version": lineage.LINEAGE_VERSION,
        "created": lineage.now(),
        "outputs": outputs,
        "sources": ingest["inputs"] if ingest else [],
        "scenario": scenario,
        "params": {"profile": params.profile, "defense": params.defense.to_dict()},
        "code": lineage.code_version(),
        "mlflow_run_id": run_context.get("mlflow_run_id"),
        "prefect_flow_run_id": run_context.get("prefect_flow_run_id"),
        "dvc_stage": run_context.get("dvc_stage"),
        "counts": {k: metrics[k] for k in ("n_samples", "n_kept", "n_removed", "removed_fraction")},
        "removed_per_class": metrics["removed_per_class"],
        "n_skipped_at_ingest": ingest["summary"].get("n_skipped") if ingest else None,
        "n_duplicates_at_ingest": ingest["summary"].get("n_duplicates") if ingest else None,
        "chain": chain,
        "manifests": manifests,
    }


# --- retrain and evaluate -----------------------------------------------------------------------------------

def save_model(model, path: Path, train_cfg, num_classes: int, in_channels: int, mean, std) -> None:
    import torch

    from incompat.files import atomic_output

    state = {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "model": train_cfg.model, "width": train_cfg.width, "num_classes": num_classes,
             "in_channels": in_channels, "mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    with atomic_output(path) as tmp:
        torch.save(state, tmp)


def load_model(path: Path):
    """weights_only=True: a model file is data like any other and must not be able to run code."""
    import torch

    from incompat.models import build_model

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = build_model(state["model"], state["num_classes"], in_channels=state["in_channels"],
                            width=state["width"])
        model.load_state_dict(state["state_dict"])
    except FileNotFoundError:
        raise DataError(f"{path}: no such model file") from None
    except Exception as exc:
        raise DataError(f"{path}: not a model file written by `incompat` ({exc})") from None
    return model, state


def run_retrain(layout: Layout, params: Params, progress: bool = False, before: bool = True) -> dict:
    """Train the final model on the kept set (models/after.pt) and, to measure what the defense changed, the
    same recipe on the whole poisoned set (models/before.pt)."""
    from incompat.training import ComputeMeter, TensorData, fit

    runs = [("after", layout.clean, layout.model_after)]
    if before:
        runs.insert(0, ("before", layout.sanitized_input(), layout.model_before))
    summary, inputs, outputs = {}, [], []
    for name, train_path, model_path in runs:
        train = read_dataset(train_path)
        data = TensorData(train.images, train.labels, num_classes=train.n_classes)
        meter, t0 = ComputeMeter(), time.monotonic()
        train_cfg = params.train.for_classes(train.class_names)
        model = fit(data, train_cfg, meter=meter, progress=progress)
        save_model(model, model_path, train_cfg, train.n_classes, data.image_shape[0], data.mean, data.std)
        summary[f"train_seconds_{name}"] = time.monotonic() - t0
        summary[f"train_size_{name}"] = len(train)
        inputs.append(lineage.reference(f"train_{name}", train_path, layout.models))
        outputs.append(lineage.reference(f"model_{name}", model_path, layout.models))
    lineage.write_manifest(layout.retrain_manifest, "retrain", inputs=inputs, outputs=outputs,
                           params=params.train.to_dict(), summary=summary)
    return {**summary, "outputs": outputs}


def run_evaluate(layout: Layout, params: Params) -> dict:
    """Clean accuracy on the test set; attack success and targeted misclassification on its triggered copy."""
    from incompat.evaluation import evaluate
    from incompat.safe_yaml import load_yaml
    from incompat.training import TensorData

    test = read_dataset(layout.raw_test)
    triggered = read_dataset(layout.test_triggered) if layout.test_triggered.exists() else None
    target, report = None, {}
    if layout.scenario.exists():
        scenario = load_yaml(layout.scenario.read_text(), str(layout.scenario))
        target, report["scenario"] = scenario["attack"]["target"], scenario["name"]
    retrain = lineage.read_json(layout.retrain_manifest).get("summary", {}) if layout.retrain_manifest.exists() \
        else {}
    for name, path in (("before", layout.model_before), ("after", layout.model_after)):
        if not path.exists():
            continue
        model, state = load_model(path)
        # Only the normalisation of the training set is needed to evaluate: a 1-image stand-in carries it.
        stand_in = TensorData(test.images[:1], test.labels[:1], mean=state["mean"], std=state["std"],
                              num_classes=state["num_classes"])
        model = model.to(stand_in.device)
        ev = evaluate(model, stand_in, test, triggered, target, retrain.get(f"train_size_{name}", 0))
        for key, value in ev.as_dict().items():
            report[f"{key}_{name}"] = value
        if f"train_seconds_{name}" in retrain:
            report[f"seconds_{name}"] = retrain[f"train_seconds_{name}"]
    write_text_atomic(layout.evaluation, json.dumps(report, indent=2) + "\n")
    return {**report, "outputs": [lineage.reference("evaluation", layout.evaluation, layout.reports)]}


# --- report -------------------------------------------------------------------------------------------------

def run_report(layout: Layout, params_path: Path | None = None, title: str | None = None,
               truth: Path | None = None) -> dict:
    """`truth`: ground truth given to the run (sanitize --truth); by default the poison step's, if any."""
    from incompat.report import ReportSources, write_report

    def present(path: Path) -> Path | None:
        return path if path.exists() else None

    sources = ReportSources(
        dataset=layout.sanitized_input(), scores=layout.scores, metrics=present(layout.metrics),
        rounds=present(layout.rounds), truth=truth or layout.truth_if_any(), evaluation=present(layout.evaluation),
        lineage=present(layout.lineage), params=params_path if params_path and params_path.exists() else None,
        baselines=None)
    paths = write_report(sources, layout.reports, title=title)
    return {"html": str(paths["html"]), "figures": [str(p) for p in paths.get("figures", [])],
            "outputs": [lineage.reference("report", paths["html"], layout.reports)]}


STEPS = ("ingest", "poison", "cluster", "filter", "retrain", "evaluate", "report")
