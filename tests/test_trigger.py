"""The trigger-aware stage (incompat.trigger) on tiny synthetic data: a trigger the judges learn is missed by the
label-disagreement stage alone and caught with the trigger stage; a clean dataset loses little; the suspect split
finds a group that stands apart and nothing in a smooth tail; mirror-image classes are found from the data."""

import numpy as np
import pytest

from incompat import ispl
from incompat.attacks import Scenario, Trigger, poison
from incompat.ispl import DefenseConfig, run_defense
from incompat.training import ComputeMeter, TensorData, TrainConfig, fit
from incompat.trigger import class_clusters, mirror_pairs, split_suspects, top_group
from tests.conftest import make_imageset

TRAIN = {"model": "small_cnn", "width": 8, "batch_size": 32, "lr": 0.05, "schedule": "constant",
         "augment": False, "weight_decay": 5e-4}


def crossfit(**overrides) -> DefenseConfig:
    values = dict(bags=1, boost=1, data_fraction=0.7, class_floor=1.0, warmup_epochs=3, refit_epochs=2,
                  refit_rounds=2, core_epochs=6, vote_rule="held_out", vote_threshold=0.2, refinement_folds=2,
                  refinement_rounds=2, refinement_epochs=4, refinement_decay=0.5, refinement_threshold=0.2,
                  refinement_train_threshold=0.3, anomaly_ratio=3.0, anomaly_z=3.0, anomaly_threshold=0.5, seed=0,
                  learner_train=TRAIN)
    values.update(overrides)
    return DefenseConfig.from_dict(values)


WITH_TRIGGER = {"trigger_epochs": 8, "trigger_separation": 1.3, "trigger_cluster": 1.7}


@pytest.fixture(scope="module")
def learned():
    """A 4x4 patch on 20% of class 0, labelled 1: a model learns it within its first epochs."""
    clean = make_imageset(n_per_class=100, n_classes=4, size=12, seed=7)
    scenario = Scenario("learned", Trigger("patch", (1, 1), (255, 255, 255)), 0, 1, rate=0.2, seed=3)
    poisoned, mask = poison(clean, scenario)
    return clean, poisoned, mask


def test_top_group_finds_a_group_that_stands_apart_and_not_a_smooth_tail():
    rng = np.random.default_rng(0)
    tail = np.sort(np.log(rng.chisquare(2, 1000)))[::-1]
    size, separation = top_group(tail, 0.25, 5)
    assert separation < 4.0
    planted = np.sort(np.concatenate([tail, np.log(rng.uniform(200, 400, 60))]))[::-1]
    size, separation = top_group(planted, 0.25, 5)
    assert size == 60 and separation > 5.0
    assert top_group(tail[:10], 0.25, 5) is None  # no group of 5 fits in a quarter of 10


def test_split_suspects_marks_only_the_class_with_a_group():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(5), 500)
    scores = rng.chisquare(2, len(labels))
    group = np.flatnonzero(labels == 2)[:40]
    scores[group] = rng.uniform(300, 500, 40)
    suspects, groups = split_suspects(scores, labels, 5, 0.25, 1.3, 5)
    assert np.array_equal(np.flatnonzero(suspects), group)
    assert [g["label"] for g in groups] == [2] and groups[0]["size"] == 40 and groups[0]["found_by"] == "scores"
    # Relative to the median class: the same scores in every class stand apart in none of them.
    same = np.concatenate([scores[labels == 2]] * 5)
    assert not split_suspects(same, labels, 5, 0.25, 1.3, 5)[0].any()


def test_a_tight_small_cluster_is_suspect_and_unimodal_classes_are_not():
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(5), 400)
    features = rng.normal(size=(len(labels), 6))
    planted = np.flatnonzero(labels == 3)[:60]
    direction = rng.normal(size=6)
    features[planted] = 10.0 * direction / np.linalg.norm(direction) + rng.normal(scale=0.3, size=(60, 6))
    minor, silhouette = class_clusters(features, labels, 5, components=4)
    scores = np.ones(len(labels))  # no score stands out: only the clusters can mark anything
    suspects, groups = split_suspects(scores, labels, 5, 0.25, 1.3, 5, minor, silhouette, 1.7)
    assert set(np.flatnonzero(suspects)) == set(planted.tolist())
    assert [(g["label"], g["found_by"]) for g in groups] == [(3, "clusters")]
    assert not split_suspects(scores, labels, 5, 0.25, 1.3, 5, minor, silhouette, 0.0)[0].any()  # 0: not used


def test_mirror_classes_are_found_from_a_model_trained_without_flips():
    rng = np.random.default_rng(2)
    n, size = 90, 12
    labels = np.repeat(np.arange(3), n)
    images = rng.integers(0, 60, size=(len(labels), size, size, 3), dtype=np.uint8)
    images[labels == 0, :, :4] += 180  # a bright left edge
    images[labels == 1, :, -4:] += 180  # its mirror image: a bright right edge
    images[labels == 2, :4, :] += 180  # a bright top edge: its own mirror image
    data = TensorData(images, labels)
    model = fit(data, TrainConfig(**{**TRAIN, "epochs": 6, "flip": False}), progress=False)
    assert mirror_pairs(model, images, labels, 3, data, ComputeMeter(), 0.5) == ((0, 1),)


def test_a_learned_trigger_is_missed_by_label_disagreement_and_caught_by_the_trigger_stage(learned):
    _, poisoned, mask = learned
    alone = run_defense(poisoned.images, poisoned.labels, 4, crossfit())
    assert (~alone.keep_mask)[mask].mean() < 0.5, "the judges did not learn the trigger: the test proves nothing"
    result = run_defense(poisoned.images, poisoned.labels, 4, crossfit(**WITH_TRIGGER))
    removed = ~result.keep_mask
    assert result.trigger is not None and result.trigger.suspects[mask].mean() >= 0.9
    assert removed[mask].mean() >= 0.9, f"only {removed[mask].sum()} of {mask.sum()} poisons removed"
    assert removed[~mask].mean() <= 0.05


def test_a_clean_dataset_loses_little_with_the_trigger_stage(learned):
    clean, _, _ = learned
    result = run_defense(clean.images, clean.labels, 4, crossfit(**WITH_TRIGGER))
    assert (~result.keep_mask).mean() <= 0.05


def test_suspects_never_train_a_judge(learned, monkeypatch):
    _, poisoned, _ = learned
    trained = []
    real_fit = ispl.fit

    def recording_fit(data, cfg, indices=None, **kwargs):
        trained.append(set(np.asarray(indices).tolist()))
        return real_fit(data, cfg, indices=indices, **kwargs)

    monkeypatch.setattr(ispl, "fit", recording_fit)
    result = run_defense(poisoned.images, poisoned.labels, 4, crossfit(**WITH_TRIGGER))
    suspects = set(np.flatnonzero(result.trigger.suspects).tolist())
    assert suspects
    refinement_fits = trained[-4:]  # 2 rounds x 2 folds, after the learner's fits
    assert all(not (fit_set & suspects) for fit_set in refinement_fits)


def test_the_trigger_stage_resumes_from_its_checkpoint(learned, tmp_path, monkeypatch):
    _, poisoned, _ = learned
    first = run_defense(poisoned.images, poisoned.labels, 4, crossfit(**WITH_TRIGGER), checkpoint_dir=tmp_path)
    calls = []
    monkeypatch.setattr(ispl, "run_trigger_stage", lambda *a, **k: calls.append(1))
    again = run_defense(poisoned.images, poisoned.labels, 4, crossfit(**WITH_TRIGGER), checkpoint_dir=tmp_path)
    assert not calls
    assert np.array_equal(first.keep_mask, again.keep_mask)
    assert np.array_equal(first.trigger.suspects, again.trigger.suspects)
    assert again.meter.epoch_equivalents(len(poisoned.labels)) == first.meter.epoch_equivalents(len(poisoned.labels))


def test_other_split_settings_reuse_the_stage_and_draw_the_suspects_again(learned, tmp_path, monkeypatch):
    _, poisoned, _ = learned
    first = run_defense(poisoned.images, poisoned.labels, 4, crossfit(**WITH_TRIGGER), checkpoint_dir=tmp_path)
    learner_files = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("learner-*.npz")}
    monkeypatch.setattr(ispl, "run_trigger_stage", lambda *a, **k: pytest.fail("the stage's model trained again"))
    looser = run_defense(poisoned.images, poisoned.labels, 4, crossfit(**{**WITH_TRIGGER, "trigger_separation": 0.0}),
                         checkpoint_dir=tmp_path)
    assert np.array_equal(looser.trigger.scores, first.trigger.scores)
    assert looser.trigger.suspects.sum() > first.trigger.suspects.sum()
    assert not (first.trigger.suspects & ~looser.trigger.suspects).any()
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("learner-*.npz")} == learner_files


@pytest.mark.parametrize("bad", [{"trigger_epochs": 2, "refinement_rounds": 0}, {"detect_mirrors": True},
                                 {"trigger_max_share": 0.0}, {"trigger_min_size": 0}])
def test_bad_trigger_options_are_refused(bad):
    with pytest.raises(ValueError):
        crossfit(**bad)


def test_the_recorder_counts_the_poisons_among_the_suspects(learned):
    from incompat.sanitize import RoundRecorder
    _, poisoned, mask = learned
    recorder = RoundRecorder(mask)
    result = run_defense(poisoned.images, poisoned.labels, 4, crossfit(**WITH_TRIGGER), observe=recorder)
    event = next(e for e in recorder.events if e["kind"] == "trigger")
    assert event["suspects"] == int(result.trigger.suspects.sum())
    assert event["poison_suspected"] == int(result.trigger.suspects[mask].sum())
    assert "suspect_indices" not in event
