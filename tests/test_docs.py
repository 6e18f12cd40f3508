"""The README is a manual a newcomer can follow, and docs/results.md is generated from committed CSVs.

- README.md stays short, with no overlong line, and cites no file that git ignores (a reader of the repository
  cannot open those; the tool state the commands themselves create is named so a user can find it).
- The README's own "Sanitize your own images" commands, taken from its text, sanitize a tiny image folder in a
  subprocess and leave the report where the README says it is.
- docs/make_results.py regenerates docs/results.md byte for byte, and every CSV row says when it was measured and
  how to reproduce it.
"""

import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS_DIR = ROOT / "docs" / "results"

# Git-ignored places the README may name: state the project's own commands create (the virtual environment of
# `make`, MLflow's default store, Prefect's local home, DVC's default local remote), named so a user can find it.
TOOL_STATE = {".venv", "mlflow.db", "mlruns", ".prefect", ".dvc-storage"}
FILE_SUFFIXES = {"parquet", "json", "yaml", "yml", "md", "py", "csv", "html", "db", "npz", "png", "toml", "lock",
                 "pt", "txt", "sh"}


def readme_text() -> str:
    return README.read_text(encoding="utf-8")


def path_tokens(text: str) -> set[str]:
    """Every word of the text that names a file or folder inside the repository."""
    tokens = set()
    for raw in re.split(r"[\s`()\[\]'\",;|=]+", text):
        token = raw.rstrip(".:!?")
        if not token or "://" in token or any(ch in token for ch in "<>*{}$~\\×"):
            continue
        if token.startswith(("../", "/", "-", "http")):
            continue  # outside the repository, an option, or a URL
        suffix = token.rsplit(".", 1)[-1] if "." in token.rsplit("/", 1)[-1] else ""
        if "/" in token or suffix in FILE_SUFFIXES:
            tokens.add(token)
    return tokens


def git_ignored(paths: set[str]) -> set[str]:
    proc = subprocess.run(["git", "check-ignore", "--stdin"], cwd=ROOT, input="\n".join(sorted(paths)) + "\n",
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode in (0, 1), proc.stderr  # 0: some are ignored, 1: none is
    return {line.strip() for line in proc.stdout.splitlines() if line.strip()}


def test_readme_is_short_and_no_line_is_over_200_characters():
    lines = readme_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines"
    long = [(number, len(line)) for number, line in enumerate(lines, 1) if len(line) > 200]
    assert not long, f"README.md lines over 200 characters (line, length): {long}"


def test_the_path_finder_sees_the_paths_git_ignores():
    # The check below is only as good as this extraction: an ignored result file in prose or a command is found.
    text = "see `bench/results/cifar.csv`, run (runs/s1/report.html) and .venv/bin/incompat; not ../x/y.md or http://a/b"
    tokens = path_tokens(text)
    assert {"bench/results/cifar.csv", "runs/s1/report.html", ".venv/bin/incompat"} <= tokens
    assert not any(t.startswith(("..", "http")) for t in tokens)
    assert git_ignored(tokens) == {"bench/results/cifar.csv", "runs/s1/report.html", ".venv/bin/incompat"}


def test_readme_cites_no_git_ignored_file():
    tokens = path_tokens(readme_text())
    assert "docs/results.md" in tokens and "params.yaml" in tokens  # the extraction did find the README's paths
    cited = {t for t in git_ignored(tokens) if t.strip("/").split("/")[0] not in TOOL_STATE}
    assert not cited, f"README.md cites git-ignored paths a reader cannot open: {sorted(cited)}"


def readme_example(section: str) -> list[list[str]]:
    """The `incompat` commands of the first sh block under the README heading `section`, as argument lists."""
    text = readme_text()
    start = text.index(f"## {section}\n")
    block = re.search(r"```sh\n(.*?)```", text[start:], re.S)
    assert block, f"no sh block under '## {section}'"
    commands = []
    for line in block.group(1).splitlines():
        line = line.split("  #", 1)[0].strip()
        if line.startswith("incompat "):
            commands.append(shlex.split(line))
    return commands


def _image_folder(root: Path, n_classes: int = 3, n_per_class: int = 20, size: int = 24) -> int:
    """root/<class>/*.png: each class brightens its own horizontal band, so classes are easy to learn."""
    from PIL import Image

    rng = np.random.default_rng(0)
    band = size // n_classes
    for c in range(n_classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        for i in range(n_per_class):
            pixels = rng.integers(0, 80, size=(size, size, 3), dtype=np.uint8)
            pixels[c * band:(c + 1) * band] += 150
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return n_classes * n_per_class


def test_the_readme_example_sanitizes_a_folder_of_images(tmp_path, mlflow_store):
    commands = readme_example("Sanitize your own images")
    assert [c[1] for c in commands] == ["ingest", "sanitize"], commands
    ingest, sanitize = commands
    folder = tmp_path / ingest[2]
    n_images = _image_folder(folder)
    # Run as the README says: from the project folder, whose params.yaml gives the defaults.
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    cli = Path(sys.executable).with_name("incompat")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / ".prefect"), "OMP_NUM_THREADS": "1"}
    for command in commands:
        proc = subprocess.run([str(cli), *command[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, f"{shlex.join(command)}\n{proc.stderr[-3000:]}"
    out = Path(sanitize[sanitize.index("--out") + 1])
    report = out / "report.html"
    assert f"`{report}`" in readme_text(), "the README names the report the example writes"
    assert (tmp_path / report).stat().st_size > 0
    metrics = json.loads((tmp_path / out / "metrics.json").read_text())
    assert metrics["n_samples"] == n_images
    assert metrics["n_kept"] + metrics["n_removed"] == n_images


def test_results_md_is_what_the_csvs_give(tmp_path):
    out = tmp_path / "results.md"
    proc = subprocess.run([sys.executable, str(ROOT / "docs" / "make_results.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == (ROOT / "docs" / "results.md").read_bytes(), \
        "docs/results.md is stale: run .venv/bin/python docs/make_results.py"
    # --check agrees, and catches an edited copy
    check = [sys.executable, str(ROOT / "docs" / "make_results.py"), "--check", "--out", str(out)]
    assert subprocess.run(check, capture_output=True, timeout=60).returncode == 0
    out.write_text(out.read_text().replace("75.2%", "99.9%"))
    assert subprocess.run(check, capture_output=True, timeout=60).returncode == 1


@pytest.mark.parametrize("table", sorted(p.name for p in RESULTS_DIR.glob("*.csv")))
def test_every_result_row_is_dated_and_reproducible(table):
    with open(RESULTS_DIR / table, newline="", encoding="utf-8") as fh:
        records = list(csv.reader(fh))
    header, rows = records[0], [dict(zip(records[0], record)) for record in records[1:]]
    assert rows, f"{table} has no rows"
    ragged = [number for number, record in enumerate(records[1:], 2) if len(record) != len(header)]
    assert not ragged, f"{table}: rows {ragged} do not have the header's {len(header)} fields (an unquoted comma?)"
    for number, row in enumerate(rows, 2):
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", row.get("date") or ""), f"{table}:{number}: no date"
        assert row.get("command") or row.get("source"), f"{table}:{number}: neither a command nor a source"
        # a script a command names is in the repository
        for script in re.findall(r"\S+\.py", row.get("command") or ""):
            assert (ROOT / script).is_file(), f"{table}:{number}: {script} does not exist"


def test_the_readme_states_the_latest_measured_default_run():
    # The first screen must not oversell: the README quotes the newest `make run` measurement of the results.
    with open(RESULTS_DIR / "default_run.csv", newline="", encoding="utf-8") as fh:
        latest = max(csv.DictReader(fh), key=lambda row: row["date"])
    text = readme_text()
    for column in ("accuracy", "asr"):
        assert latest[column] in text, f"README.md does not quote the default run's {column}: {latest[column]}"
    assert "[docs/results.md](docs/results.md)" in text


def test_benchmark_tables_are_dated_and_kept_as_the_benchmark_wrote_them():
    # Tables pivoted from bench/bench_defense.py output: the raw CSV is committed unchanged (its header is the
    # benchmark's), and the section says when and how it was measured.
    sys.path.insert(0, str(ROOT / "docs"))
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_defense
    import make_results

    sections = [s for s in make_results.SECTIONS if "bench" in s]
    assert sections
    for section in sections:
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", section["date"])
        assert (ROOT / section["command"].split()[0]).is_file()
        with open(RESULTS_DIR / "bench" / section["bench"], newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            assert reader.fieldnames == bench_defense.FIELDS
            assert any(row["method"] == "ispl" for row in reader)


def test_ispl_is_ahead_only_with_every_peers_recall_at_no_more_clean_removed():
    sys.path.insert(0, str(ROOT / "docs"))
    import make_results

    ispl = {"recall_pct": "99.0", "clean_removed_pct": "2.0"}
    assert make_results.ahead_of_peers(ispl, [{"recall_pct": "99.0", "clean_removed_pct": "2.0"}])
    assert not make_results.ahead_of_peers(ispl, [{"recall_pct": "100.0", "clean_removed_pct": "15.0"}])
    assert not make_results.ahead_of_peers(ispl, [{"recall_pct": "50.0", "clean_removed_pct": "1.0"}])


def test_a_scenario_the_benchmark_has_not_reached_ispl_on_is_left_out_of_the_medians():
    # A resumable benchmark's CSV is committed while it runs: the no-defense and oracle rows of the scenario in
    # progress are there, ISPL+B's not yet.
    sys.path.insert(0, str(ROOT / "docs"))
    import make_results

    done = {"learned": "1", "ispl": "98.0% / 5.00%", "neutralised": "yes", "ispl_accuracy_within_1pt_of_oracle": "no"}
    running = {"learned": "1", "ispl": "", "neutralised": "", "ispl_accuracy_within_1pt_of_oracle": ""}
    summary = make_results.bench_summary([done, running])
    assert "learned attacks (1): ISPL+B median recall 98.0% at 5.00% clean removed" in summary
    assert "neutralised in 1 of the 1" in summary


def test_an_unlearned_attack_is_judged_against_a_judge_that_never_saw_a_poison():
    # Issue 23's bar where the model does not learn the trigger: ISPL+B's recall at least the clean judge's at 5%.
    sys.path.insert(0, str(ROOT / "docs"))
    import make_results

    below = {"learned": "0", "ispl": "60.0% / 4.80%", "clean_judge_5pct": "80.0%"}
    above = {"learned": "0", "ispl": "90.0% / 5.00%", "clean_judge_5pct": "85.0%"}
    # More recall, but bought with more than the judge's 5% of the clean images: not at its budget.
    over_budget = {"learned": "0", "ispl": "96.0% / 5.78%", "clean_judge_5pct": "93.6%"}
    learned = {"learned": "1", "ispl": "99.0% / 5.00%", "clean_judge_5pct": ""}
    summary = make_results.bench_summary([below, above, over_budget, learned])
    assert "attacks not learned: ISPL+B's recall at least the clean judge's at 5% (at most 5% clean removed) in " \
           "1 of 3" in summary
