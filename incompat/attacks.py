"""Backdoor triggers, poisoning scenarios, and the paper's scenario grid.

Positions are (row, col) in array indexing, `img[row, col, :]`, throughout.

The paper's grid and victim choice reproduce its public code draw for draw (legacy `np.random.RandomState`),
so that scenario `paper:100:2` here poisons exactly the samples the paper poisoned.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from incompat.data import DataError, ImageSet

KINDS = ("pixel", "pattern", "ell", "patch", "blend")
# Kinds whose pixels are painted with `color` at `position`; blend uses neither.
LOCAL_KINDS = ("pixel", "pattern", "ell", "patch")

PAPER_PAIRS = ((0, 2), (1, 3), (3, 5), (7, 4), (2, 5), (8, 6), (9, 2), (3, 7))
PAPER_RATES = (0.05, 0.1, 0.2)
PAPER_METHODS = ("pixel", "pattern", "ell")
PAPER_SEEDS = (100, 1000, 10000)
N_PAPER_SCENARIOS = len(PAPER_PAIRS) * len(PAPER_RATES)

# Blending a whole dataset in float64 at once would need ~1.2 GB for CIFAR-10's train set.
_BLEND_CHUNK = 4096


class AttackError(DataError):
    """A trigger or scenario that cannot be built or applied; the message names the trigger/scenario/file."""


def _as_int(value: Any, what: str) -> int:
    # bool is an int subclass; `rate: true` in a YAML file is a mistake, not 1.
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise AttackError(f"{what} must be an integer, got {value!r}")
    return int(value)


def _as_float(value: Any, what: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise AttackError(f"{what} must be a number, got {value!r}")
    return float(value)


def _as_int_tuple(value: Any, length: int, what: str) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != length:
        raise AttackError(f"{what} must be a list of {length} integers, got {value!r}")
    return tuple(_as_int(v, what) for v in value)


# --------------------------------------------------------------------------------------------------- triggers


@dataclass(frozen=True)
class Trigger:
    kind: str
    position: tuple[int, int] = (0, 0)
    color: tuple[int, int, int] = (255, 255, 255)
    size: int = 3
    alpha: float = 0.1
    pattern_seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise AttackError(f"unknown trigger kind {self.kind!r}; known kinds: {', '.join(KINDS)}")
        # Plain ints/tuples so that equality, hashing and YAML/JSON output do not depend on numpy types.
        object.__setattr__(self, "position", _as_int_tuple(self.position, 2, f"{self.kind} trigger position"))
        color = _as_int_tuple(self.color, 3, f"{self.kind} trigger color")
        if any(not 0 <= c <= 255 for c in color):
            raise AttackError(f"{self.kind} trigger color {list(color)} has a channel outside 0..255")
        object.__setattr__(self, "color", color)
        size = _as_int(self.size, f"{self.kind} trigger size")
        if size < 1:
            raise AttackError(f"{self.kind} trigger size must be >= 1, got {size}")
        object.__setattr__(self, "size", size)
        alpha = _as_float(self.alpha, f"{self.kind} trigger alpha")
        if not 0.0 < alpha <= 1.0:
            raise AttackError(f"{self.kind} trigger alpha must be in (0, 1], got {alpha}")
        object.__setattr__(self, "alpha", alpha)
        pattern_seed = _as_int(self.pattern_seed, f"{self.kind} trigger pattern_seed")
        if pattern_seed < 0:  # default_rng refuses negative seeds; say so here, not at apply time
            raise AttackError(f"{self.kind} trigger pattern_seed must be >= 0, got {pattern_seed}")
        object.__setattr__(self, "pattern_seed", pattern_seed)

    def describe(self) -> str:
        if self.kind == "blend":
            return f"blend trigger (alpha {self.alpha:g}, pattern_seed {self.pattern_seed})"
        extra = f" size {self.size}" if self.kind == "patch" else ""
        return f"{self.kind} trigger{extra} at (row, col) {self.position}"

    def pixels(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cols) of the pixels a local trigger paints; blend touches every pixel and has none."""
        r, c = self.position
        if self.kind == "pixel":
            offsets = [(0, 0)]
        elif self.kind == "pattern":
            offsets = [(0, 0), (-1, -1), (-1, 1), (1, -1), (1, 1)]
        elif self.kind == "ell":
            offsets = [(0, 0), (1, 0), (0, 1)]
        elif self.kind == "patch":
            offsets = [(i, j) for i in range(self.size) for j in range(self.size)]
        else:
            raise AttackError(f"{self.describe()} has no fixed pixels")
        rows = np.array([r + dr for dr, _ in offsets], dtype=np.int64)
        cols = np.array([c + dc for _, dc in offsets], dtype=np.int64)
        return rows, cols

    def check_fits(self, image_shape: tuple[int, ...]) -> None:
        """Raise AttackError unless every trigger pixel lies inside an image of shape (H, W[, C])."""
        h, w = int(image_shape[0]), int(image_shape[1])
        if self.kind == "blend":
            return
        channels = int(image_shape[2]) if len(image_shape) > 2 else 3
        if channels != 3:
            raise AttackError(f"{self.describe()}: needs RGB images, got {channels} channel(s)")
        rows, cols = self.pixels()
        # Checked explicitly because numpy would silently wrap a negative index to the other edge.
        if rows.min() < 0 or cols.min() < 0 or rows.max() >= h or cols.max() >= w:
            raise AttackError(
                f"{self.describe()} covers rows {int(rows.min())}..{int(rows.max())}, cols "
                f"{int(cols.min())}..{int(cols.max())}: outside the {h}x{w} image (rows 0..{h - 1}, cols "
                f"0..{w - 1})"
            )

    def blend_pattern(self, image_shape: tuple[int, int, int]) -> np.ndarray:
        rng = np.random.default_rng(self.pattern_seed)
        return rng.integers(0, 256, size=tuple(image_shape), dtype=np.uint8)


def apply_trigger(images: np.ndarray, trigger: Trigger) -> np.ndarray:
    """Return a triggered copy of `images` (N, H, W, C) uint8; the input is never modified."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise AttackError(f"{trigger.describe()}: expects a uint8 (N,H,W,C) array, got {images.dtype} "
                          f"{images.shape}")
    trigger.check_fits(images.shape[1:])
    if trigger.kind == "blend":
        return _blend(images, trigger)
    out = images.copy()
    if trigger.kind == "patch":
        r, c = trigger.position
        out[:, r: r + trigger.size, c: c + trigger.size, :] = np.asarray(trigger.color, dtype=np.uint8)
    else:
        rows, cols = trigger.pixels()
        out[:, rows, cols, :] = np.asarray(trigger.color, dtype=np.uint8)
    return out


def _blend(images: np.ndarray, trigger: Trigger) -> np.ndarray:
    # Chen et al. 2017: x' = (1 - alpha) x + alpha P. Rounded half-to-even (np.rint, as Python's round) in
    # float64 so that the result is exactly reproducible from the formula.
    pattern = trigger.blend_pattern(images.shape[1:]).astype(np.float64)
    out = np.empty_like(images)
    for start in range(0, len(images), _BLEND_CHUNK):
        chunk = images[start: start + _BLEND_CHUNK].astype(np.float64)
        mixed = np.rint((1.0 - trigger.alpha) * chunk + trigger.alpha * pattern)
        out[start: start + _BLEND_CHUNK] = np.clip(mixed, 0, 255).astype(np.uint8)
    return out


# -------------------------------------------------------------------------------------------------- scenarios

_TOP_KEYS = ("name", "seed", "attack", "resolved")
_ATTACK_KEYS = ("kind", "source", "target", "rate", "count", "position", "color", "size", "alpha", "pattern_seed")


@dataclass(frozen=True)
class Scenario:
    """One poisoning attack. `source=None` is all-to-one: every class except `target` is poisoned.

    `rate` is a fraction of the source class (the paper's convention; for all-to-one, of all non-target
    samples); `count` is an absolute number of poisons. Exactly one of them is set."""

    name: str
    trigger: Trigger
    source: int | None
    target: int
    rate: float | None = None
    count: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        label = f"scenario {self.name!r}"
        if not isinstance(self.trigger, Trigger):
            raise AttackError(f"{label}: trigger must be a Trigger, got {type(self.trigger).__name__}")
        if self.source is not None:
            object.__setattr__(self, "source", _as_int(self.source, f"{label}: source"))
        object.__setattr__(self, "target", _as_int(self.target, f"{label}: target"))
        if self.source is not None and self.source == self.target:
            raise AttackError(f"{label}: source equals target (class {self.target}); a backdoor must move "
                              "samples to another class")
        if min(self.target, self.source if self.source is not None else 0) < 0:
            raise AttackError(f"{label}: class indices must be >= 0 (source {self.source}, target {self.target})")
        if (self.rate is None) == (self.count is None):
            raise AttackError(f"{label}: give exactly one of rate and count (got rate={self.rate}, "
                              f"count={self.count})")
        if self.rate is not None:
            rate = _as_float(self.rate, f"{label}: rate")
            if not 0.0 < rate <= 1.0:
                raise AttackError(f"{label}: rate must be in (0, 1], got {rate}")
            object.__setattr__(self, "rate", rate)
        if self.count is not None:
            count = _as_int(self.count, f"{label}: count")
            if count < 1:
                raise AttackError(f"{label}: count must be >= 1, got {count}")
            object.__setattr__(self, "count", count)
        object.__setattr__(self, "seed", _as_int(self.seed, f"{label}: seed"))

    @property
    def all_to_one(self) -> bool:
        return self.source is None

    def to_dict(self) -> dict:
        t = self.trigger
        attack: dict[str, Any] = {"kind": t.kind, "source": self.source, "target": self.target}
        if self.rate is not None:
            attack["rate"] = self.rate
        else:
            attack["count"] = self.count
        attack.update(position=list(t.position), color=list(t.color), size=t.size, alpha=t.alpha,
                      pattern_seed=t.pattern_seed)
        return {"name": self.name, "seed": self.seed, "attack": attack}

    @classmethod
    def from_dict(cls, d: Mapping, origin: str = "scenario") -> "Scenario":
        """Build from the YAML layout; `origin` (e.g. the file name) starts every error message.

        A top-level `resolved` section (written by `resolve`) is accepted and ignored, so a written
        scenario.yaml reads back."""
        if not isinstance(d, Mapping):
            raise AttackError(f"{origin}: expected a mapping with keys name, seed, attack; got "
                              f"{type(d).__name__}")
        _reject_unknown(d, _TOP_KEYS, origin)
        for key in ("name", "seed", "attack"):
            if key not in d:
                raise AttackError(f"{origin}: missing key {key!r}")
        attack = d["attack"]
        if not isinstance(attack, Mapping):
            raise AttackError(f"{origin}: key 'attack' must be a mapping, got {type(attack).__name__}")
        _reject_unknown(attack, _ATTACK_KEYS, f"{origin}: attack")
        for key in ("kind", "source", "target"):
            if key not in attack:
                raise AttackError(f"{origin}: missing key 'attack.{key}'")
        kind = attack["kind"]
        if kind not in KINDS:
            raise AttackError(f"{origin}: key 'attack.kind': unknown trigger kind {kind!r}; known kinds: "
                              f"{', '.join(KINDS)}")
        if kind in LOCAL_KINDS:
            # No silent default for where a trigger goes or what it looks like.
            for key in ("position", "color"):
                if key not in attack:
                    raise AttackError(f"{origin}: missing key 'attack.{key}' (required for {kind} triggers)")
        if ("rate" in attack) == ("count" in attack):
            which = "both" if "rate" in attack else "neither"
            raise AttackError(f"{origin}: key 'attack.rate'/'attack.count': give exactly one, got {which}")
        source = attack["source"]
        if isinstance(source, str) and source.lower() == "all":
            source = None
        trigger_args = {k: attack[k] for k in ("position", "color", "size", "alpha", "pattern_seed") if k in attack}
        try:
            trigger = Trigger(kind, **trigger_args)
            return cls(name=str(d["name"]), trigger=trigger, source=source, target=attack["target"],
                       rate=attack.get("rate"), count=attack.get("count"), seed=d["seed"])
        except AttackError as exc:
            raise AttackError(f"{origin}: {exc}") from None


def _reject_unknown(d: Mapping, known: tuple[str, ...], where: str) -> None:
    unknown = [k for k in d if k not in known]
    if unknown:
        raise AttackError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(known)}")


def _check_classes(scenario: Scenario, n_classes: int) -> None:
    for role, cls in (("source", scenario.source), ("target", scenario.target)):
        if cls is not None and not 0 <= cls < n_classes:
            raise AttackError(f"scenario {scenario.name!r}: {role} class {cls} is outside the dataset's "
                              f"{n_classes} classes (0..{n_classes - 1})")


def _candidates(labels: np.ndarray, scenario: Scenario) -> np.ndarray:
    if scenario.source is None:
        return np.where(labels != scenario.target)[0]
    return np.where(labels == scenario.source)[0]


def poison_count(dataset: ImageSet, scenario: Scenario) -> int:
    """How many samples `poison` will poison; raises AttackError if that is zero or more than available."""
    _check_classes(scenario, dataset.n_classes)
    available = len(_candidates(dataset.labels, scenario))
    pool = "non-target samples" if scenario.source is None else f"samples of source class {scenario.source}"
    if scenario.count is not None:
        n = scenario.count
        if n > available:
            raise AttackError(f"scenario {scenario.name!r}: count {n} exceeds the {available} {pool}")
    else:
        # int() truncation, as the paper's code does it.
        n = int(scenario.rate * available)
    if n < 1:
        raise AttackError(f"scenario {scenario.name!r}: rate {scenario.rate} of the {available} {pool} "
                          "gives zero poisons")
    return n


def choose_victims(dataset: ImageSet, scenario: Scenario) -> np.ndarray:
    """Indices of the samples to poison, drawn as the paper's code draws them."""
    n = poison_count(dataset, scenario)
    class_idxs = _candidates(dataset.labels, scenario)
    return np.random.RandomState(scenario.seed).choice(class_idxs, size=n, replace=False)


def poison(train: ImageSet, scenario: Scenario) -> tuple[ImageSet, np.ndarray]:
    """Poisoned copy of `train` and its poison_mask. Order and sample ids are unchanged, so the ids reveal
    nothing about which samples were poisoned."""
    scenario.trigger.check_fits(train.image_shape)
    victims = choose_victims(train, scenario)
    images = train.images.copy()
    images[victims] = apply_trigger(train.images[victims], scenario.trigger)
    labels = train.labels.copy()
    labels[victims] = scenario.target
    poison_mask = np.zeros(len(train), dtype=bool)
    poison_mask[victims] = True
    poisoned = ImageSet(images, labels, train.sample_ids.copy(), list(train.class_names),
                        dict(train.extra_metadata))
    return poisoned, poison_mask


def triggered_test(test: ImageSet, scenario: Scenario) -> ImageSet:
    """Every source-class test image (every non-target one for all-to-one) with the trigger applied.

    TRUE labels are kept: attack success is the fraction predicted as `scenario.target`."""
    _check_classes(scenario, test.n_classes)
    idxs = _candidates(test.labels, scenario)
    if len(idxs) == 0:
        pool = "non-target" if scenario.source is None else f"source-class ({scenario.source})"
        raise AttackError(f"scenario {scenario.name!r}: the test set has no {pool} images to trigger")
    return ImageSet(apply_trigger(test.images[idxs], scenario.trigger), test.labels[idxs],
                    test.sample_ids[idxs], list(test.class_names), dict(test.extra_metadata))


def resolve(scenario: Scenario, dataset: ImageSet) -> dict:
    """The scenario dict plus what it means on `dataset` (poison count, class names): for scenario.yaml."""
    n = poison_count(dataset, scenario)
    scenario.trigger.check_fits(dataset.image_shape)
    d = scenario.to_dict()
    d["resolved"] = {
        "n_poison": n,
        "n_candidates": int(len(_candidates(dataset.labels, scenario))),
        "source_class": "all" if scenario.source is None else dataset.class_names[scenario.source],
        "target_class": dataset.class_names[scenario.target],
        "n_classes": dataset.n_classes,
        "image_shape": [int(s) for s in dataset.image_shape],
        "n_samples": len(dataset),
    }
    return d


# ------------------------------------------------------------------------------------------- the paper's grid


def paper_scenarios(seed: int) -> list[Scenario]:
    """The paper's 24 scenarios for one grid seed (100, 1000, 10000 in the paper), ids rate-major."""
    seed = _as_int(seed, "paper grid seed")
    rs = np.random.RandomState(seed)
    # Draw order matters: one method, position, colour per pair, in pair order, exactly as the paper's code.
    per_pair = []
    for _ in PAPER_PAIRS:
        method = PAPER_METHODS[rs.randint(3)]
        if method == "pixel":
            position = rs.randint(31, size=(2,))
        elif method == "pattern":
            position = rs.randint(1, 30, size=(2,))
        else:
            position = rs.randint(0, 30, size=(2,))
        color = rs.randint(255, size=(3,))
        per_pair.append((method, position, color))
    scenarios = []
    for rate_index, rate in enumerate(PAPER_RATES):
        for pair_index, (source, target) in enumerate(PAPER_PAIRS):
            method, position, color = per_pair[pair_index]
            sid = rate_index * len(PAPER_PAIRS) + pair_index
            scenarios.append(Scenario(
                name=f"paper-s{seed}-id{sid:02d}-{source}to{target}-{method}-{rate:g}",
                trigger=Trigger(method, position=tuple(position), color=tuple(color)),
                source=source, target=target, rate=rate,
                seed=seed + int(rate * 100) + source * 10 + target,
            ))
    return scenarios


def paper_scenario(seed: int, scenario_id: int) -> Scenario:
    scenario_id = _as_int(scenario_id, "paper scenario id")
    if not 0 <= scenario_id < N_PAPER_SCENARIOS:
        raise AttackError(f"paper scenario id {scenario_id} is outside 0..{N_PAPER_SCENARIOS - 1}")
    return paper_scenarios(seed)[scenario_id]


def paper_scenario_table(seed: int) -> list[dict]:
    rows = []
    for sid, s in enumerate(paper_scenarios(seed)):
        rows.append({"id": sid, "source": s.source, "target": s.target, "kind": s.trigger.kind,
                     "position": list(s.trigger.position), "color": list(s.trigger.color), "rate": s.rate})
    return rows


# ------------------------------------------------------------------------------------------------------ specs


def parse_scenario_spec(spec: str) -> Scenario:
    """`paper:<seed>:<id>` (id 0..23) or the path of a YAML file in the `Scenario.to_dict` layout."""
    spec = str(spec)
    if spec.startswith("paper:"):
        parts = spec.split(":")
        try:
            if len(parts) != 3:
                raise ValueError
            seed, sid = int(parts[1]), int(parts[2])
        except ValueError:
            raise AttackError(f"scenario spec {spec!r}: expected paper:<seed>:<id>, e.g. paper:100:2") from None
        if not 0 <= sid < N_PAPER_SCENARIOS:
            raise AttackError(f"scenario spec {spec!r}: id {sid} is outside 0..{N_PAPER_SCENARIOS - 1}")
        return paper_scenario(seed, sid)
    return load_scenario_yaml(spec)


def load_scenario_yaml(path: str | Path) -> Scenario:
    from incompat.safe_yaml import YamlInputError, load_yaml

    path = Path(path)
    if not path.is_file():
        raise AttackError(f"{path}: no such scenario file (a scenario spec is paper:<seed>:<id> or a YAML path)")
    try:
        d = load_yaml(path.read_text(), str(path))
    except YamlInputError as exc:
        raise AttackError(f"{exc} (not valid YAML for a scenario)") from None
    return Scenario.from_dict(d, origin=str(path))
