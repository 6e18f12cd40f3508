"""A self-contained static HTML report of one sanitization, so a person can decide whether to trust a removal.

    sources = ReportSources.discover("data")          # or ReportSources(dataset=..., scores=..., ...)
    paths = write_report(sources, "data/reports")      # report.html + figures/*.png

The HTML needs no network and no other file: every image (sample tiles, figures) is embedded as a base64 data
URI, the styles are inline and a Content-Security-Policy forbids scripts and remote loads. The figures are also
written as PNG files (`figures/`) for MLflow / DVC. Every string that comes from data (class names, sample ids,
lineage values) is HTML-escaped.

Sections (each an element with a stable id; see SECTION_IDS, in page order): summary, notes, per-class, detection,
evaluation, baselines, parameters, suspicious, trajectory, score-distribution, lineage. Always present: summary,
notes, per-class, suspicious, score-distribution; the others appear only when their input exists.

Engine layer: numpy, pyarrow, matplotlib (Agg, no pyplot) and PIL only.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from incompat.data import DataError, ImageSet, read_dataset, read_metadata
from incompat.files import atomic_output, read_json
from incompat.metrics import detection_confusion

SECTION_IDS = ("summary", "notes", "per-class", "detection", "evaluation", "baselines", "parameters",
               "suspicious", "trajectory", "score-distribution", "lineage")
FIGURE_NAMES = ("suspicious.png", "trajectory.png", "score-distribution.png")

# Standard file names, searched in the run directory and then its immediate subdirectories (sorted).
_DATASET_CANDIDATES = ("dataset.parquet", "poisoned/train.parquet", "raw/train.parquet", "train.parquet")
_STANDARD_NAMES = {
    "scores": "scores.parquet",
    "metrics": "metrics.json",
    "rounds": "rounds.json",
    "truth": "truth.parquet",
    "evaluation": "evaluation.json",
    "lineage": "lineage.json",
    "params": "params.yaml",
    "baselines": "baselines.csv",
}
_TILE_TARGET_PX = 128  # tiles are enlarged by an integer factor (nearest neighbour) to about this size


class ReportError(ValueError):
    """A report cannot be made from these inputs. The message names the run directory / file and the problem."""


@dataclass
class ReportSources:
    """The files a report is made from; every path but `dataset` and `scores` is optional."""

    dataset: Path
    scores: Path
    metrics: Path | None = None
    rounds: Path | None = None
    truth: Path | None = None
    evaluation: Path | None = None
    lineage: Path | None = None
    params: Path | None = None
    baselines: Path | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                setattr(self, f.name, Path(value))

    @classmethod
    def discover(cls, run_dir: str | os.PathLike) -> "ReportSources":
        """Find the standard file names in `run_dir` and its immediate subdirectories.

        The dataset is `dataset.parquet`, `poisoned/train.parquet`, `raw/train.parquet` or `train.parquet` (in that
        order of preference); where several exist and metrics.json records the `source_digest` of the sanitized
        dataset, the one with that digest wins."""
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise ReportError(f"{run_dir}: no such run directory")
        dirs = [run_dir] + sorted(p for p in run_dir.iterdir() if p.is_dir() and not p.name.startswith("."))

        def find(name: str) -> Path | None:
            for d in dirs:
                if (d / name).is_file():
                    return d / name
            return None

        found = {key: find(name) for key, name in _STANDARD_NAMES.items()}
        if found["params"] is None:
            found["params"] = find("params.json")
        if found["scores"] is None:
            raise ReportError(f"{run_dir}: no scores.parquet in it or its subdirectories (the sanitize step "
                              "writes one; is this the right run directory?)")
        candidates = [run_dir / c for c in _DATASET_CANDIDATES if (run_dir / c).is_file()]
        candidates += [d / "dataset.parquet" for d in dirs[1:] if (d / "dataset.parquet").is_file()]
        if not candidates:
            raise ReportError(f"{run_dir}: no dataset file (dataset.parquet, poisoned/train.parquet, "
                              "raw/train.parquet or train.parquet) in it or its subdirectories")
        dataset = candidates[0]
        metrics = _load_json(found["metrics"]) if found["metrics"] else {}
        source_digest = _recorded(metrics if isinstance(metrics, dict) else {},
                                  _load_json(found["lineage"]) if found["lineage"] else None).get("source_digest")
        if source_digest and len(candidates) > 1:
            for candidate in candidates:
                try:
                    if read_metadata(candidate).get("dataset_digest") == source_digest:
                        dataset = candidate
                        break
                except DataError:
                    continue
        return cls(dataset=dataset, **found)


# ----------------------------------------------------------------------------------------------- loading inputs


@dataclass
class _Run:
    dataset: ImageSet
    rows: np.ndarray          # for each score row, its row in the dataset
    labels: np.ndarray        # label per score row (from the dataset)
    kept: np.ndarray          # bool per score row
    suspicion: np.ndarray     # float per score row
    vote_agreement: np.ndarray | None
    refinement_correct: np.ndarray | None
    sample_ids: np.ndarray    # str per score row
    poison: np.ndarray | None  # bool per score row (ground truth) or None
    metrics: dict
    rounds: list[dict] | None
    evaluation: dict | None
    lineage: dict | None
    params: Any
    baselines: list[dict[str, str]] | None
    notes: list[str]


def _load_json(path: Path) -> Any:
    return read_json(path, ReportError)


def _recorded(metrics: dict, record: Any) -> dict:
    """The profile and the digests of the sanitized, clean and removed datasets. metrics.json holds numbers only,
    so they come from lineage.json (a metrics.json written before that may still hold them: it wins)."""
    found = {k: metrics[k] for k in ("source_digest", "clean_digest", "removed_digest", "profile")
             if isinstance(metrics.get(k), str)}
    if not isinstance(record, dict):
        return found

    def by_role(refs: Any) -> dict:
        return {ref.get("role"): ref.get("digest") for ref in refs if isinstance(ref, dict)} \
            if isinstance(refs, list) else {}

    outputs = by_role(record.get("outputs"))
    chain = record.get("chain") if isinstance(record.get("chain"), list) else []
    step = next((m for m in chain if isinstance(m, dict) and m.get("step") == "filter"), {})
    params = record.get("params") if isinstance(record.get("params"), dict) else {}
    for key, value in (("source_digest", by_role(step.get("inputs")).get("dataset")),
                       ("clean_digest", outputs.get("clean")), ("removed_digest", outputs.get("removed")),
                       ("profile", params.get("profile"))):
        if isinstance(value, str):
            found.setdefault(key, value)
    return found


def _load_params(path: Path) -> Any:
    if path.suffix.lower() == ".json":
        return _load_json(path)
    from incompat.safe_yaml import YamlInputError, load_yaml

    try:
        return load_yaml(path.read_text(), str(path))
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file") from None
    except (OSError, YamlInputError) as exc:
        raise ReportError(f"{path}: not readable YAML ({exc})") from None


def _load_baselines(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as fh:
            rows = [dict(r) for r in csv.DictReader(fh)]
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file") from None
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: not a readable CSV file ({exc})") from None
    return [{str(k): ("" if v is None else str(v)) for k, v in r.items() if k is not None} for r in rows]


def _read_table(path: Path, what: str, required: Sequence[str]):
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        raise ReportError(f"{path}: no such file (the {what})")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a non-Parquet file
        raise ReportError(f"{path}: not a readable Parquet file ({exc})") from None
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise ReportError(f"{path}: the {what} lacks column(s) {missing}")
    return table


def _load_run(sources: ReportSources) -> _Run:
    if not Path(sources.scores).is_file():
        raise ReportError(f"{sources.scores}: no such file (scores.parquet: the per-sample scores of the run)")
    try:
        dataset = read_dataset(sources.dataset)
    except DataError as exc:
        raise ReportError(str(exc)) from None
    table = _read_table(sources.scores, "scores", ("sample_id", "kept", "suspicion"))
    sample_ids = np.asarray(table.column("sample_id").to_pylist(), dtype=object)
    position = {sid: i for i, sid in enumerate(dataset.sample_ids)}
    rows = np.fromiter((position.get(sid, -1) for sid in sample_ids), dtype=np.int64, count=len(sample_ids))
    if (rows < 0).any():
        bad = int(np.flatnonzero(rows < 0)[0])
        raise ReportError(f"{sources.scores} row {bad}: sample {sample_ids[bad]!r} is not in the dataset "
                          f"{sources.dataset} ({int((rows < 0).sum())} such row(s)); wrong dataset for these scores?")
    notes: list[str] = []
    labels = dataset.labels[rows]
    if "label" in table.column_names:
        score_labels = np.asarray(table.column("label").to_numpy(zero_copy_only=False), dtype=np.int64)
        if (score_labels != labels).any():
            notes.append(f"{int((score_labels != labels).sum())} sample(s) have a different label in the scores "
                         "than in the dataset: the dataset may not be the one that was sanitized.")
    kept = np.asarray(table.column("kept").to_numpy(zero_copy_only=False), dtype=bool)
    suspicion = np.asarray(table.column("suspicion").to_numpy(zero_copy_only=False), dtype=np.float64)

    def optional(name: str) -> np.ndarray | None:
        if name not in table.column_names:
            return None
        return np.asarray(table.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)

    poison = None
    if sources.truth is not None:
        truth_table = _read_table(sources.truth, "ground truth", ("sample_id", "is_poison"))
        truth = dict(zip(truth_table.column("sample_id").to_pylist(), truth_table.column("is_poison").to_pylist()))
        missing = [sid for sid in sample_ids if sid not in truth]
        if missing:
            raise ReportError(f"{sources.truth}: no ground truth for {len(missing)} sample(s), e.g. {missing[0]!r}")
        poison = np.array([bool(truth[sid]) for sid in sample_ids], dtype=bool)

    metrics = _load_json(sources.metrics) if sources.metrics else {}
    if not isinstance(metrics, dict):
        raise ReportError(f"{sources.metrics}: expected a JSON object")
    lineage = _load_json(sources.lineage) if sources.lineage else None
    if lineage is not None and not isinstance(lineage, dict):
        lineage = {"lineage": lineage}
    metrics = {**metrics, **_recorded(metrics, lineage)}
    source_digest = metrics.get("source_digest")
    dataset_digest = (read_metadata(sources.dataset) or {}).get("dataset_digest")
    if source_digest and dataset_digest and source_digest != dataset_digest:
        notes.append(f"The dataset's digest ({dataset_digest[:12]}…) differs from the digest of the dataset that "
                     f"was sanitized ({source_digest[:12]}…): the images shown may not be the ones scored.")
    rounds = _load_json(sources.rounds) if sources.rounds else None
    if rounds is not None and not (isinstance(rounds, list) and all(isinstance(e, dict) for e in rounds)):
        raise ReportError(f"{sources.rounds}: expected a JSON list of event objects")
    evaluation = _load_json(sources.evaluation) if sources.evaluation else None
    if evaluation is not None and not isinstance(evaluation, dict):
        raise ReportError(f"{sources.evaluation}: expected a JSON object")
    return _Run(
        dataset=dataset, rows=rows, labels=labels, kept=kept, suspicion=suspicion,
        vote_agreement=optional("vote_agreement"), refinement_correct=optional("refinement_correct"),
        sample_ids=np.asarray([str(s) for s in sample_ids], dtype=object), poison=poison, metrics=metrics,
        rounds=rounds, evaluation=evaluation, lineage=lineage,
        params=_load_params(sources.params) if sources.params else None,
        baselines=_load_baselines(sources.baselines) if sources.baselines else None, notes=notes,
    )


# ------------------------------------------------------------------------------------------------- formatting

_PERCENT_HINTS = ("recall", "precision", "accuracy", "asr", "acc_", "_acc", "rate", "fraction", "misclassification")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _is_percent_key(key: str) -> bool:
    key = key.lower()
    return any(h in key for h in _PERCENT_HINTS) or key in ("acc", "asr")


def _fmt(value: Any, key: str = "") -> str:
    """A value as readable text (not escaped)."""
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        if math.isnan(number):
            return "—"
        value = int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return "—"
        if _is_percent_key(key) and 0.0 <= value <= 1.0:
            return f"{100 * value:.1f}%"
        if value.is_integer() and abs(value) < 1e15:
            return f"{int(value):,}"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return str(value)


def _seconds(value: Any) -> str:
    try:
        s = float(value)
    except (TypeError, ValueError):
        return "—"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        if not value and prefix:
            return [(prefix, "{}")]
        out: list[tuple[str, Any]] = []
        for k, v in value.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return [(prefix or "value", value)]


def _kv_table(pairs: Iterable[tuple[str, Any]], cls: str = "kv") -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_fmt(v, k))}</td></tr>" for k, v in pairs)
    return f'<table class="{cls}"><tbody>{rows}</tbody></table>'


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _to_pil(pixels: np.ndarray):
    from PIL import Image

    if pixels.shape[2] == 1:
        return Image.fromarray(np.ascontiguousarray(pixels[:, :, 0]))  # L
    if pixels.shape[2] == 4:
        return Image.fromarray(np.ascontiguousarray(pixels))  # RGBA
    return Image.fromarray(np.ascontiguousarray(pixels[:, :, :3]))  # RGB


def _tile_scale(height: int, width: int) -> int:
    return max(1, min(16, _TILE_TARGET_PX // max(1, height, width)))


def _enlarge(pixels: np.ndarray, scale: int):
    from PIL import Image

    img = _to_pil(pixels)
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)


def _mpl_text(text: Any) -> str:
    """Text safe for matplotlib (no mathtext)."""
    return str(text).replace("$", r"\$")


# --------------------------------------------------------------------------------------------------- sections


def _class_order(run: _Run) -> tuple[list[int], np.ndarray, np.ndarray]:
    n_classes = run.dataset.n_classes
    removed = np.bincount(run.labels[~run.kept], minlength=n_classes)
    total = np.bincount(run.labels, minlength=n_classes)
    with_removals = [c for c in sorted(range(n_classes), key=lambda c: (-removed[c], c)) if removed[c] > 0]
    return with_removals, removed, total


def _tie_key(sample_id: str) -> str:
    """Order among equal scores: a stable hash of the sample id. Not the id itself: ids follow ingest order, which
    can correlate with the ground truth (poisons relabelled from one source class sit together), and the page would
    then look better or worse than the scorer is."""
    return hashlib.sha256(sample_id.encode()).hexdigest()


def _top_indices(run: _Run, cls: int, top_k: int) -> np.ndarray:
    """Score rows of class `cls`, most suspicious first (ties: see _tie_key), at most top_k."""
    members = np.flatnonzero(run.labels == cls)
    ties = np.array([_tie_key(sid) for sid in run.sample_ids[members]], dtype=object)
    order = np.lexsort((ties, -run.suspicion[members]))
    return members[order][:top_k]


def _summary(run: _Run, sources: ReportSources) -> str:
    m = run.metrics
    ds = run.dataset
    n = len(run.kept)
    n_removed = int((~run.kept).sum())
    h, w, c = ds.image_shape if len(ds) else (0, 0, 0)
    cards = [("samples", f"{n:,}"), ("kept", f"{n - n_removed:,}"),
             ("removed", f"{n_removed:,} ({100 * n_removed / max(n, 1):.1f}%)")]
    if "epoch_equivalents" in m:
        cards.append(("cost", f"{_fmt(float(m['epoch_equivalents']))} epoch-equivalents"))
    if "wall_seconds" in m:
        cards.append(("wall time", _seconds(m["wall_seconds"])))
    if m.get("profile"):
        cards.append(("profile", str(m["profile"])))
    if run.poison is not None:
        poison_removed = int((run.poison & ~run.kept).sum())
        cards.append(("poison removed", f"{poison_removed:,} of {int(run.poison.sum()):,}"))
    card_html = "".join(f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div></div>'
                        for k, v in cards)
    info = [("dataset file", str(sources.dataset)), ("images", f"{len(ds):,} × {h}×{w}×{c}"),
            ("classes", len(ds.class_names)), ("dataset digest", (read_metadata(sources.dataset) or {}).get(
                "dataset_digest", "—"))]
    for key in ("scenario",):
        if ds.extra_metadata.get(key):
            info.append((key, ds.extra_metadata[key]))
    ingest = ds.extra_metadata.get("ingest")
    if isinstance(ingest, dict) and ingest.get("source"):
        info.append(("ingested from", ingest["source"]))
    for key in ("source_digest", "clean_digest", "removed_digest"):
        if m.get(key):
            info.append((key.replace("_", " "), m[key]))
    return (f'<section id="summary"><h2>Summary</h2><div class="cards">{card_html}</div>'
            f'{_kv_table(info)}</section>')


def _per_class(run: _Run) -> str:
    order, removed, total = _class_order(run)
    n_classes = run.dataset.n_classes
    rest = [c for c in range(n_classes) if c not in order]
    head = "<th>class</th><th>samples</th><th>kept</th><th>removed</th><th>removed share</th>"
    if run.poison is not None:
        head += "<th>poison</th><th>poison removed</th>"
    body = []
    for cls in order + rest:
        share = removed[cls] / total[cls] if total[cls] else 0.0
        row = (f"<td>{_e(run.dataset.class_names[cls])}</td><td>{total[cls]:,}</td>"
               f"<td>{total[cls] - removed[cls]:,}</td><td>{removed[cls]:,}</td>"
               f'<td><div class="bar"><span style="width:{100 * share:.1f}%"></span></div>{100 * share:.1f}%</td>')
        if run.poison is not None:
            in_class = run.labels == cls
            row += (f"<td>{int((run.poison & in_class).sum()):,}</td>"
                    f"<td>{int((run.poison & in_class & ~run.kept).sum()):,}</td>")
        body.append(f"<tr>{row}</tr>")
    return (f'<section id="per-class"><h2>Kept and removed per class</h2>'
            f'<p class="hint">Classes with the most removals first.</p>'
            f'<table class="grid-table"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
            f"</section>")


def _notes(run: _Run) -> str:
    notes = list(run.notes)
    n = len(run.kept)
    removed_share = float((~run.kept).mean()) if n else 0.0
    if removed_share > 0.25:
        notes.append(f"{100 * removed_share:.1f}% of the dataset was removed: far more than a typical poisoning "
                     "rate (a few percent). Most removed samples are likely clean.")
    _, removed, total = _class_order(run)
    emptied = [run.dataset.class_names[c] for c in range(len(total)) if total[c] and removed[c] == total[c]]
    if run.metrics.get("class_loss_overridden") == 1:
        shares = sorted(((removed[c] / total[c], c) for c in range(len(total)) if total[c]), reverse=True)
        worst = ", ".join(f"{run.dataset.class_names[c]} {100 * share:.0f}%" for share, c in shares[:5])
        notes.append("The class-loss guard was overridden (defense.allow_class_loss): the filter step kept a "
                     f"keep-mask that removes {run.metrics.get('n_classes_over_limit', 'some')} class(es) whole or "
                     f"beyond defense.max_class_removed. Most removed: {worst}.")
    if emptied:
        notes.append(f"Every sample of {len(emptied)} class(es) was removed: {', '.join(emptied[:10])}"
                     f"{' …' if len(emptied) > 10 else ''}. A model retrained on the kept set cannot learn them.")
    ev = run.evaluation or {}
    try:
        before, after = float(ev["clean_accuracy_before"]), float(ev["clean_accuracy_after"])
        if before - after > 0.05:
            notes.append(f"Clean accuracy fell from {100 * before:.1f}% to {100 * after:.1f}% after retraining on "
                         "the kept set.")
    except (KeyError, TypeError, ValueError):
        pass
    if run.poison is not None and run.poison.any():
        recall = float((run.poison & ~run.kept).sum() / run.poison.sum())
        if recall < 0.9:
            notes.append(f"Only {100 * recall:.1f}% of the true poison was removed "
                         f"({int((run.poison & run.kept).sum())} poisoned sample(s) kept).")
    if not notes:
        return ('<section id="notes"><h2>Things to check</h2><p class="ok">The automatic checks (share removed, '
                "emptied classes, accuracy after retraining, poison recall where ground truth is known, "
                "dataset identity) found nothing unusual. Look at the samples below all the same.</p></section>")
    items = "".join(f"<li>{_e(t)}</li>" for t in notes)
    return f'<section id="notes"><h2>Things to check</h2><ul class="notes">{items}</ul></section>'


def _parameters(run: _Run, sources: ReportSources) -> str:
    if run.params is None:
        return ""
    pairs = _flatten(run.params) if isinstance(run.params, dict) else [("value", run.params)]
    return (f'<section id="parameters"><h2>Parameters</h2><details><summary>{len(pairs)} parameter(s) from '
            f"{_e(sources.params)}</summary>{_kv_table(pairs)}</details></section>")


def _detection_counts(run: _Run) -> dict | None:
    if run.poison is not None:
        return detection_confusion(~run.kept, run.poison)
    m = run.metrics
    if all(k in m for k in ("poison_total", "poison_removed", "clean_removed")):
        counts = {k: m[k] for k in ("poison_total", "poison_removed", "clean_removed", "clean_total", "recall",
                                    "precision") if k in m}
        counts.setdefault("clean_total", int(m.get("n_samples", len(run.kept))) - int(m["poison_total"]))
        return counts
    return None


def _detection(run: _Run) -> str:
    d = _detection_counts(run)
    if d is None:
        return ""
    pt, pr, ct, cr = (int(d[k]) for k in ("poison_total", "poison_removed", "clean_total", "clean_removed"))
    recall = d.get("recall", pr / pt if pt else 1.0)
    precision = d.get("precision", pr / (pr + cr) if pr + cr else 1.0)
    source = "truth.parquet" if run.poison is not None else "metrics.json"
    table = ("<table class=\"confusion\"><thead><tr><th></th><th>removed</th><th>kept</th><th>total</th></tr>"
             f"</thead><tbody><tr><th>poison</th><td class=\"good\">{pr:,}</td><td class=\"bad\">{pt - pr:,}</td>"
             f"<td>{pt:,}</td></tr><tr><th>clean</th><td class=\"bad\">{cr:,}</td><td class=\"good\">{ct - cr:,}</td>"
             f"<td>{ct:,}</td></tr></tbody></table>")
    figures = _kv_table([("recall (poison removed)", f"{100 * float(recall):.1f}%"),
                         ("precision (removed that is poison)", f"{100 * float(precision):.2f}%"),
                         ("clean removed", f"{100 * cr / ct:.1f}%" if ct else "—")])
    return (f'<section id="detection"><h2>Detection against ground truth</h2>'
            f'<p class="hint">From {_e(source)}: ground truth is used for evaluation only; the defense never '
            f'reads it.</p><div class="row">{table}{figures}</div></section>')


def _evaluation(run: _Run) -> str:
    ev = run.evaluation
    if ev is None:
        return ""
    rows = []
    for label, key in (("clean accuracy", "clean_accuracy"), ("attack success rate", "attack_success_rate"),
                       ("targeted misclassification", "targeted_misclassification"),
                       ("training set size", "train_size"), ("training time", "seconds")):
        before, after = ev.get(f"{key}_before"), ev.get(f"{key}_after")
        if before is None and after is None:
            continue
        if key == "seconds":
            b, a, delta = _seconds(before), _seconds(after), ""
        else:
            b, a = _fmt(before, key), _fmt(after, key)
            try:
                diff = float(after) - float(before)
                delta = f"{100 * diff:+.1f} pts" if _is_percent_key(key) else f"{diff:+,.0f}"
            except (TypeError, ValueError):
                delta = ""
        rows.append(f"<tr><th>{_e(label)}</th><td>{_e(b)}</td><td>{_e(a)}</td><td>{_e(delta)}</td></tr>")
    other = [(k, v) for k, v in ev.items() if not (k.endswith("_before") or k.endswith("_after")) and k != "scenario"]
    scenario = f'<p class="hint">Scenario: {_e(ev["scenario"])}</p>' if ev.get("scenario") else ""
    table = ("<table class=\"grid-table\"><thead><tr><th></th><th>before (all data)</th>"
             "<th>after (kept set)</th><th>change</th></tr></thead>"
             f"<tbody>{''.join(rows)}</tbody></table>")
    return (f'<section id="evaluation"><h2>Retraining: before and after</h2>{scenario}{table}'
            f"{_kv_table(other) if other else ''}</section>")


def _baselines(run: _Run) -> str:
    if not run.baselines:
        return ""
    columns: list[str] = []
    for r in run.baselines:
        columns += [k for k in r if k not in columns]
    this_run: dict[str, Any] = {"method": "this run"}
    d = _detection_counts(run)
    if d:
        this_run.update({k: d[k] for k in ("poison_total", "poison_removed", "clean_removed") if k in d})
    ev = run.evaluation or {}
    for ours, theirs in (("asr_before", "attack_success_rate_before"), ("asr_after", "attack_success_rate_after"),
                         ("acc_before", "clean_accuracy_before"), ("acc_after", "clean_accuracy_after")):
        if theirs in ev:
            this_run[ours] = ev[theirs]
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = []
    for r, cls in [(this_run, "ours")] + [(r, "") for r in run.baselines]:
        cells = "".join(f"<td>{_e(_fmt(r.get(c), c))}</td>" for c in columns)
        body.append(f'<tr class="{cls}">{cells}</tr>')
    return (f'<section id="baselines"><h2>Compared with baselines</h2>'
            f'<table class="grid-table"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
            f"</section>")


def _suspicious(run: _Run, top_k: int) -> tuple[str, list[tuple[int, np.ndarray]]]:
    order, removed, total = _class_order(run)
    if not order:
        return ('<section id="suspicious"><h2>Most suspicious samples</h2><p>Nothing was removed.</p></section>',
                [])
    h, w = run.dataset.image_shape[:2]
    scale = _tile_scale(h, w)
    blocks, picked = [], []
    for cls in order:
        top = _top_indices(run, cls, top_k)
        picked.append((cls, top))
        tiles = []
        for i in top:
            pixels = run.dataset.images[run.rows[i]]
            uri = _data_uri(_png_bytes(_enlarge(pixels, scale)))
            is_poison = run.poison is not None and bool(run.poison[i])
            status = "removed" if not run.kept[i] else "kept"
            detail = [f"suspicion {run.suspicion[i]:.4f}"]
            if run.vote_agreement is not None:
                detail.append(f"vote agreement {run.vote_agreement[i]:.3f}")
            if run.refinement_correct is not None:
                detail.append(f"refinement correct {run.refinement_correct[i]:.3f}")
            badges = f'<span class="badge {status}">{status}</span>'
            if is_poison:
                badges += '<span class="badge poison">poison</span>'
            label = run.dataset.class_names[cls]
            tiles.append(
                f'<figure class="tile{" poison" if is_poison else ""}" data-sample-id="{_e(run.sample_ids[i])}" '
                f'data-suspicion="{run.suspicion[i]:.6f}" data-poison="{int(is_poison)}" '
                f'title="{_e("; ".join(detail))}">'
                f'<img src="{uri}" width="{w * scale}" height="{h * scale}" alt="{_e(run.sample_ids[i])}">'
                f'<figcaption><span class="sid">{_e(run.sample_ids[i])}</span>'
                f'<span class="lbl">{_e(label)}</span><span class="score">{run.suspicion[i]:.3f}</span>'
                f"{badges}</figcaption></figure>")
        facts = [f"{removed[cls]:,} of {total[cls]:,} removed"]
        if run.poison is not None:
            in_class = run.labels == cls
            facts.append(f"{int((run.poison & in_class & ~run.kept).sum()):,} of the removed are truly poison")
            facts.append(f"{int(run.poison[top].sum())} of the {len(top)} shown are truly poison")
        tie_note = ""
        if len(top):
            cutoff = run.suspicion[top[-1]]
            tied = int(((run.labels == cls) & (run.suspicion == cutoff)).sum())
            if tied > int((run.suspicion[top] == cutoff).sum()):  # the cut falls inside a group of equal scores
                tie_note = (f'<p class="hint tie">{tied:,} samples of this class score {cutoff:.4g}: which of them '
                            "are shown is arbitrary (a stable hash of the sample id), not a finer ranking.</p>")
        blocks.append(
            f'<div class="class-block" data-class="{_e(run.dataset.class_names[cls])}">'
            f"<h3>{_e(run.dataset.class_names[cls])} <small>{_e(' · '.join(facts))}</small></h3>{tie_note}"
            f"<div class=\"tiles\">{''.join(tiles)}</div></div>")
    hint = (f"The {top_k} most suspicious samples of each class with removals (highest suspicion first; the class "
            f"with the most removals first), enlarged {scale}× with nearest-neighbour so a small trigger stays "
            "visible. Hover a tile for its scores.")
    if run.poison is not None:
        hint += " A red frame marks a sample that the ground truth says is poisoned."
    return (f'<section id="suspicious"><h2>Most suspicious samples</h2><p class="hint">{_e(hint)}</p>'
            f'{"".join(blocks)}</section>', picked)


# ---------------------------------------------------------------------------------------------------- figures


def _figure_png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def _contact_sheet(run: _Run, picked: list[tuple[int, np.ndarray]]) -> bytes | None:
    """All suspicious tiles in one PNG (rows: classes), poison framed in red: for MLflow / DVC viewers."""
    if not picked:
        return None
    from PIL import Image, ImageDraw, ImageFont

    h, w = run.dataset.image_shape[:2]
    scale = max(1, min(4, 64 // max(h, w, 1)))
    tile_w, tile_h, pad, label_w = w * scale, h * scale, 4, 140
    cols = max(len(top) for _, top in picked)
    sheet = Image.new("RGB", (label_w + cols * (tile_w + pad) + pad, len(picked) * (tile_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    try:
        font = ImageFont.load_default(size=12)
    except TypeError:  # Pillow without FreeType
        font = ImageFont.load_default()
    for r, (cls, top) in enumerate(picked):
        y = pad + r * (tile_h + pad)
        name = run.dataset.class_names[cls]
        draw.text((pad, y + tile_h // 2 - 6), name if len(name) <= 20 else name[:19] + "…", fill="black", font=font)
        for k, i in enumerate(top):
            x = label_w + pad + k * (tile_w + pad)
            tile = _enlarge(run.dataset.images[run.rows[i]], scale).convert("RGB")
            sheet.paste(tile, (x, y))
            if run.poison is not None and run.poison[i]:
                draw.rectangle((x - 2, y - 2, x + tile_w + 1, y + tile_h + 1), outline=(220, 30, 30), width=2)
    return _png_bytes(sheet)


def _trajectory_png(run: _Run) -> bytes | None:
    events = [e for e in (run.rounds or []) if e.get("kind") in ("round", "learner", "vote", "refinement")]
    if not events:
        return None
    from matplotlib.figure import Figure

    has_poison = any("poison_kept" in e for e in events)
    fig = Figure(figsize=(10, 6.2 if has_poison else 3.8), layout="constrained")
    axes = fig.subplots(2 if has_poison else 1, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    xs = list(range(len(events)))
    colours = [f"C{i}" for i in range(10)]
    learners: dict[str, int] = {}
    ticks, tick_labels = [], []
    dense = len(events) > 40
    for x, e in zip(xs, events):
        kind = e["kind"]
        if kind == "round":
            name = str(e.get("learner", "learner"))
            learners.setdefault(name, len(learners))
            label = f"r{e.get('round', '?')}"
            if not dense or e.get("round") == 0:
                ticks.append(x)
                tick_labels.append(label)
        elif kind == "learner":
            for a in axes:
                a.axvline(x, color="0.75", lw=0.8, ls="--")
            ticks.append(x)
            tick_labels.append(f"core {e.get('bag', '?')}.{e.get('index', '?')}")
        elif kind == "vote":
            ticks.append(x)
            tick_labels.append("vote")
        elif kind == "refinement":
            if not dense or int(e.get("round", 0)) % 5 == 0:
                ticks.append(x)
                tick_labels.append(f"ref {e.get('round', '?')}")
    # Kept fraction: one line per learner's ISPL rounds, the vote, the refinement rounds.
    for name, idx in learners.items():
        pts = [(x, e["kept_fraction"]) for x, e in zip(xs, events)
               if e["kind"] == "round" and str(e.get("learner")) == name and "kept_fraction" in e]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, color=colours[idx % 10], label=_mpl_text(name))
    n_samples = len(run.kept)
    cores = [(x, e["core_size"] / n_samples) for x, e in zip(xs, events)
             if e["kind"] == "learner" and "core_size" in e and n_samples]
    if cores:
        ax.plot(*zip(*cores), marker="D", ms=6, ls="none", color="0.45", label="core set (of all samples)")
    vote = [(x, e["kept_fraction"]) for x, e in zip(xs, events) if e["kind"] == "vote" and "kept_fraction" in e]
    if vote:
        ax.plot(*zip(*vote), marker="*", ms=12, ls="none", color="black", label="vote")
    ref = [(x, e["kept_fraction"]) for x, e in zip(xs, events) if e["kind"] == "refinement" and "kept_fraction" in e]
    if ref:
        ax.plot(*zip(*ref), marker="s", ms=3, color="0.2", label="refinement")
    ax.set_ylabel("kept fraction")
    ax.set_title("kept fraction per step (ISPL rounds: of the learner's active set; core sets, vote and "
                 "refinement: of all samples)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", ncol=min(6, len(learners) + 3))
    ax.set_ylim(0, 1.15)
    if has_poison:
        pax = axes[1]
        pts = [(x, e["poison_kept"]) for x, e in zip(xs, events) if "poison_kept" in e]
        pax.plot(*zip(*pts), marker="o", ms=3, color="C3")
        total = None
        if run.poison is not None:
            total = int(run.poison.sum())
        elif "poison_total" in run.metrics:
            total = int(run.metrics["poison_total"])
        if total is not None:
            pax.axhline(total, color="C3", ls=":", lw=1)
            pax.annotate(f"all poison: {total}", (0, total), fontsize=7, color="C3", va="bottom")
        pax.set_ylim(bottom=0)
        pax.set_ylabel("poison still kept")
        pax.grid(alpha=0.3)
    axes[-1].set_xticks(ticks, [_mpl_text(t) for t in tick_labels], rotation=90, fontsize=7)
    return _figure_png(fig)


def _score_distribution_png(run: _Run) -> bytes | None:
    if len(run.suspicion) == 0:
        return None
    from matplotlib.figure import Figure

    finite = run.suspicion[np.isfinite(run.suspicion)]
    if len(finite) == 0:
        return None
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, 41)
    panels = 2 if run.poison is not None else 1
    fig = Figure(figsize=(5.2 * panels, 3.4), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    groups = [("kept", run.kept, "C0"), ("removed", ~run.kept, "C1")]
    ax = axes[0]
    for name, mask, colour in groups:
        values = run.suspicion[mask & np.isfinite(run.suspicion)]
        if len(values):
            ax.hist(values, bins=bins, color=colour, alpha=0.6, label=f"{name} ({len(values):,})")
    ax.set_xlabel("suspicion (higher = more suspicious)")
    ax.set_ylabel("samples")
    ax.set_title("kept vs removed", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if run.poison is not None:
        ax = axes[1]
        for name, mask, colour in (("clean", ~run.poison, "C2"), ("poison", run.poison, "C3")):
            values = run.suspicion[mask & np.isfinite(run.suspicion)]
            if len(values):
                ax.hist(values, bins=bins, color=colour, density=True, linewidth=1.8,
                        label=f"{name} ({len(values):,})", histtype="step")
        ax.set_xlabel("suspicion (higher = more suspicious)")
        ax.set_ylabel("density (each group sums to 1)")
        ax.set_title("ground truth: clean vs poison", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _figure_png(fig)


def _figure_section(section_id: str, title: str, hint: str, png: bytes | None, alt: str) -> str:
    if png is None:
        return ""
    return (f'<section id="{section_id}"><h2>{_e(title)}</h2><p class="hint">{_e(hint)}</p>'
            f'<img class="figure" src="{_data_uri(png)}" alt="{_e(alt)}"></section>')


def _lineage(run: _Run, sources: ReportSources) -> str:
    if run.lineage is None:
        return ""
    return (f'<section id="lineage"><h2>Lineage</h2><p class="hint">{_e(sources.lineage)}</p>'
            f'{_kv_table(_flatten(run.lineage), "kv mono")}</section>')


# ------------------------------------------------------------------------------------------------- the report

_CSS = """
:root{--fg:#1d2330;--muted:#5b6475;--line:#dde1e8;--bg:#f6f7f9;--accent:#2f5fb3;--bad:#c62828;--good:#2e7d32}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
header{background:#fff;border-bottom:1px solid var(--line);padding:18px 28px 10px}
h1{margin:0 0 4px;font-size:22px}
nav a{color:var(--accent);text-decoration:none;margin-right:14px;font-size:13px}
main{max-width:1320px;margin:0 auto;padding:10px 28px 40px}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:14px 18px;margin:16px 0}
h2{font-size:17px;margin:0 0 8px}
h3{font-size:14px;margin:14px 0 6px}
h3 small{color:var(--muted);font-weight:normal}
.hint{color:var(--muted);margin:0 0 10px;font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin-bottom:12px}
.card{border:1px solid var(--line);border-radius:6px;padding:8px 12px;min-width:130px;background:var(--bg)}
.card .k{color:var(--muted);font-size:12px}.card .v{font-size:17px;font-weight:600}
table{border-collapse:collapse;font-size:13px;margin:4px 0}
th,td{border-bottom:1px solid var(--line);padding:4px 10px;text-align:left;vertical-align:top}
.grid-table td,.confusion td{text-align:right}.grid-table td:first-child{text-align:left}
.kv th{color:var(--muted);font-weight:normal;white-space:nowrap}
.mono td{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;word-break:break-all}
.kv td{word-break:break-word}
tr.ours td{font-weight:600;background:#eef3fb}
.confusion td.good{color:var(--good);font-weight:600}.confusion td.bad{color:var(--bad);font-weight:600}
.row{display:flex;flex-wrap:wrap;gap:30px;align-items:flex-start}
.bar{display:inline-block;width:80px;height:8px;background:#e8ebf0;border-radius:4px;margin-right:6px;
 vertical-align:middle;overflow:hidden}.bar span{display:block;height:100%;background:var(--accent)}
p.ok{color:var(--good);margin:0}
.hint.tie{color:#8a4b00}
ul.notes{margin:0;padding-left:20px}ul.notes li{margin:3px 0;color:#8a4b00}
.tiles{display:flex;flex-wrap:wrap;gap:8px}
.tile{margin:0;padding:4px;border:2px solid var(--line);border-radius:6px;background:#fff;width:min-content}
.tile.poison{border-color:var(--bad);background:#fff3f3}
.tile img{display:block;image-rendering:pixelated;image-rendering:crisp-edges}
.tile figcaption{font-size:11px;line-height:1.3;margin-top:3px;display:flex;flex-wrap:wrap;gap:2px 6px}
.tile .sid{font-family:ui-monospace,Menlo,Consolas,monospace;width:100%;overflow:hidden;text-overflow:ellipsis;
 white-space:nowrap}
.tile .lbl{color:var(--muted)}.tile .score{font-weight:600}
.badge{border-radius:3px;padding:0 4px;font-size:10px;text-transform:uppercase;letter-spacing:.03em}
.badge.removed{background:#eceff4;color:#394150}.badge.kept{background:#e7f4e8;color:var(--good)}
.badge.poison{background:var(--bad);color:#fff}
img.figure{max-width:100%;height:auto;display:block}
details summary{cursor:pointer;color:var(--accent)}
footer{color:var(--muted);font-size:12px;text-align:center;padding-bottom:20px}
"""

_NAV_TITLES = {"summary": "Summary", "per-class": "Per class", "notes": "Things to check",
               "parameters": "Parameters", "detection": "Detection", "evaluation": "Before/after",
               "baselines": "Baselines", "suspicious": "Suspicious samples", "trajectory": "Trajectory",
               "score-distribution": "Scores", "lineage": "Lineage"}


def write_report(sources: ReportSources, out_dir: str | os.PathLike, *, top_k: int = 16,
                 title: str | None = None) -> dict[str, Any]:
    """Write out_dir/report.html and out_dir/figures/*.png (each atomically).

    Returns {"html": path, "figures": [paths of the PNG figures written], "suspicious": {class name: {"shown": n,
    "poison_shown": k or None without ground truth}}} (the grid's counts, in page order). Raises ReportError when
    the dataset or the scores are missing or unreadable (the message names the file)."""
    if top_k < 1:
        raise ReportError(f"top_k must be at least 1, got {top_k}")
    out_dir = Path(out_dir)
    run = _load_run(sources)

    suspicious_html, picked = _suspicious(run, top_k)
    figures = {
        "suspicious.png": _contact_sheet(run, picked),
        "trajectory.png": _trajectory_png(run),
        "score-distribution.png": _score_distribution_png(run),
    }
    scenario = run.dataset.extra_metadata.get("scenario") or (run.evaluation or {}).get("scenario")
    if title is None:
        title = f"Sanitization report: {scenario}" if scenario else f"Sanitization report: {sources.dataset.name}"
    truth_hint = " and true clean vs poison" if run.poison is not None else ""
    sections = [
        _summary(run, sources),
        _notes(run),
        _per_class(run),
        _detection(run),
        _evaluation(run),
        _baselines(run),
        _parameters(run, sources),
        suspicious_html,
        _figure_section("trajectory", "ISPL trajectory",
                        "Per round of each weak learner, the vote and each refinement round: the kept fraction"
                        + (" and how many poisoned samples are still kept." if any(
                            "poison_kept" in e for e in run.rounds or []) else "."),
                        figures["trajectory.png"], "ISPL trajectory: kept fraction per round"),
        _figure_section("score-distribution", "Suspicion scores",
                        f"Distribution of the suspicion score for kept vs removed samples{truth_hint}.",
                        figures["score-distribution.png"], "histograms of suspicion scores"),
        _lineage(run, sources),
    ]
    sections = [s for s in sections if s]
    present = [sid for sid in SECTION_IDS if f'<section id="{sid}"' in "".join(sections)]
    nav = "".join(f'<a href="#{sid}">{_e(_NAV_TITLES[sid])}</a>' for sid in present)
    document = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>"
        f"<header><h1>{_e(title)}</h1><p class=\"hint\">Scores: {_e(sources.scores)}</p><nav>{nav}</nav></header>"
        f"<main>\n{chr(10).join(sections)}\n</main>"
        "<footer>Generated by incompat.report: a self-contained file (no network, no other file needed).</footer>"
        "</body></html>\n")

    figure_dir = out_dir / "figures"
    written: list[Path] = []
    for name in FIGURE_NAMES:
        path = figure_dir / name
        png = figures[name]
        if png is None:
            if path.exists():  # a stale figure from an earlier report of a run that had this input
                path.unlink()
            continue
        with atomic_output(path) as tmp:
            Path(tmp).write_bytes(png)
        written.append(path)
    html_path = out_dir / "report.html"
    with atomic_output(html_path) as tmp:  # last: a complete report.html means its figures are there too
        Path(tmp).write_text(document, encoding="utf-8")
    shown = {run.dataset.class_names[cls]: {
        "shown": int(len(top)), "poison_shown": None if run.poison is None else int(run.poison[top].sum())}
        for cls, top in picked}
    return {"html": html_path, "figures": written, "suspicious": shown}
