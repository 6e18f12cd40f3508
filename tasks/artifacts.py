"""Prefect artifacts of a finished run: what an operator sees on the flow run's page without opening a file.

A table of the samples removed per class (with the poison among them when ground truth is known), a markdown
summary, and links to the HTML report and to the MLflow run. Keys are stable per flow, so Prefect's UI keeps each
one's history across runs. The numbers are read back from the run's files (the dataset, removed.parquet, the
ground truth, evaluation.json): a step served from Prefect's cache gets the same artifacts as one that ran.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from incompat.steps import Layout

# `mlflow ui`'s default address: a SQLite or file store has no web page of its own
MLFLOW_UI_DEFAULT = "http://127.0.0.1:5000"


def removed_per_class(layout: Layout, truth: str | os.PathLike | None = None) -> list[dict]:
    """One row per class: samples, removed, removed share; with ground truth also poison and poison removed."""
    import pyarrow.parquet as pq

    from incompat.data import read_metadata

    dataset = layout.sanitized_input()
    names = read_metadata(dataset).get("class_names") or []
    table = pq.read_table(dataset, columns=["sample_id", "label"])
    labels = np.asarray(table.column("label").to_pylist(), dtype=np.int64)
    removed_ids = set(pq.read_table(layout.removed, columns=["sample_id"]).column("sample_id").to_pylist())
    ids = table.column("sample_id").to_pylist()
    removed = np.array([sid in removed_ids for sid in ids], dtype=bool)
    n_classes = max(len(names), int(labels.max()) + 1 if len(labels) else 0)
    total = np.bincount(labels, minlength=n_classes)
    removed_count = np.bincount(labels[removed], minlength=n_classes)
    poison = None
    if truth is not None and Path(truth).exists():
        truth_table = pq.read_table(truth, columns=["sample_id", "is_poison"])
        poisoned_ids = {sid for sid, flag in zip(truth_table.column("sample_id").to_pylist(),
                                                 truth_table.column("is_poison").to_pylist()) if flag}
        poison = np.array([sid in poisoned_ids for sid in ids], dtype=bool)
    rows = []
    for label in range(n_classes):
        row = {"class": names[label] if label < len(names) else str(label), "label": label,
               "samples": int(total[label]), "removed": int(removed_count[label]),
               "removed_share": round(float(removed_count[label] / total[label]), 4) if total[label] else 0.0}
        if poison is not None:
            in_class = labels == label
            row["poison"] = int((poison & in_class).sum())
            row["poison_removed"] = int((poison & in_class & removed).sum())
            row["clean_removed"] = int((~poison & in_class & removed).sum())
        rows.append(row)
    return rows


def mlflow_run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else MLFLOW_UI_DEFAULT
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def _percent(part, whole) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "n/a"


def summary_markdown(title: str, layout: Layout, rows: list[dict], extra: dict[str, str]) -> str:
    n_samples = sum(r["samples"] for r in rows)
    n_removed = sum(r["removed"] for r in rows)
    lines = [f"# {title}", "", "| | |", "|---|---|",
             f"| samples | {n_samples} |", f"| removed | {n_removed} ({_percent(n_removed, n_samples)}) |"]
    if rows and "poison" in rows[0]:
        poison = sum(r["poison"] for r in rows)
        caught = sum(r["poison_removed"] for r in rows)
        clean = n_samples - poison
        clean_removed = sum(r["clean_removed"] for r in rows)
        lines += [f"| poison removed | {caught} of {poison} ({_percent(caught, poison)}) |",
                  f"| clean removed | {clean_removed} of {clean} ({_percent(clean_removed, clean)}) |"]
    if layout.evaluation.exists():
        evaluation = json.loads(layout.evaluation.read_text())
        for key, label in (("clean_accuracy", "clean accuracy"), ("attack_success_rate", "attack success rate")):
            before, after = evaluation.get(f"{key}_before"), evaluation.get(f"{key}_after")
            if before is not None and after is not None:
                lines.append(f"| {label} before -> after | {before:.3f} -> {after:.3f} |")
    lines += [f"| {key} | {value} |" for key, value in extra.items()]
    worst = sorted(rows, key=lambda r: -r["removed_share"])[:3]
    if worst and n_removed:
        lines += ["", "Most removed: " + ", ".join(f"{r['class']} {r['removed']}/{r['samples']}" for r in worst)]
    return "\n".join(lines) + "\n"


def publish_sanitization(flow_name: str, title: str, layout: Layout, tracker, truth: str | os.PathLike | None,
                         extra: dict[str, str] | None = None) -> None:
    """The run's artifacts, keyed `<flow>-removed-per-class`, `-summary`, `-report` and `-mlflow-run`."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    rows = removed_per_class(layout, truth)
    create_table_artifact(rows, key=f"{flow_name}-removed-per-class",
                          description=f"{title}: samples removed per class"
                                      + (" (poison from the ground truth)" if rows and "poison" in rows[0] else ""))
    link = mlflow_run_link(tracker.uri, tracker.experiment_id, tracker.run_id)
    create_markdown_artifact(summary_markdown(title, layout, rows, {"MLflow run": f"[{tracker.run_id}]({link})",
                                                                    **(extra or {})}),
                             key=f"{flow_name}-summary", description=title)
    if layout.report_html.exists():
        create_link_artifact(layout.report_html.resolve().as_uri(), link_text="HTML report",
                             key=f"{flow_name}-report", description=f"{title}: the report (a file on the run's host)")
    create_link_artifact(link, link_text=f"MLflow run {tracker.run_id}", key=f"{flow_name}-mlflow-run",
                         description=f"{title}: MLflow run in {tracker.uri}"
                                     + ("" if tracker.uri.startswith("http") else
                                        f" (serve it with `mlflow ui --backend-store-uri {tracker.uri}`)"))


def publish_grid(rows: list[dict], tracker, csv_path: Path) -> None:
    from prefect.artifacts import create_link_artifact, create_table_artifact

    create_table_artifact(rows, key="grid-table", description=f"one row per scenario ({csv_path})")
    link = mlflow_run_link(tracker.uri, tracker.experiment_id, tracker.run_id)
    create_link_artifact(link, link_text=f"MLflow run {tracker.run_id}", key="grid-mlflow-run",
                         description=f"the grid's parent MLflow run in {tracker.uri}")
