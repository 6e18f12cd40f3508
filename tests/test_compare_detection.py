"""bench/compare_detection.py: the figures it prints are the ones its masks and scores imply."""

import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _scenario(root: Path, name: str, poison: np.ndarray, suspicion: np.ndarray, keep: np.ndarray,
              spectral: np.ndarray, ac: np.ndarray) -> None:
    (root / name / "cpu").mkdir(parents=True)
    np.savez(root / name / "cpu" / "result.npz", poison=poison, keep=keep, suspicion=suspicion)
    np.savez(root / name / "baselines.npz", poison=poison, removed_spectral=spectral, removed_ac=ac)


def test_recall_at_the_targets_budget_and_at_the_baselines(tmp_path):
    n = 1000
    poison = np.zeros(n, dtype=bool)
    poison[:50] = True  # 950 clean: 5% of them is 47.5 images
    perfect = np.where(poison, 1.0, 0.0) + np.linspace(0, 0.5, n)  # every poison above every clean image
    # the second scenario's ranking puts 100 clean images above the poisons: at 5% of the clean, no poison yet
    late = np.zeros(n)
    late[50:150] = 2.0
    late[:50] = 1.0
    keep = ~poison
    keep[50:150] = False  # its mask removes all 50 poisons with 100 clean (10.5%)
    spectral = np.zeros(n, dtype=bool)
    spectral[:25] = True  # half the poisons, no clean
    ac = np.zeros(n, dtype=bool)
    _scenario(tmp_path, "a-perfect", poison, perfect, ~poison, spectral, ac)
    _scenario(tmp_path, "b-late", poison, late, keep, spectral, ac)
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "compare_detection.py"), str(tmp_path),
                          "--profile", "cpu"],
                         capture_output=True, text=True, check=True).stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("a-", "b-"))}
    # scenario, poisons, ISPL recall / clean, @5%, spectral recall / clean, ISPL@budget, ac recall / clean, ISPL@budget
    # no learner checkpoints: no vote column
    assert rows["a-perfect"] == ["a-perfect", "50", "100.0", "/", "0.00", "100.0%", "-", "50.0", "/", "0.00",
                                 "100.0%", "0.0", "/", "0.00", "100.0%"]  # at a budget of 0 clean images: every poison
    assert rows["b-late"] == ["b-late", "50", "100.0", "/", "10.53", "0.0%", "-", "50.0", "/", "0.00", "0.0%",
                              "0.0", "/", "0.00", "0.0%"]
    assert "ranking at 5% clean: median recall  50.0%, >= 99% in 1/2" in out
    # spectral: 50% at 0% clean; the perfect mask beats it, the late one removes more clean images
    assert "ISPL+B's mask at least its recall at no more clean: 1/2" in out


def test_the_cut_stops_at_the_last_clean_image_within_the_budget(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from ranking import recall_at

    # ranking: P C P P C P ... (4 poisons, 10 clean); a budget of 1 clean image reaches the third poison
    poison = np.array([1, 0, 1, 1, 0, 1] + [0] * 8, dtype=bool)
    score = -np.arange(len(poison), dtype=float)
    assert recall_at(score, poison, (0.0, 0.1, 0.2, 1.0)) == [0.25, 0.75, 1.0, 1.0]


def test_the_vote_column_counts_the_poisons_the_vote_did_not_keep(tmp_path):
    # 3 classes, 4 learners, 4 poisons; the cpu profile's plurality vote keeps a sample whose label wins with at
    # least 2 learners. Poison 0: all 4 give its label (kept); poison 1: 2 give it, the others two other classes
    # (kept with 2, not with 3); poison 2: 1 gives it, 3 another class; poison 3: none.
    labels = np.array([0, 1, 2, 0, 1, 2], dtype=np.int64)
    poison = np.array([1, 1, 1, 1, 0, 0], dtype=bool)
    other1, other2 = (labels + 1) % 3, (labels + 2) % 3
    predictions = np.array([
        [0, 1, 2, 1, 1, 2],
        [0, 1, other1[2], 1, 1, 2],
        [0, other1[1], other1[2], 1, 1, 2],
        [0, other2[1], other1[2], 1, 1, 2],
    ])
    ranking = np.linspace(1, 0, 6)
    _scenario(tmp_path, "c-voted", poison, ranking, np.ones(6, bool), np.zeros(6, bool), np.zeros(6, bool))
    np.savez(tmp_path / "c-voted" / "cpu" / "result.npz", poison=poison, keep=np.ones(6, bool), suspicion=ranking,
             labels=labels)
    for k, row in enumerate(predictions):
        np.savez(tmp_path / "c-voted" / "cpu" / f"learner-b00-{k:02d}.npz", core_set=np.zeros(6, bool),
                 predictions=row, probabilities=np.eye(3, dtype=np.float16)[row])

    def vote_column(*extra):
        out = subprocess.run([sys.executable, str(ROOT / "bench" / "compare_detection.py"), str(tmp_path),
                              "--profile", "cpu", *extra],
                             capture_output=True, text=True, check=True).stdout
        return next(line.split() for line in out.splitlines() if line.startswith("c-voted"))[6], out

    column, out = vote_column()
    assert column == "50.0%"  # poisons 2 and 3
    assert ("does not keep a median  50.0% of the poisons (50.0-50.0%), >= 99% in 0/1, "
            "nor a median  0.00% of the clean images") in out
    assert vote_column("--set", "vote_min_count=3")[0] == "75.0%"  # poison 1 too
