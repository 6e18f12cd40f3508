import json

import numpy as np
import pytest
import yaml

from incompat.attacks import (
    AttackError,
    Scenario,
    Trigger,
    apply_trigger,
    paper_scenario_table,
    paper_scenarios,
    parse_scenario_spec,
    poison,
    resolve,
    triggered_test,
)
from incompat.data import DataError, ImageSet

RED = (250, 1, 2)


def _images(n=3, h=8, w=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def _changed_pixels(before, after):
    """Set of (row, col) that differ in any image/channel."""
    diff = (before != after).any(axis=(0, 3))
    return {(int(r), int(c)) for r, c in zip(*np.nonzero(diff))}


def _dataset(per_class=20, n_classes=4, h=8, w=8, seed=0):
    labels = np.repeat(np.arange(n_classes), per_class)
    rng = np.random.default_rng(seed)
    labels = labels[rng.permutation(len(labels))]
    images = rng.integers(0, 200, size=(len(labels), h, w, 3), dtype=np.uint8)
    ids = np.array([f"s{i:04d}" for i in range(len(labels))], dtype=object)
    return ImageSet(images, labels, ids, [f"c{i}" for i in range(n_classes)])


# ----------------------------------------------------------------------------------------------- triggers

@pytest.mark.parametrize("kind, position, size, expected", [
    ("pixel", (2, 5), 3, {(2, 5)}),
    ("pattern", (3, 4), 3, {(3, 4), (2, 3), (2, 5), (4, 3), (4, 5)}),
    ("ell", (1, 6), 3, {(1, 6), (2, 6), (1, 7)}),
    ("patch", (5, 6), 2, {(5, 6), (5, 7), (6, 6), (6, 7)}),
    ("patch", (0, 0), 1, {(0, 0)}),
])
def test_local_triggers_paint_exactly_their_pixels(kind, position, size, expected):
    # Black images: every trigger pixel is a visible change, so "changed" equals "painted".
    images = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    original = images.copy()
    out = apply_trigger(images, Trigger(kind, position=position, color=RED, size=size))
    assert np.array_equal(images, original), "input must not be mutated"
    assert out.dtype == np.uint8 and out.shape == images.shape
    assert _changed_pixels(images, out) == expected
    for r, c in expected:
        assert (out[:, r, c, :] == RED).all()


def test_local_trigger_on_random_images_leaves_everything_else():
    images = _images()
    out = apply_trigger(images, Trigger("pattern", position=(1, 1), color=RED))
    mask = np.zeros((8, 8), dtype=bool)
    mask[[1, 0, 0, 2, 2], [1, 0, 2, 0, 2]] = True
    assert np.array_equal(out[:, ~mask], images[:, ~mask])
    assert (out[:, mask] == RED).all()


def test_blend_formula_and_determinism():
    images = _images(n=4, h=5, w=6)
    trig = Trigger("blend", alpha=0.2, pattern_seed=7)
    out = apply_trigger(images, trig)
    pattern = np.random.default_rng(7).integers(0, 256, size=(5, 6, 3), dtype=np.uint8)
    expected = np.rint(0.8 * images.astype(np.float64) + 0.2 * pattern.astype(np.float64)).astype(np.uint8)
    assert np.array_equal(out, expected)
    assert np.array_equal(out, apply_trigger(images, Trigger("blend", alpha=0.2, pattern_seed=7)))
    assert not np.array_equal(out, apply_trigger(images, Trigger("blend", alpha=0.2, pattern_seed=8)))
    # alpha 1 replaces the image with the pattern itself.
    assert np.array_equal(apply_trigger(images, Trigger("blend", alpha=1.0, pattern_seed=7))[2], pattern)


@pytest.mark.parametrize("trigger", [
    Trigger("pixel", position=(8, 0), color=RED),
    Trigger("pixel", position=(-1, 0), color=RED),
    Trigger("pattern", position=(0, 4), color=RED),
    Trigger("pattern", position=(4, 7), color=RED),
    Trigger("ell", position=(3, 7), color=RED),
    Trigger("ell", position=(7, 3), color=RED),
    Trigger("patch", position=(6, 6), size=3, color=RED),
])
def test_trigger_outside_image_raises(trigger):
    with pytest.raises(AttackError, match=rf"{trigger.kind} trigger.*\({trigger.position[0]}, "
                                          rf"{trigger.position[1]}\).*8x8 image"):
        apply_trigger(_images(), trigger)
    assert issubclass(AttackError, DataError)


@pytest.mark.parametrize("kwargs, msg", [
    (dict(kind="laser"), "unknown trigger kind"),
    (dict(kind="pixel", color=(0, 0, 256)), "outside 0..255"),
    (dict(kind="pixel", color=(0, -1, 0)), "outside 0..255"),
    (dict(kind="pixel", color=(0, 0)), "3 integers"),
    (dict(kind="blend", alpha=0.0), r"alpha must be in \(0, 1\]"),
    (dict(kind="blend", alpha=1.5), r"alpha must be in \(0, 1\]"),
    (dict(kind="patch", size=0), "size must be >= 1"),
])
def test_trigger_validation(kwargs, msg):
    with pytest.raises(AttackError, match=msg):
        Trigger(**kwargs)


# ---------------------------------------------------------------------------------------------- scenarios

def _scenario(**kw):
    args = dict(name="t", trigger=Trigger("pixel", position=(1, 1), color=RED), source=1, target=2, rate=0.25,
                seed=3)
    args.update(kw)
    return Scenario(**args)


def test_scenario_validation():
    with pytest.raises(AttackError, match="source equals target"):
        _scenario(source=2, target=2)
    with pytest.raises(AttackError, match="exactly one of rate and count"):
        _scenario(count=3)
    with pytest.raises(AttackError, match="exactly one of rate and count"):
        _scenario(rate=None)
    with pytest.raises(AttackError, match=r"rate must be in \(0, 1\]"):
        _scenario(rate=1.5)
    with pytest.raises(AttackError, match="count must be >= 1"):
        _scenario(rate=None, count=0)


def test_class_out_of_range_names_class_and_count():
    ds = _dataset(n_classes=4)
    with pytest.raises(AttackError, match="target class 9 is outside the dataset's 4 classes"):
        poison(ds, _scenario(target=9))
    with pytest.raises(AttackError, match="source class 4 is outside the dataset's 4 classes"):
        triggered_test(ds, _scenario(source=4))


def test_poison_exact_victims_and_nothing_else():
    ds = _dataset(per_class=20)
    before = ds.images.copy(), ds.labels.copy(), ds.sample_ids.copy()
    scen = _scenario(rate=0.25, source=1, target=2)
    poisoned, mask = poison(ds, scen)
    assert np.array_equal(ds.images, before[0]) and np.array_equal(ds.labels, before[1])
    assert mask.dtype == bool and mask.sum() == int(0.25 * 20) == 5
    assert (ds.labels[mask] == 1).all()
    assert (poisoned.labels[mask] == 2).all()
    assert np.array_equal(poisoned.labels[~mask], ds.labels[~mask])
    assert np.array_equal(poisoned.images[~mask], ds.images[~mask])
    assert np.array_equal(poisoned.images[mask], apply_trigger(ds.images[mask], scen.trigger))
    assert np.array_equal(poisoned.sample_ids, ds.sample_ids)
    assert poisoned.class_names == ds.class_names
    # Victims are drawn exactly as the paper's code draws them.
    class_idxs = np.where(ds.labels == 1)[0]
    victims = np.random.RandomState(3).choice(class_idxs, size=5, replace=False)
    assert set(np.flatnonzero(mask)) == set(victims)


def test_poison_deterministic_and_seed_dependent():
    ds = _dataset(per_class=40)
    _, mask_a = poison(ds, _scenario(rate=0.25, seed=11))
    poisoned_b, mask_b = poison(ds, _scenario(rate=0.25, seed=11))
    _, mask_c = poison(ds, _scenario(rate=0.25, seed=12))
    assert np.array_equal(mask_a, mask_b)
    assert not np.array_equal(mask_a, mask_c)
    assert mask_c.sum() == mask_a.sum() == 10


def test_poison_all_to_one_and_count_mode():
    ds = _dataset(per_class=10, n_classes=4)
    poisoned, mask = poison(ds, _scenario(source=None, target=0, rate=0.5))
    assert mask.sum() == int(0.5 * 30) == 15
    assert (ds.labels[mask] != 0).all() and (poisoned.labels[mask] == 0).all()
    poisoned, mask = poison(ds, _scenario(rate=None, count=7))
    assert mask.sum() == 7 and (ds.labels[mask] == 1).all() and (poisoned.labels[mask] == 2).all()
    with pytest.raises(AttackError, match="count 11 exceeds the 10 samples of source class 1"):
        poison(ds, _scenario(rate=None, count=11))
    with pytest.raises(AttackError, match="zero poisons"):
        poison(ds, _scenario(rate=0.05))


def test_poison_trigger_outside_image_raises():
    with pytest.raises(AttackError, match="outside the 8x8 image"):
        poison(_dataset(), _scenario(trigger=Trigger("ell", position=(0, 7), color=RED)))


def test_triggered_test_keeps_true_labels_and_ids():
    ds = _dataset(per_class=5)
    scen = _scenario(source=1, target=2)
    trig = triggered_test(ds, scen)
    idx = np.where(ds.labels == 1)[0]
    assert np.array_equal(trig.sample_ids, ds.sample_ids[idx])
    assert (trig.labels == 1).all()
    assert np.array_equal(trig.images, apply_trigger(ds.images[idx], scen.trigger))
    all_to_one = triggered_test(ds, _scenario(source=None, target=2))
    assert len(all_to_one) == 15 and (all_to_one.labels != 2).all()


def test_resolve_reports_count_and_class_names():
    d = resolve(_scenario(rate=0.25), _dataset(per_class=20))
    assert d["resolved"]["n_poison"] == 5
    assert d["resolved"]["source_class"] == "c1" and d["resolved"]["target_class"] == "c2"
    json.dumps(d)
    assert Scenario.from_dict(d) == _scenario(rate=0.25)


# ------------------------------------------------------------------------------------------- paper's grid

def test_paper_grid_known_values():
    table = paper_scenario_table(100)
    assert len(table) == 24 and [row["id"] for row in table] == list(range(24))
    assert table[2] == {"id": 2, "source": 3, "target": 5, "kind": "ell", "position": [2, 14],
                        "color": [34, 241, 240], "rate": 0.05}
    assert table[15] == {"id": 15, "source": 3, "target": 7, "kind": "pattern", "position": [16, 2],
                         "color": [61, 14, 183], "rate": 0.1}
    json.dumps(table)
    scen = paper_scenarios(100)
    assert scen[2].name == "paper-s100-id02-3to5-ell-0.05"
    assert scen[2].seed == 100 + 5 + 30 + 5
    assert scen[15].seed == 100 + 10 + 30 + 7


def test_paper_grid_rate_major_and_in_image():
    for seed in (100, 1000, 10000):
        table = paper_scenario_table(seed)
        for row in table:
            rate_index, pair_index = divmod(row["id"], 8)
            assert row["rate"] == (0.05, 0.1, 0.2)[rate_index]
            same_pair = table[pair_index]
            assert (row["source"], row["target"], row["kind"], row["position"], row["color"]) == (
                same_pair["source"], same_pair["target"], same_pair["kind"], same_pair["position"],
                same_pair["color"])
        blank = np.zeros((1, 32, 32, 3), dtype=np.uint8)
        for scen in paper_scenarios(seed):
            apply_trigger(blank, scen.trigger)  # raises if any pixel is outside 32x32


def test_paper_spec_parsing():
    assert parse_scenario_spec("paper:100:15") == paper_scenarios(100)[15]
    for bad in ("paper:100:24", "paper:100:-1", "paper:x:1", "paper:100", "paper:100:2:3"):
        with pytest.raises(AttackError, match=f"scenario spec '{bad}'"):
            parse_scenario_spec(bad)


# ------------------------------------------------------------------------------------------------ YAML

def test_yaml_round_trip(tmp_path):
    for scen in (paper_scenarios(1000)[7],
                 _scenario(source=None, rate=None, count=4, trigger=Trigger("blend", alpha=0.3, pattern_seed=5)),
                 _scenario(trigger=Trigger("patch", position=(2, 3), size=4, color=(1, 2, 3)))):
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump(scen.to_dict()))
        assert parse_scenario_spec(str(path)) == scen
        assert Scenario.from_dict(scen.to_dict()) == scen


def _good_dict():
    return {"name": "y", "seed": 1, "attack": {"kind": "pixel", "source": 0, "target": 1, "rate": 0.1,
                                               "position": [1, 2], "color": [3, 4, 5]}}


@pytest.mark.parametrize("edit, msg", [
    (lambda d: d["attack"].update(kind="laser"), "'attack.kind': unknown trigger kind 'laser'"),
    (lambda d: d["attack"].pop("target"), "missing key 'attack.target'"),
    (lambda d: d.pop("seed"), "missing key 'seed'"),
    (lambda d: d["attack"].pop("position"), "missing key 'attack.position'"),
    (lambda d: d["attack"].update(count=3), "give exactly one, got both"),
    (lambda d: d["attack"].pop("rate"), "give exactly one, got neither"),
    (lambda d: d["attack"].update(rtae=0.1), "unknown key 'rtae'"),
    (lambda d: d["attack"].update(target=0), "source equals target"),
    (lambda d: d["attack"].update(color=[0, 0, 300]), "outside 0..255"),
])
def test_bad_yaml_names_file_and_key(tmp_path, edit, msg):
    d = _good_dict()
    edit(d)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(AttackError, match=msg) as info:
        parse_scenario_spec(str(path))
    assert str(path) in str(info.value)


def test_yaml_unsafe_tags_and_missing_file_rejected(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("!!python/object/apply:os.system ['true']\n")
    with pytest.raises(AttackError, match="not valid YAML"):
        parse_scenario_spec(str(path))
    with pytest.raises(AttackError, match="no such scenario file"):
        parse_scenario_spec(str(tmp_path / "nope.yaml"))
