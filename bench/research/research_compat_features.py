"""Suspects from SPECTRE scores on a model trained on everything (top q of every class), then a cross-fitted
compatibility test: models on the rest, the rest + half A, the rest + half B; a suspect is removed when the model
that saw the other half raises its p(label) by a lift.

  .venv/bin/python bench/research/research_compat_features.py gtsrb gtsrb:1 6 0.2
"""
import sys, time, json, dataclasses
from pathlib import Path
import numpy as np, torch
ROOT = Path(__file__).resolve().parents[2]; sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "bench"))
from bench_defense import load_split, scenario_list
from incompat.attacks import poison
from incompat.baselines import spectre, activation_clustering
from incompat.training import TensorData, TrainConfig, fit, extract_features, predict_logits
from incompat.metrics import detection_confusion

dataset, spec = sys.argv[1], sys.argv[2]
epochs = int(sys.argv[3]) if len(sys.argv) > 3 else 6
q = float(sys.argv[4]) if len(sys.argv) > 4 else 0.2
torch.set_num_threads(1)
cache = ROOT / "bench" / "results" / "cache"
train_full = load_split(dataset, "train", cache)
for sc in scenario_list(spec):
    train, pmask = poison(train_full, sc)
    data = TensorData(train.images, train.labels, num_classes=train.n_classes)
    cfg = TrainConfig(epochs=epochs, lr=0.2, threads=1)
    t0 = time.time()
    m_all = fit(data, cfg, progress=False)
    feats = extract_features(m_all, data)
    t1 = time.time()
    labels = train.labels
    out = {"scenario": sc.name, "poisons": int(pmask.sum()), "t_all": round(t1 - t0)}
    sp = spectre(feats, labels, train.n_classes)
    # suspects: top q share of every class by spectre score
    suspect = np.zeros(len(labels), bool)
    for c in range(train.n_classes):
        rows = np.flatnonzero(labels == c)
        k = int(np.ceil(q * len(rows)))
        suspect[rows[np.argsort(-sp.scores[rows])[:k]]] = True
    out["suspect_recall"] = float(suspect[pmask].mean()); out["suspect_n"] = int(suspect.sum())
    out["spectre"] = {k: v for k, v in detection_confusion(sp.remove_mask, pmask).items() if k in ("recall", "clean_removed_fraction")}
    ac = activation_clustering(feats, labels, train.n_classes)
    out["ac"] = {k: v for k, v in detection_confusion(ac.remove_mask, pmask).items() if k in ("recall", "clean_removed_fraction")}
    rng = np.random.default_rng(0)
    half = rng.random(len(labels)) < 0.5
    A = suspect & half; B = suspect & ~half; R = ~suspect
    probs = {}
    for name, idx in (("R", R), ("RA", R | A), ("RB", R | B)):
        m = fit(data, cfg, indices=np.flatnonzero(idx), progress=False)
        lg = predict_logits(m, data)
        p = torch.softmax(torch.as_tensor(lg).float(), 1).numpy()
        probs[name] = p[np.arange(len(labels)), labels]
    out["t_total"] = round(time.time() - t0)
    cross = np.where(A, probs["RB"], probs["RA"])
    lift = cross - probs["R"]
    for d in (0.2, 0.3, 0.5):
        rem = suspect & (lift >= d)
        c = detection_confusion(rem, pmask)
        out[f"lift>={d}"] = (round(c["recall"], 4), round(c["clean_removed_fraction"], 4))
    for th in (0.1, 0.2):
        rem = suspect & (probs["R"] < th) & (cross >= 0.5)
        c = detection_confusion(rem, pmask)
        out[f"R<{th}&cross>=.5"] = (round(c["recall"], 4), round(c["clean_removed_fraction"], 4))
    out["p_R_poison_med"] = float(np.median(probs["R"][pmask])); out["cross_poison_med"] = float(np.median(cross[pmask]))
    out["lift_clean_suspect_q95"] = float(np.quantile(lift[suspect & ~pmask], 0.95))
    print(json.dumps(out), flush=True)
