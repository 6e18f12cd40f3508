"""ISPL+B mechanics on tiny synthetic data: a planted trigger is found, clean data loses little, an interrupted
run resumes to the identical mask, diverging training is retried, and the helpers do what the paper's code does."""

import dataclasses
import json
import time

import numpy as np
import pytest

from incompat import ispl
from incompat.attacks import Scenario, Trigger, poison
from incompat.ispl import DefenseConfig, run_defense, trim, vote

from incompat.training import ComputeMeter, TrainingDiverged
from tests.conftest import make_imageset


def tiny_config(**overrides) -> DefenseConfig:
    values = dict(bags=1, boost=3, warmup_epochs=4, refit_epochs=2, refit_rounds=3, core_epochs=8,
                  class_floor=1.0, balanced_core=True, refinement_rounds=0, refinement_epochs=3, min_active=0.05,
                  seed=0,
                  learner_train={"model": "small_cnn", "width": 8, "batch_size": 32, "lr": 0.05,
                                 "schedule": "constant", "augment": False, "weight_decay": 5e-4})
    values.update(overrides)
    return DefenseConfig.from_dict(values)


@pytest.fixture(scope="module")
def planted():
    clean = make_imageset(n_per_class=80, n_classes=4, size=12, seed=3)
    # A 3-pixel trigger on 10% of class 0: not learned in the first short rounds, so ISPL keeps it out of the
    # early core sets and the majority of learners contradicts the poisoned label.
    scenario = Scenario("tiny", Trigger("ell", (9, 9), (255, 0, 255)), 0, 1, rate=0.1, seed=5)
    poisoned, mask = poison(clean, scenario)
    return clean, poisoned, mask


def test_trim_keeps_lowest_losses_with_a_per_class_floor():
    losses = np.array([0.1, 0.2, 0.3, 5.0, 6.0, 7.0, 0.15, 0.25])
    labels = np.array([0, 0, 0, 1, 1, 1, 0, 0])
    keep = trim(losses, labels, 2, thresh=0.25, class_floor=0.5)
    # The 25% lowest overall are all class 0; the floor still keeps class 1's lowest.
    assert keep[[0, 6]].all()
    assert keep[3] and not keep[[4, 5]].any()


def test_balanced_trim_takes_the_same_share_of_every_class():
    # Class 0 holds every one of the lowest losses: unbalanced, the overall cut takes all of class 0.
    losses = np.array([0.1, 0.2, 0.3, 0.4, 5.0, 6.0, 7.0, 8.0])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    unbalanced = trim(losses, labels, 2, thresh=0.5, class_floor=0.5)
    assert unbalanced[:4].all()
    balanced = trim(losses, labels, 2, thresh=0.5, class_floor=0.5, balanced=True)
    assert balanced.tolist() == [True, False, False, False, True, False, False, False]
    assert np.bincount(labels[trim(losses, labels, 2, 0.5, 1.0, balanced=True)]).tolist() == [2, 2]


def test_an_easy_class_is_not_removed_whole():
    # One class far easier than the rest (a much brighter band): unbalanced core sets let the first learner
    # absorb it, later learners never see it and the vote drops it; balanced ones keep it.
    data = make_imageset(n_per_class=60, n_classes=4, size=12, seed=7)
    images = data.images.copy()
    images[data.labels == 2] = np.clip(images[data.labels == 2].astype(int) + 60, 0, 255).astype(np.uint8)
    result = run_defense(images, data.labels, 4, tiny_config())
    removed_per_class = np.bincount(data.labels[~result.keep_mask], minlength=4)
    assert removed_per_class.max() <= 6, removed_per_class.tolist()


def _probs(rows: list[tuple[int, int, float, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(label, predicted, p(label), count) groups -> labels and 3-class probability rows."""
    labels, probs = [], []
    for label, predicted, p_label, count in rows:
        row = np.zeros(3)
        row[label] = p_label
        row[predicted] += 1.0 - p_label
        labels += [label] * count
        probs += [row] * count
    return np.array(labels), np.array(probs)


def test_review_order_puts_a_relabelled_group_before_natural_confusions():
    # Class 2 (the target) has 40 hard images that look like class 1, confused both ways (40 class-1 images look
    # like class 2), and 10 poisons: class-0 images relabelled 2, a cell with no transposed counterpart. By
    # contradiction alone the hard images come first (p(label) 0.05 < 0.2).
    labels, probs = _probs([(2, 1, 0.05, 40), (1, 2, 0.05, 40), (2, 0, 0.2, 10),
                            (0, 0, 0.9, 50), (1, 1, 0.9, 50), (2, 2, 0.9, 50)])
    poison = np.zeros(len(labels), dtype=bool)
    poison[80:90] = True
    keep = probs[np.arange(len(labels)), labels] > 0.5
    agreement, correct = keep.astype(float), keep.astype(float)
    score = ispl.review_order(keep, labels, 3, probs, agreement, correct)
    target = np.flatnonzero(labels == 2)
    top = target[np.argsort(-score[target], kind="stable")][:10]
    assert poison[top].all()
    assert score[~keep].min() >= 0.5 >= score[keep].max()
    enrichment = ispl.cell_enrichment(probs, labels, 3)
    assert enrichment[poison].min() == 1.0 and enrichment[labels == 1].max() == 1.0  # each row's own top cell
    assert enrichment[:40].max() == pytest.approx(1 / 11)  # (2,1): 41/41, against (2,0): 11/1


def test_vote_is_plurality_with_seeded_tie_break():
    preds = np.array([[0, 1, 2, 0], [0, 1, 1, 1], [2, 2, 1, 2]])
    winner, count = vote(preds, 3, np.random.default_rng(0))
    assert winner[0] == 0 and count[0] == 2
    assert winner[2] == 1 and count[2] == 2
    # Column 3 ties 0/1/2 at one vote each; the draw is seeded.
    again, _ = vote(preds, 3, np.random.default_rng(0))
    assert np.array_equal(winner, again)
    draws = {int(vote(preds, 3, np.random.default_rng(s))[0][3]) for s in range(30)}
    assert draws == {0, 1, 2}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_trigger_is_found(planted, seed):
    # Several seeds: with unbalanced core sets this outcome flipped between machines (bf16 vs fp32 training)
    # and seeds, losing a whole easy class in some; balanced core sets found every poison on seeds 0-5.
    _, poisoned, mask = planted
    result = run_defense(poisoned.images, poisoned.labels, poisoned.n_classes, tiny_config(seed=seed))
    removed = ~result.keep_mask
    assert removed[mask].mean() >= 0.9, f"only {removed[mask].sum()} of {mask.sum()} poisons removed"
    assert removed[~mask].mean() <= 0.05
    # The suspicion score ranks poisons above the clean samples of the target class.
    target_clean = (~mask) & (poisoned.labels == 1)
    assert np.median(result.suspicion[mask]) > np.median(result.suspicion[target_clean])
    assert result.meter.epoch_equivalents(len(mask)) > 0


def test_clean_dataset_loses_little(planted):
    clean, _, _ = planted
    result = run_defense(clean.images, clean.labels, clean.n_classes, tiny_config())
    assert (~result.keep_mask).mean() <= 0.1


def test_resume_after_interruption_gives_identical_mask(planted, tmp_path):
    _, poisoned, _ = planted
    cfg = tiny_config(boost=3, refinement_rounds=2)
    full = run_defense(poisoned.images, poisoned.labels, 4, cfg, checkpoint_dir=tmp_path / "a")

    class Interrupt(Exception):
        pass

    seen = []

    def stop_after_second_learner(kind, info):
        if kind == "learner":
            seen.append(info["index"])
            if len(seen) == 2:
                raise Interrupt

    with pytest.raises(Interrupt):
        run_defense(poisoned.images, poisoned.labels, 4, cfg, checkpoint_dir=tmp_path / "b",
                    observe=stop_after_second_learner)
    assert len(list((tmp_path / "b").glob("learner-*.npz"))) == 2
    spent_before = json.loads((tmp_path / "b" / "learner-b00-01.json").read_text())["meter"]["seconds"]
    trained = []
    original_weak_learner = ispl.weak_learner

    def counting(*args, **kwargs):
        trained.append(kwargs.get("name"))
        return original_weak_learner(*args, **kwargs)

    ispl.weak_learner = counting
    try:
        resumed_at = time.monotonic()
        resumed = run_defense(poisoned.images, poisoned.labels, 4, cfg, checkpoint_dir=tmp_path / "b")
        own = time.monotonic() - resumed_at
    finally:
        ispl.weak_learner = original_weak_learner
    assert trained == ["bag0-learner2"]  # only the unfinished learner was trained again
    assert np.array_equal(resumed.keep_mask, full.keep_mask)
    assert np.allclose(resumed.suspicion, full.suspicion)
    assert resumed.meter.train_samples == full.meter.train_samples
    # the wall time counts the interrupted run's two reused learners, not only the one trained again
    # `own`: this run's time measured from outside, a little more than inside
    tolerance = min(0.5, spent_before / 2)
    assert spent_before > 0 and own - tolerance <= resumed.wall_seconds - spent_before <= own


def test_checkpoints_of_other_parameters_are_not_reused(planted, tmp_path):
    _, poisoned, _ = planted
    run_defense(poisoned.images, poisoned.labels, 4, tiny_config(boost=1, refinement_rounds=0),
                checkpoint_dir=tmp_path)
    before = (tmp_path / "learner-b00-00.npz").stat().st_mtime_ns
    run_defense(poisoned.images, poisoned.labels, 4, tiny_config(boost=1, refinement_rounds=0, seed=9),
                checkpoint_dir=tmp_path)
    assert (tmp_path / "learner-b00-00.npz").stat().st_mtime_ns != before


def test_diverging_training_is_retried_with_lower_lr(monkeypatch, planted):
    _, poisoned, _ = planted
    real_fit = ispl.fit
    lrs = []

    def flaky_fit(data, cfg, **kwargs):
        lrs.append(cfg.lr)
        if len(lrs) == 1:
            raise TrainingDiverged("non-finite loss at epoch 0 step 3")
        return real_fit(data, cfg, **kwargs)

    monkeypatch.setattr(ispl, "fit", flaky_fit)
    result = run_defense(poisoned.images, poisoned.labels, 4, tiny_config(boost=1, refinement_rounds=0))
    assert lrs[0] == pytest.approx(0.05) and lrs[1] == pytest.approx(0.005)
    assert result.learners[0].retries == 1


def test_persistent_divergence_is_an_error_not_a_mask(monkeypatch, planted):
    _, poisoned, _ = planted

    def always_nan(*a, **k):
        raise TrainingDiverged("non-finite loss")

    monkeypatch.setattr(ispl, "fit", always_nan)
    with pytest.raises(TrainingDiverged, match="diverged 3 times"):
        run_defense(poisoned.images, poisoned.labels, 4, tiny_config(boost=1))


def test_unknown_parameter_is_refused():
    with pytest.raises(ValueError, match="unknown defense parameter"):
        DefenseConfig.from_dict({"boots": 3})


def test_sanitize_writes_outputs_and_metrics(planted, tmp_path):
    from incompat.data import read_dataset
    from incompat.sanitize import sanitize
    import pyarrow.parquet as pq

    _, poisoned, mask = planted
    result, out = sanitize(poisoned, tiny_config(), tmp_path / "run", truth_mask=mask)
    metrics = json.loads(out.metrics.read_text())
    for key in ("n_samples", "n_removed", "epoch_equivalents", "wall_seconds", "poison_total", "poison_removed",
                "clean_removed"):
        assert key in metrics
    assert metrics["n_samples"] == len(poisoned)
    assert metrics["poison_total"] == int(mask.sum())
    clean = read_dataset(out.clean, verify=True)
    removed = pq.read_table(out.removed).to_pydict()
    assert len(clean) + len(removed["sample_id"]) == len(poisoned)
    assert len(removed["sample_id"]) == metrics["n_removed"]
    assert removed["suspicion"] == sorted(removed["suspicion"], reverse=True)
    scores = pq.read_table(out.scores).to_pydict()
    assert len(scores["sample_id"]) == len(poisoned)
    rounds = json.loads(out.rounds.read_text())
    assert any(r["kind"] == "round" and "poison_kept" in r for r in rounds)


def test_changing_only_refinement_reuses_the_learners(planted, tmp_path, monkeypatch):
    _, poisoned, _ = planted
    run_defense(poisoned.images, poisoned.labels, 4, tiny_config(boost=2, refinement_rounds=1),
                checkpoint_dir=tmp_path)
    trained = []
    original = ispl.weak_learner

    def counting(*args, **kwargs):
        trained.append(kwargs.get("name"))
        return original(*args, **kwargs)

    monkeypatch.setattr(ispl, "weak_learner", counting)
    result = run_defense(poisoned.images, poisoned.labels, 4, tiny_config(boost=2, refinement_rounds=2),
                         checkpoint_dir=tmp_path)
    assert trained == []
    assert len(result.refinement_rounds) == 2  # the refinement itself ran again with its new parameters


# ------------------------------------------------------------------ options for small models (the cpu profile)

def crossfit_config(**overrides) -> DefenseConfig:
    values = dict(vote_rule="held_out", vote_threshold=0.2, refinement_folds=2, refinement_rounds=2,
                  refinement_epochs=4, refinement_decay=0.5, refinement_threshold=0.2,
                  refinement_train_threshold=0.3, anomaly_ratio=3.0, anomaly_z=3.0, anomaly_threshold=0.5)
    values.update(overrides)
    return tiny_config(**values)


def test_paper_defaults_leave_the_options_off():
    cfg = DefenseConfig()
    assert cfg.vote_rule == "plurality" and cfg.refinement_folds == 1 and cfg.anomaly_ratio == 0
    assert cfg.refinement_train_threshold is None


@pytest.mark.parametrize("bad", [{"vote_rule": "majority"}, {"refinement_folds": 0}, {"anomaly_ratio": -1},
                                 {"refinement_judge": "kept"},
                                 {"refinement_judge": "outside", "refinement_train_threshold": 0.5,
                                  "refinement_folds": 2},
                                 {"refinement_judge": "outside"},  # no threshold to join the trusted set
                                 {"refinement_judge": "outside", "refinement_train_threshold": 0.1,
                                  "refinement_threshold": 0.3},  # kept would not cover trained-on
                                 {"refinement_folds": 2, "refinement_class_floor": 1.5},
                                 {"refinement_folds": 2, "refinement_class_floor": -0.1},
                                 {"refinement_class_floor": 0.5}])  # the floor is for cross-fitted judges only
def test_bad_option_values_are_refused(bad):
    with pytest.raises(ValueError):
        DefenseConfig.from_dict(bad)


def test_class_floor_keeps_each_class_in_the_judges_training_set():
    labels = np.repeat([0, 1, 2], 10)
    correct = np.tile(np.linspace(0.0, 0.09, 10), 3)  # every sample under the train threshold
    correct[10:20] = np.linspace(0.2, 0.9, 10)  # class 1: all above it
    keep = np.ones(30, bool)
    keep[20:] = False  # class 2: removed outright
    trusted = ispl._trusted(crossfit_config(refinement_train_threshold=0.1), keep, correct)
    assert trusted.tolist() == [False] * 10 + [True] * 10 + [False] * 10  # classes 0 and 2 would vanish
    everywhere = np.ones(30, bool)
    floored = ispl._class_floor(0.35, trusted, correct, labels, everywhere)
    # ceil(0.35 * 10) = 4 of each class, the highest p(label) first, kept or not; class 1 needs none added.
    assert np.flatnonzero(floored).tolist() == [6, 7, 8, 9] + list(range(10, 20)) + [26, 27, 28, 29]
    # Within a fold's pool (here the even samples) the floor counts and picks only the pool's samples.
    pool = np.arange(30) % 2 == 0
    in_pool = ispl._class_floor(0.35, trusted & pool, correct, labels, pool)
    assert np.flatnonzero(in_pool).tolist() == [6, 8] + [10, 12, 14, 16, 18] + [26, 28]
    assert ispl._class_floor(0.0, trusted, correct, labels, everywhere) is trusted


def test_the_judges_train_on_every_class_with_a_floor(monkeypatch):
    # A class of 10 images among 320: the first judges, trained on few of them, tend to score them low (this
    # seed: every one of them ends up removed without a floor). With the floor each judge's training set holds
    # its share of that class in every round.
    full = make_imageset(n_per_class=80, n_classes=5, size=15, seed=3)
    idx = np.concatenate([np.flatnonzero(full.labels < 4), np.flatnonzero(full.labels == 4)[:10]])
    images, labels = full.images[idx], full.labels[idx]
    trained: dict[str, np.ndarray] = {}
    real = ispl._fit_with_retries

    def spy(data, train_cfg, indices, cfg, meter, what, **kwargs):
        trained[what] = np.asarray(indices).copy()
        return real(data, train_cfg, indices, cfg, meter, what, **kwargs)

    monkeypatch.setattr(ispl, "_fit_with_retries", spy)
    result = run_defense(images, labels, 5, crossfit_config(boost=2, refinement_rounds=3, refinement_class_floor=0.5))
    judges = {what: ix for what, ix in trained.items() if what.startswith("refinement round")}
    assert len(judges) == 6
    for what, ix in judges.items():
        if not what.startswith("refinement round 0"):  # round 0 trains on the vote's keep, before any floor
            # fold f trains on the floor's 5 (or more) trusted rare images outside fold f: about half of them.
            assert (labels[ix] == 4).sum() >= 1, what
    both = np.concatenate([judges["refinement round 2 fold 0"], judges["refinement round 2 fold 1"]])
    assert (labels[np.unique(both)] == 4).sum() >= 5
    assert result.keep_mask[labels < 4].mean() >= 0.9


def test_held_out_probabilities_ignore_the_learner_that_trained_on_the_sample():
    core_a = np.array([True, False, False])
    core_b = np.array([False, True, False])
    probs_a = np.array([[1.0, 0.0], [0.2, 0.8], [0.6, 0.4]], dtype=np.float16)
    probs_b = np.array([[0.0, 1.0], [0.9, 0.1], [0.2, 0.8]], dtype=np.float16)
    recs = [ispl.LearnerRecord(0, 0, core_a, probs_a.argmax(1), probs_a, []),
            ispl.LearnerRecord(0, 1, core_b, probs_b.argmax(1), probs_b, [])]
    held = ispl.held_out_probabilities(recs)
    assert np.allclose(held[0], [0.0, 1.0], atol=1e-3)  # only learner b (a trained on sample 0)
    assert np.allclose(held[1], [0.2, 0.8], atol=1e-3)  # only learner a
    assert np.allclose(held[2], [0.4, 0.6], atol=1e-3)  # in no core: both
    # A sample every core set holds falls back to all learners instead of dividing by zero.
    both = [ispl.LearnerRecord(0, i, np.ones(3, bool), r.predictions, r.probabilities, []) for i, r in
            enumerate(recs)]
    assert np.isfinite(ispl.held_out_probabilities(both)).all()


def _confused_probs(n_per_class=200, n_classes=4, planted=60, seed=0):
    """Judged probabilities with symmetric natural confusion between classes 0<->1 and `planted` samples of
    label 2 that look like class 3 (a 3 -> 2 poisoning)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), n_per_class)
    probs = np.full((len(labels), n_classes), 0.02)
    probs[np.arange(len(labels)), labels] = 0.9
    confused = np.concatenate([np.flatnonzero(labels == 0)[:30], np.flatnonzero(labels == 1)[:30]])
    probs[confused] = 0.02
    probs[confused, labels[confused]] = 0.3
    probs[confused, 1 - labels[confused]] = 0.6
    poisons = np.flatnonzero(labels == 2)[-planted:]
    probs[poisons] = 0.02
    probs[poisons, 3] = 0.85
    probs[poisons, 2] = 0.05 + 0.2 * rng.random(planted)
    return probs / probs.sum(1, keepdims=True), labels, poisons, confused


def test_anomalous_cells_flag_a_one_sided_group_not_symmetric_confusion():
    probs, labels, _, _ = _confused_probs()
    cells = ispl.anomalous_cells(probs, labels, 4, threshold=0.5, ratio=3.0, z_min=3.0)
    assert cells[2, 3]
    assert cells.sum() == 1  # the natural 0<->1 confusion is symmetric: no cell


def test_anomalous_cells_flag_a_group_whose_transposed_cell_is_empty():
    # A poisoning fills (target, source) and leaves (source, target) empty; the old Wald z of the log ratio could
    # not exceed ~4.3 there however many poisons, so a strict z_min never flagged the cell.
    probs, labels, _, _ = _confused_probs(planted=150)
    assert ispl.anomalous_cells(probs, labels, 4, threshold=0.5, ratio=3.0, z_min=8.0)[2, 3]
    few_probs, few_labels, _, _ = _confused_probs(planted=4)
    assert not ispl.anomalous_cells(few_probs, few_labels, 4, threshold=0.5, ratio=3.0, z_min=8.0).any()


def test_binomial_z_is_the_signed_root_likelihood_ratio():
    assert ispl._binomial_z(211, 211, 0.5) == pytest.approx(np.sqrt(2 * 211 * np.log(2)))
    assert ispl._binomial_z(50, 100, 0.5) == pytest.approx(0.0)
    assert ispl._binomial_z(10, 100, 0.5) < -7  # fewer than expected: negative, never flagged
    # Against a fitted share of 0.8, 80 of 100 is no excess.
    assert abs(ispl._binomial_z(80, 100, 0.8)) < 1e-6


def test_cross_fit_keep_removes_the_anomalous_cell_and_spares_hard_clean():
    probs, labels, poisons, confused = _confused_probs()
    cfg = crossfit_config(refinement_threshold=0.1, anomaly_threshold=0.5)
    keep = ispl.cross_fit_keep(probs, labels, 4, cfg)
    assert not keep[poisons].any()  # their p(label) is up to 0.25, above the plain threshold: the cell finds them
    assert keep[confused].all()  # hard clean images (p(label) 0.3) of a symmetric confusion stay
    off = ispl.cross_fit_keep(probs, labels, 4, crossfit_config(refinement_threshold=0.1, anomaly_ratio=0.0))
    assert off[poisons].mean() > 0.5


def record_training_and_judging(monkeypatch) -> tuple[list[set], list[set], list[set]]:
    """Patches ispl's fit and predict_logits. Returns (fits: each fit's own indices; trained: what the judging
    model had trained on in all its fits so far; judged: the indices it judged), one entry per call."""
    fits, trained, judged = [], [], []
    real_fit, real_predict = ispl.fit, ispl.predict_logits

    def recording_fit(data, cfg, indices=None, **kwargs):
        model = real_fit(data, cfg, indices=indices, **kwargs)
        fits.append(set(np.asarray(indices).tolist()))
        # A model trained again (warm start) has seen everything any of its fits saw.
        model._trained_on = fits[-1] | getattr(model, "_trained_on", set())
        return model

    def recording_predict(model, data, indices=None, **kwargs):
        if indices is not None and hasattr(model, "_trained_on"):
            judged.append(set(np.asarray(indices).tolist()))
            trained.append(set(model._trained_on))
        return real_predict(model, data, indices, **kwargs)

    monkeypatch.setattr(ispl, "fit", recording_fit)
    monkeypatch.setattr(ispl, "predict_logits", recording_predict)
    return fits, trained, judged


def test_cross_fitted_judges_never_judge_their_own_training_samples(planted, monkeypatch):
    _, poisoned, _ = planted
    _, trained, judged = record_training_and_judging(monkeypatch)
    run_defense(poisoned.images, poisoned.labels, 4, crossfit_config(boost=2))
    refinement = [(t, j) for t, j in zip(trained, judged) if len(j) < len(poisoned.labels)]
    assert len(refinement) == 4  # 2 rounds x 2 folds
    for t, j in refinement:
        assert not (t & j)
    assert set().union(*judged[-2:]) == set(range(len(poisoned.labels)))  # every sample judged each round


def test_cross_fitted_defense_finds_the_trigger(planted):
    _, poisoned, mask = planted
    result = run_defense(poisoned.images, poisoned.labels, 4, crossfit_config(boost=2))
    removed = ~result.keep_mask
    assert removed[mask].mean() >= 0.9, f"only {removed[mask].sum()} of {mask.sum()} poisons removed"
    assert removed[~mask].mean() <= 0.05
    assert len(result.refinement_rounds) == 2


@pytest.mark.parametrize("refinement", ["cross_fitted", "outside"])
def test_refinement_options_resume_to_the_identical_mask(planted, tmp_path, refinement):
    _, poisoned, _ = planted
    cfg = crossfit_config(boost=2) if refinement == "cross_fitted" else outside_config()
    full_events = []
    full = run_defense(poisoned.images, poisoned.labels, 4, cfg, checkpoint_dir=tmp_path / "a",
                       observe=lambda kind, info: full_events.append(info) if kind == "refinement" else None)

    class Interrupt(Exception):
        pass

    def stop_after_first_round(kind, info):
        if kind == "refinement" and info["round"] == 1:  # round 0 is checkpointed, round 1 is not
            raise Interrupt

    with pytest.raises(Interrupt):
        run_defense(poisoned.images, poisoned.labels, 4, cfg, checkpoint_dir=tmp_path / "b",
                    observe=stop_after_first_round)
    rounds, replayed = [], []
    resumed = run_defense(poisoned.images, poisoned.labels, 4, cfg, checkpoint_dir=tmp_path / "b",
                          observe=lambda kind, info: (replayed if info.get("replayed") else rounds).append(info)
                          if kind == "refinement" else None)
    assert [r["round"] for r in rounds] == [1]  # round 0's judges and scores came from the checkpoint
    # ... and its trajectory is replayed from there, keep-mask included, so a resumed run's curves are whole
    assert [r["round"] for r in replayed] == [0]
    assert replayed[0]["kept"] == full_events[0]["kept"]
    assert np.array_equal(replayed[0]["kept_indices"], full_events[0]["kept_indices"])
    assert np.array_equal(resumed.keep_mask, full.keep_mask)
    assert np.allclose(resumed.refinement_correct, full.refinement_correct)
    assert resumed.meter.train_samples == full.meter.train_samples


def test_a_learner_killed_while_checkpointing_is_never_half_loaded(tmp_path, monkeypatch):
    # The NPZ marks a finished learner: whenever it exists, so does its JSON (CI once killed a run between
    # the two writes, and the resumed run trained that learner again).
    ckpt = ispl.Checkpoint(tmp_path, "fingerprint")
    rng = np.random.default_rng(0)
    record = ispl.LearnerRecord(0, 0, rng.random(20) < 0.5, rng.integers(0, 4, 20),
                                rng.random((20, 4)).astype(np.float16), [{"kept": 0.5}], retries=1,
                                meter=ComputeMeter(train_samples=7, infer_samples=3, seconds=1.5))

    class Killed(Exception):
        pass

    json_present = []

    def killed_while_writing_npz(fh, **arrays):
        json_present.append((tmp_path / "learner-b00-00.json").exists())
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(ispl.np, "savez", killed_while_writing_npz)
        with pytest.raises(Killed):
            ckpt.save_learner(record)
    assert json_present == [True]
    assert not (tmp_path / "learner-b00-00.npz").exists()
    assert ckpt.load_learner(0, 0) is None  # unfinished: trained again
    ckpt.save_learner(record)
    loaded = ckpt.load_learner(0, 0)
    assert np.array_equal(loaded.core_set, record.core_set) and loaded.rounds == record.rounds
    assert loaded.retries == 1 and np.array_equal(loaded.probabilities, record.probabilities)
    assert loaded.meter == record.meter


def test_a_run_killed_just_after_a_learner_is_saved_resumes_with_its_full_compute(planted, tmp_path, monkeypatch):
    # The meter travels in the learner's own files: there is no instant after a learner is saved in which the
    # checkpoint holds that learner but a meter that does not count it (meter.json once lagged one learner).
    _, poisoned, _ = planted
    cfg = tiny_config(boost=2, refinement_rounds=1)
    full = run_defense(poisoned.images, poisoned.labels, 4, cfg, checkpoint_dir=tmp_path / "a")

    class Killed(Exception):
        pass

    original_save = ispl.Checkpoint.save_learner

    def killed_after_second_save(self, rec):
        original_save(self, rec)
        if rec.index == 1:
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(ispl.Checkpoint, "save_learner", killed_after_second_save)
        with pytest.raises(Killed):
            run_defense(poisoned.images, poisoned.labels, 4, cfg, checkpoint_dir=tmp_path / "b")
    retrained = []
    original_weak_learner = ispl.weak_learner

    def counting(*args, **kwargs):
        retrained.append(kwargs["name"])
        return original_weak_learner(*args, **kwargs)

    monkeypatch.setattr(ispl, "weak_learner", counting)
    resumed = run_defense(poisoned.images, poisoned.labels, 4, cfg, checkpoint_dir=tmp_path / "b")
    assert retrained == []  # both learners reused
    assert np.array_equal(resumed.keep_mask, full.keep_mask)
    assert (resumed.meter.train_samples, resumed.meter.infer_samples) == \
        (full.meter.train_samples, full.meter.infer_samples)


def test_damaged_checkpoints_are_retrained_not_a_crash(planted, tmp_path, caplog):
    _, poisoned, _ = planted
    cfg = tiny_config(boost=2, refinement_rounds=1)
    first = run_defense(poisoned.images, poisoned.labels, 4, cfg, checkpoint_dir=tmp_path)
    (tmp_path / "learner-b00-01.npz").write_bytes(b"PK\x03\x04 truncated")
    (tmp_path / "refinement.pt").write_bytes(b"\x00" * 10)
    again = run_defense(poisoned.images, poisoned.labels, 4, cfg, checkpoint_dir=tmp_path)
    assert "damaged checkpoint" in caplog.text
    np.testing.assert_array_equal(first.keep_mask, again.keep_mask)


def test_suspicion_orders_removed_above_kept_and_is_fine_grained(planted):
    _, poisoned, _ = planted
    result = run_defense(poisoned.images, poisoned.labels, 4, tiny_config(boost=2, refinement_rounds=1))
    if result.keep_mask.any() and (~result.keep_mask).any():
        assert result.suspicion[~result.keep_mask].min() >= result.suspicion[result.keep_mask].max()
    # continuous: far more distinct values than the few (agreement, refinement) levels it used to take
    levels = len({(a, c) for a, c in zip(result.vote_agreement, result.refinement_correct)})
    assert len(np.unique(result.suspicion)) > 5 * levels


# ------------------------------------------------------------------ outside judging (the cpu profile)

def outside_config(**overrides) -> DefenseConfig:
    values = dict(boost=2, refinement_judge="outside", refinement_rounds=2, refinement_epochs=4,
                  refinement_train_threshold=0.5, refinement_threshold=0.1)
    values.update(overrides)
    return tiny_config(**values)


def test_outside_judge_never_judges_a_sample_it_trained_on(planted, monkeypatch):
    _, poisoned, _ = planted
    votes = []
    fits, trained, judged = record_training_and_judging(monkeypatch)
    result = run_defense(poisoned.images, poisoned.labels, 4, outside_config(),
                         observe=lambda kind, info: votes.append(set(info["kept_indices"].tolist()))
                         if kind == "vote" else None)
    refinement = [(t, j) for t, j in zip(trained, judged) if len(j) < len(poisoned.labels)]
    assert len(refinement) == 2
    for t, j in refinement:
        assert t and j and not (t & j)
    # Round 0 trains on the vote's keep; each round's training set holds the last one (trusted only grows), and
    # what the model trained on is kept.
    first, second = fits[-2:]
    assert first == votes[0]
    assert first <= second
    assert set(np.flatnonzero(result.keep_mask).tolist()) >= second


def test_outside_judged_defense_finds_the_trigger(planted):
    _, poisoned, mask = planted
    result = run_defense(poisoned.images, poisoned.labels, 4, outside_config())
    removed = ~result.keep_mask
    assert removed[mask].mean() >= 0.9, f"only {removed[mask].sum()} of {mask.sum()} poisons removed"
    assert removed[~mask].mean() <= 0.05, f"{removed[~mask].sum()} clean images removed"
    # Removed samples were judged unlikely under their label; kept ones either trusted or judged likely enough.
    assert (result.refinement_correct[removed] < 0.1).all()
    # Review order: removed samples first, ranked by the verdict of the model that never trained on them.
    assert result.suspicion[removed].min() > result.suspicion[~removed].max()
    assert np.allclose(result.suspicion[removed], 0.5 + 0.5 * (1 - result.refinement_correct[removed]))
    top = np.argsort(-result.suspicion, kind="stable")[:mask.sum()]
    assert mask[top].mean() >= 0.8


@pytest.mark.parametrize("key,other", [("loss_trim", 0.1), ("flip", False), ("flip_pairs", ((0, 1),))])
def test_learner_checkpoints_from_before_a_train_key_existed_keep_their_fingerprint(key, other):
    # Saved fingerprints predate TrainConfig.loss_trim, .flip and .flip_pairs: at its default none may enter the
    # string, or every saved learner would be retrained; a learner trained another way is another fingerprint.
    def augmented(**overrides):  # flip_pairs needs augmentation on
        cfg = tiny_config(**overrides)
        cfg.learner_train = dataclasses.replace(cfg.learner_train, augment=True)
        return cfg

    plain = ispl.learner_fingerprint(augmented(), "digest")
    assert key not in plain
    changed = augmented()
    changed.learner_train = dataclasses.replace(changed.learner_train, **{key: other})
    assert ispl.learner_fingerprint(changed, "digest") != plain
    assert ispl.learner_fingerprint(augmented(refinement_threshold=0.1), "digest") == plain
    assert ispl.learner_fingerprint(augmented(refinement_folds=2, refinement_class_floor=0.5), "digest") == plain


def test_flip_pairs_named_by_class_train_the_learners_of_their_labels(planted, tmp_path, monkeypatch):
    from incompat.sanitize import sanitize

    _, poisoned, mask = planted

    def paired(*pair):
        cfg = tiny_config(boost=1, allow_class_loss=True)  # these learners remove whole classes: plumbing only
        cfg.learner_train = dataclasses.replace(cfg.learner_train, augment=True, flip_pairs=(pair,))
        return cfg

    named, labelled = paired("class2", "class3"), paired(2, 3)
    assert ispl.learner_fingerprint(named.for_classes(poisoned.class_names), "d") == \
        ispl.learner_fingerprint(labelled, "d")
    # A name the dataset lacks stops the run before anything is written.
    with pytest.raises(ValueError, match=r"'class9'.*closest: \['class"):
        sanitize(poisoned, paired("class2", "class9"), tmp_path / "bad", checkpoint_dir=tmp_path / "ck")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "ck").exists()

    first, _ = sanitize(poisoned, named, tmp_path / "named", truth_mask=mask, checkpoint_dir=tmp_path / "ck")
    trained = []
    original = ispl.weak_learner
    monkeypatch.setattr(ispl, "weak_learner", lambda *a, **k: trained.append(1) or original(*a, **k))
    again, _ = sanitize(poisoned, labelled, tmp_path / "labelled", truth_mask=mask, checkpoint_dir=tmp_path / "ck")
    assert trained == []  # the labels found the learners the names trained
    assert np.array_equal(first.keep_mask, again.keep_mask)


def test_checkpoints_from_before_the_meter_moved_still_count_their_compute(planted, tmp_path):
    # Older checkpoint folders kept the meter in meter.json, written after each learner, and none in the learners.
    _, poisoned, _ = planted
    cfg = tiny_config(boost=2, refinement_rounds=0)
    full = run_defense(poisoned.images, poisoned.labels, 4, cfg, checkpoint_dir=tmp_path)
    last = json.loads((tmp_path / "learner-b00-01.json").read_text())["meter"]
    for path in tmp_path.glob("learner-*.json"):
        info = json.loads(path.read_text())
        del info["meter"]
        path.write_text(json.dumps(info))
    (tmp_path / "meter.json").write_text(json.dumps(last))
    again = run_defense(poisoned.images, poisoned.labels, 4, cfg, checkpoint_dir=tmp_path)
    assert np.array_equal(again.keep_mask, full.keep_mask)
    assert (again.meter.train_samples, again.meter.infer_samples) == (full.meter.train_samples,
                                                                      full.meter.infer_samples)
    assert again.meter.train_samples > 0
