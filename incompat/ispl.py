"""ISPL+B: inverse self-paced learning weak learners, boosting, a majority vote and self-paced refinement.

Follows Jin, Sun & Rinard (ICLR 2023) and its public code:
  weak learner  start from a random half of the data (later learners of a bag: their whole active set);
                train; per-sample loss over the active set, smoothed across rounds (EMA, decay 0.9); keep the
                lowest-loss fraction overall OR below a per-class quantile (so no class vanishes); train the next
                round on a random 1/beta of the kept set; the threshold shrinks from 3x to 1x the data fraction;
                a fresh model is trained on the final kept set (the core set).
  boosting      `boost` learners per bag, each removing its core set from the active set; `bags` passes.
  vote          every learner's core model predicts the full dataset; keep where the (seeded, random tie-break)
                plurality equals the label and more than one learner agrees.
  refinement    retrain on the kept set, EMA of "predicted correctly", keep where the EMA > threshold.
  review order  the suspicion score ranks removed samples by how strongly the learners contradict the label,
                weighted by how over-represented the sample's (label, other class) cell is (see review_order).

Options for small models (all off by default, i.e. the paper's behaviour; the `cpu_crossfit` profile turns them on):
  held-out vote         (vote_rule="held_out") each sample is judged only by the learners whose core set does not
                        hold it, by their mean softmax probability of its label; kept where >= vote_threshold.
  cross-fitted refinement (refinement_folds >= 2) every sample gets a seeded fold; fold model f trains on the
                        trusted samples outside fold f and judges fold f, so a verdict never comes from a model
                        that trained on the sample (no memorisation needed to keep a hard clean image). The EMA
                        is then of the judged probability vector; kept where p(label) >= refinement_threshold;
                        the next round trains on kept samples with p(label) >= refinement_train_threshold,
                        and (refinement_class_floor) on at least that share of every class in its pool, the
                        class's highest p(label) first, so that a class the first judges have not learned yet
                        is not dropped from their training and then removed whole.
  outside judging       (refinement_judge="outside") one refinement model trains on the trusted samples (the
                        vote's keep at first) and judges only the samples outside them; a judged sample with
                        p(label) >= refinement_train_threshold joins the trusted set for the next round, and the
                        final keep is the trusted set plus the judged samples kept by the cross-fit rule
                        (p(label) >= refinement_threshold, the anomalous-cell test). A sample's latest verdict
                        replaces its earlier ones (no EMA: refinement_decay is unused). The paper's refinement
                        judges the kept samples too, after 100 epochs that fit them; after a few epochs they are
                        not fitted yet, so judging them in-sample removes clean images the model merely has not
                        learned, about three times as many (docs/results.md, "Design choices").
  anomalous cells       (anomaly_ratio > 0) a (label, predicted class) cell among the low-scoring samples
                        (p(label) < anomaly_threshold) that holds anomaly_ratio times more samples than a
                        quasi-symmetric confusion model expects from its transposed cell, significantly
                        (likelihood-ratio z >= anomaly_z), is one group of samples that all look like another class: a
                        source->target poisoning. Its samples are removed up to p(label) < anomaly_threshold.
  trigger stage         (trigger_epochs > 0; incompat.trigger) before the learners, a model trained on everything
                        marks, per class, a group of samples that stands apart in its features (a trigger it
                        learned); those suspects never train a refinement judge, and one is removed when its judged
                        p(label) < trigger_threshold. With detect_mirrors, classes whose flipped images that model
                        takes for each other become learner_train.flip_pairs.

Ground truth is never an input here. Every random draw comes from a seed derived from (seed, bag, learner,
round), so a run resumed from a checkpoint draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Literal, Sequence, get_args

import annotated_types as at
import numpy as np
import torch

from incompat.bounds import (Count, Finite, Fraction, FractionBelowOne, NonNegativeFloat, NonNegativeInt,
                             PositiveFraction, Seed, check_declared)
from incompat.files import atomic_output, write_text_atomic
from incompat.training import (ComputeMeter, TensorData, TrainConfig, TrainingDiverged, fit, per_sample_loss,
                               predict, predict_logits)
from incompat.trigger import TriggerStage, run_trigger_stage, split_suspects

log = logging.getLogger(__name__)


class DefenseError(RuntimeError):
    """The defense cannot produce a trustworthy keep-mask (and says why)."""


VoteRule = Literal["plurality", "held_out"]
RefinementJudge = Literal["all", "outside"]
VOTE_RULES = get_args(VoteRule)
REFINEMENT_JUDGES = get_args(RefinementJudge)


@dataclass
class DefenseConfig:
    """Defaults are the paper's values (ResNet-32 on a GPU). Profiles in params.yaml override them."""

    bags: Count = 3
    boost: Count = 8  # alpha: learners (core sets) per bag
    beta: Annotated[float, at.Ge(1), Finite] = 4.0  # each refit round trains on a random 1/beta of the kept set
    # The core sets of one bag cover this fraction of the data (0.96/alpha each). Below 1% a core set is a handful of
    # samples per class, and the vote keeps next to nothing.
    data_fraction: Annotated[float, at.Interval(ge=0.01, le=1), Finite] = 0.96
    # stop a bag when the active set falls below this fraction (paper: 2000 of 50k)
    min_active: FractionBelowOne = 0.04
    loss_decay: FractionBelowOne = 0.9  # EMA of per-sample losses across refit rounds
    class_floor: Fraction = 0.125  # per-class quantile = threshold * class_floor (paper: thresh / 8)
    # True: a core set is exactly the per-class quantile (a cap as well as a floor), so it holds the same share of
    # every class. Without the cap an easy class can fill the first core set almost whole (77 of its 80 samples
    # in a 4-class test set), the later learners of the bag never see it, and the vote ("more than one learner
    # agrees") then removes the whole class.
    balanced_core: bool = False
    warmup_epochs: Count = 8
    refit_epochs: Count = 4
    refit_rounds: Count | None = None  # None = the paper's 2 + clip(1 // data_fraction_per_learner, 1, 3)
    core_epochs: Count = 40
    vote_min_count: Count = 2  # "more than one learner agrees"
    refinement_rounds: NonNegativeInt = 20  # 0: no refinement, the vote's keep
    refinement_epochs: Count = 5
    refinement_decay: FractionBelowOne = 0.8  # correct <- (1 - decay) * predicted_correctly + decay * correct
    refinement_threshold: Fraction = 0.5
    # Options for small models; the defaults are the paper's behaviour (see the module docstring).
    vote_rule: VoteRule = "plurality"  # plurality (paper) | held_out
    vote_threshold: Fraction = 0.5  # held_out: keep where the out-of-core learners' mean p(label) >= this
    refinement_folds: Count = 1  # 1: the paper's refinement; >= 2: cross-fitted judges
    refinement_train_threshold: Fraction | None = None  # cross-fitted: train on kept with p(label) >= this
    # Cross-fitted: every class keeps at least this fraction of its samples (its highest p(label)) in the set each
    # judge trains on (from the second round: the first trains on the vote's keep). A small class the first
    # 3-epoch judges have not learned yet scores low, drops out of their training set, and is then never learned:
    # on full GTSRB whole small classes were removed.
    refinement_class_floor: Fraction = 0.0
    # all (paper: the kept samples too) | outside (only samples not trained on)
    refinement_judge: RefinementJudge = "all"
    anomaly_ratio: NonNegativeFloat = 0.0  # 0: off; else the (label, predicted) cell test described above
    anomaly_threshold: Fraction = 0.5
    anomaly_z: NonNegativeFloat = 5.0
    # The trigger-aware stage (incompat.trigger; 0 epochs: off, the paper's behaviour). Its model trains this long
    # on everything; a class's suspect group is the top group of a two-group split of its SPECTRE scores holding
    # trigger_min_size to trigger_max_share of the class, when the groups' separation (Ashman's D) is at least
    # trigger_separation times the median class's, or the smaller of its two feature clusters (at most
    # trigger_max_share) when their silhouette is at least trigger_cluster times the median class's (0: not
    # used). Suspects never train a judge; one is removed when its judged p(label) is below trigger_threshold.
    trigger_epochs: NonNegativeInt = 0
    trigger_max_share: PositiveFraction = 0.25
    trigger_separation: NonNegativeFloat = 1.3
    trigger_cluster: NonNegativeFloat = 0.0
    trigger_min_size: Count = 5
    trigger_threshold: Fraction = 0.5
    # With the trigger stage: classes whose flipped images its model (trained without flips) mostly takes for each
    # other are added to learner_train.flip_pairs (share of each class's flipped images >= mirror_share).
    detect_mirrors: bool = False
    mirror_share: PositiveFraction = 0.5
    max_retries: NonNegativeInt = 2  # a diverged training is retried with lr / 10, at most this often
    seed: Seed = 0
    # The filter step's guard, not the clustering's: a keep-mask that removes a whole class, or more than this share
    # of any class, is refused (nothing written) unless allow_class_loss; then metrics and report say it was let by.
    max_class_removed: PositiveFraction = 0.5
    allow_class_loss: bool = False
    learner_train: TrainConfig = field(default_factory=lambda: TrainConfig(
        model="resnet32", batch_size=128, lr=0.1, momentum=0.9, weight_decay=1e-4, schedule="constant",
        nesterov=False, warmup=0.0, label_smoothing=0.0, epochs=1))

    @classmethod
    def from_dict(cls, values: dict) -> "DefenseConfig":
        values = dict(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown defense parameter(s): {sorted(unknown)}; known: {sorted(known)}")
        train = values.pop("learner_train", None)
        cfg = cls(**values)
        if train is not None:
            base = dataclasses.asdict(cfg.learner_train)
            base.update(train)
            cfg.learner_train = TrainConfig.from_dict(base)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def for_classes(self, class_names: Sequence[str]) -> "DefenseConfig":
        """This config with the classes its learners' flip_pairs name turned into labels (TrainConfig.for_classes):
        a name and its label give the same learners, and the same checkpoints."""
        train = self.learner_train.for_classes(class_names)
        return self if train is self.learner_train else dataclasses.replace(self, learner_train=train)

    def validate(self) -> None:
        """Each field against its declaration (incompat.bounds), then the rules that tie fields together."""
        check_declared(self, "defense.")
        if not isinstance(self.learner_train, TrainConfig):
            raise ValueError(f"defense.learner_train must be a TrainConfig, got {self.learner_train!r}")
        if self.refinement_judge == "outside":
            if self.refinement_folds != 1:
                raise ValueError("defense.refinement_judge 'outside' judges with one model: refinement_folds must be 1")
            if self.refinement_train_threshold is None or not (
                    0 < self.refinement_threshold <= self.refinement_train_threshold <= 1):
                raise ValueError("defense.refinement_judge 'outside' needs 0 < refinement_threshold <= "
                                 "refinement_train_threshold <= 1 (a sample trained on must also be kept)")
        if self.trigger_epochs > 0 and self.refinement_rounds == 0:
            raise ValueError("defense.trigger_epochs: the trigger stage's suspects are judged by the refinement; "
                             "it needs refinement_rounds >= 1")
        if self.detect_mirrors and self.trigger_epochs == 0:
            raise ValueError("defense.detect_mirrors uses the trigger stage's model: set trigger_epochs >= 1")
        if self.refinement_class_floor > 0 and self.refinement_folds < 2:
            raise ValueError("defense.refinement_class_floor applies to the cross-fitted refinement only "
                             "(refinement_folds >= 2)")



@dataclass
class LearnerRecord:
    """What the vote needs from a weak learner: its core set and its predictions on the whole dataset."""

    bag: int
    index: int
    core_set: np.ndarray  # bool (N,)
    predictions: np.ndarray  # int64 (N,)
    probabilities: np.ndarray  # float16 (N, n_classes): softmax of the core model
    rounds: list[dict]  # per refit round: kept fraction, mean loss (and poison kept when an observer knows it)
    retries: int = 0
    # The run's compute up to and including this learner, saved with it: a resumed run restores it from the last
    # finished learner, so no kill between two writes can make it count a reused learner's work twice or never.
    meter: ComputeMeter | None = None


@dataclass
class DefenseResult:
    keep_mask: np.ndarray  # bool (N,)
    suspicion: np.ndarray  # float (N,), higher = more suspicious
    vote_agreement: np.ndarray  # fraction of weak learners predicting the sample's label
    # The paper's refinement: final EMA of "refinement model predicted the label". Cross-fitted or outside
    # judging: the judged p(label) (outside: 1 for the vote's keep, which is trusted, never judged).
    refinement_correct: np.ndarray
    learners: list[LearnerRecord]
    refinement_rounds: list[dict]
    meter: ComputeMeter
    wall_seconds: float  # including the time of the work reused from checkpoints of an interrupted run
    model: torch.nn.Module | None = None
    trigger: TriggerStage | None = None  # the trigger-aware stage's suspects, scores, groups and mirror pairs

    @property
    def n_removed(self) -> int:
        return int((~self.keep_mask).sum())


def derive_seed(seed: int, *parts: int) -> int:
    """A stable 31-bit seed for one step, independent of how many draws came before it (resumable)."""
    return int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0] & 0x7FFFFFFF)


def refit_rounds_for(cfg: DefenseConfig, data_perc: float) -> int:
    if cfg.refit_rounds is not None:
        return cfg.refit_rounds
    return 2 + max(1, min(3, int(1 // data_perc)))


def trim(losses: np.ndarray, labels: np.ndarray, n_classes: int, thresh: float, class_floor: float,
         balanced: bool = False) -> np.ndarray:
    """Keep the lowest-loss `thresh` fraction overall, plus the lowest `thresh*class_floor` of every class;
    `balanced`: only the latter (each class contributes its own lowest `thresh*class_floor` share)."""
    losses = np.nan_to_num(losses, nan=float(np.nanmean(losses)) if np.isfinite(losses).any() else 0.0)
    keep = np.zeros(len(losses), dtype=bool)
    class_thresh = thresh * class_floor
    for c in range(n_classes):
        in_class = labels == c
        if in_class.any():
            keep[in_class] = losses[in_class] <= np.quantile(losses[in_class], class_thresh)
    if balanced:
        return keep
    return keep | (losses <= np.quantile(losses, thresh))


def vote(predictions: np.ndarray, n_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Plurality over learners (rows), ties broken uniformly at random. Returns (winner, winner's count)."""
    counts = np.zeros((predictions.shape[1], n_classes), dtype=np.int64)
    for row in predictions:
        counts[np.arange(predictions.shape[1]), row] += 1
    best = counts.max(axis=1)
    # A random key per (sample, class) breaks ties among the classes that reach `best`.
    keys = rng.random(counts.shape) + (counts == best[:, None])
    return keys.argmax(axis=1), best


def vote_keep(learners: list[LearnerRecord], labels: np.ndarray, n_classes: int, cfg: DefenseConfig) -> np.ndarray:
    """The vote's keep-mask over the learners' predictions. With outside judging it is also the ceiling of what the
    defense can remove: the refinement trusts these samples and judges only the others."""
    if cfg.vote_rule == "held_out":
        held_out = held_out_probabilities(learners)
        return held_out[np.arange(len(labels)), labels] >= cfg.vote_threshold
    predictions = np.stack([rec.predictions for rec in learners])
    winner, count = vote(predictions, n_classes, np.random.default_rng(derive_seed(cfg.seed, 2)))
    return (winner == labels) & (count >= cfg.vote_min_count)


# Parameters that only act after the weak learners: changing them reuses the learners' checkpoints.
AFTER_LEARNERS = ("vote_min_count", "refinement_rounds", "refinement_epochs", "refinement_decay",
                  "refinement_threshold", "vote_rule", "vote_threshold", "refinement_folds",
                  "refinement_train_threshold", "refinement_judge", "refinement_class_floor",
                  "anomaly_ratio", "anomaly_threshold", "anomaly_z", "max_class_removed", "allow_class_loss",
                  "trigger_threshold", "trigger_separation", "trigger_min_size", "trigger_cluster")

# Defense keys added after checkpoints existed, with the default that behaves as before them.
LATER_KEYS = {"trigger_epochs": 0, "trigger_max_share": 0.25,
              "detect_mirrors": False, "mirror_share": 0.5}


# learner_train keys added after checkpoints existed, with the default that behaves as before them.
LATER_TRAIN_KEYS = {"loss_trim": 0.0, "flip": True, "flip_pairs": ()}


def learner_fingerprint(cfg: DefenseConfig, data_digest: str) -> str:
    values = {k: v for k, v in cfg.to_dict().items()
              if k not in AFTER_LEARNERS and not (k in LATER_KEYS and v == LATER_KEYS[k])}
    for key, default in LATER_TRAIN_KEYS.items():
        if values["learner_train"].get(key) == default:
            # Left out at its default so that learners saved before the key existed are still reused.
            del values["learner_train"][key]
    return data_digest + json.dumps(values, sort_keys=True, default=str)


class Checkpoint:
    """One JSON + NPZ per finished weak learner, one file for the refinement state. Learner files are valid for
    one (dataset, learner parameters) fingerprint; the refinement state also records the refinement parameters
    and is ignored when they differ. Loaded with allow_pickle=False / weights_only=True."""

    def __init__(self, directory: str | Path | None, fingerprint: str, refinement_fingerprint: str = ""):
        self.directory = Path(directory) if directory else None
        self.fingerprint = fingerprint
        self.refinement_fingerprint = refinement_fingerprint
        if self.directory:
            self.directory.mkdir(parents=True, exist_ok=True)
            marker = self.directory / "fingerprint.txt"
            if marker.exists() and marker.read_text() != fingerprint:
                # Another dataset or other parameters: their learners must not leak into this run.
                for old in self.directory.glob("*.npz"):
                    old.unlink()
                for old in self.directory.glob("*.json"):
                    old.unlink()
                for old in self.directory.glob("*.pt"):
                    old.unlink()
            write_text_atomic(marker, fingerprint)

    def _path(self, name: str, ext: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{name}.{ext}"

    def save_learner(self, rec: LearnerRecord) -> None:
        if not self.directory:
            return
        name = f"learner-b{rec.bag:02d}-{rec.index:02d}"
        # The NPZ is written last: its presence marks the learner finished, so a kill between the two writes
        # leaves only a JSON that the next run ignores and overwrites, never an NPZ without its JSON.
        with atomic_output(self._path(name, "json")) as tmp:
            Path(tmp).write_text(json.dumps({"bag": rec.bag, "index": rec.index, "rounds": rec.rounds,
                                             "retries": rec.retries,
                                             "meter": dataclasses.asdict(rec.meter) if rec.meter else None}))
        with atomic_output(self._path(name, "npz")) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, core_set=rec.core_set, predictions=rec.predictions, probabilities=rec.probabilities)

    def load_learner(self, bag: int, index: int) -> LearnerRecord | None:
        if not self.directory:
            return None
        name = f"learner-b{bag:02d}-{index:02d}"
        npz, meta = self._path(name, "npz"), self._path(name, "json")
        if not (npz.exists() and meta.exists()):
            return None
        try:
            with np.load(npz, allow_pickle=False) as arrays:
                info = json.loads(meta.read_text())
                return LearnerRecord(bag, index, arrays["core_set"].astype(bool),
                                     arrays["predictions"].astype(np.int64), arrays["probabilities"].astype(np.float16),
                                     info["rounds"], info.get("retries", 0),
                                     ComputeMeter(**info["meter"]) if info.get("meter") else None)
        except Exception as exc:  # a damaged checkpoint is not worth a crash: that learner is trained again
            log.warning("%s: damaged checkpoint (%s); training this learner again", npz, exc)
            return None

    def save_refinement(self, round_index: int, models: list[torch.nn.Module], correct: np.ndarray,
                        keep: np.ndarray, history: list[dict], meter: ComputeMeter,
                        probs: np.ndarray | None = None, kept_rounds: np.ndarray | None = None) -> None:
        if not self.directory:
            return
        state = {"round": round_index, "fingerprint": self.refinement_fingerprint,
                 "state_dicts": [m.state_dict() for m in models],
                 "correct": torch.from_numpy(correct), "keep": torch.from_numpy(keep),
                 "history": json.dumps(history), "meter": json.dumps(dataclasses.asdict(meter))}
        if kept_rounds is not None:  # every finished round's keep-mask, bit-packed: a resumed run replays them
            state["kept_rounds"] = torch.from_numpy(kept_rounds)
        if probs is not None:
            state["probs"] = torch.from_numpy(probs)
        with atomic_output(self._path("refinement", "pt")) as tmp:
            torch.save(state, tmp)

    def load_refinement(self) -> dict | None:
        if not self.directory or not self._path("refinement", "pt").exists():
            return None
        try:
            state = torch.load(self._path("refinement", "pt"), weights_only=True, map_location="cpu")
        except Exception as exc:
            log.warning("%s: damaged checkpoint (%s); refinement starts over", self._path("refinement", "pt"), exc)
            return None
        return state if state.get("fingerprint") == self.refinement_fingerprint else None

    def save_trigger(self, stage: TriggerStage, meter: ComputeMeter) -> None:
        if not self.directory:
            return
        with atomic_output(self._path("trigger", "json")) as tmp:
            Path(tmp).write_text(json.dumps({"mirror_pairs": stage.mirror_pairs,
                                             "meter": dataclasses.asdict(meter)}))
        # What the stage's model measured; the suspects are drawn from it on every run (run_defense).
        with atomic_output(self._path("trigger", "npz")) as tmp:  # last: its presence marks the stage done
            with open(tmp, "wb") as fh:
                np.savez(fh, scores=stage.scores, minor=stage.minor, silhouette=stage.silhouette)

    def load_trigger(self) -> tuple[TriggerStage, ComputeMeter] | None:
        if not self.directory:
            return None
        npz, meta = self._path("trigger", "npz"), self._path("trigger", "json")
        if not (npz.exists() and meta.exists()):
            return None
        try:
            with np.load(npz, allow_pickle=False) as arrays:
                info = json.loads(meta.read_text())
                if "minor" not in arrays.files:  # written before the cluster test: the stage runs again
                    return None
                scores = arrays["scores"].astype(np.float64)
                stage = TriggerStage(np.zeros(len(scores), dtype=bool), scores,
                                     tuple(tuple(int(c) for c in p) for p in info["mirror_pairs"]), [],
                                     arrays["minor"].astype(bool), arrays["silhouette"].astype(np.float64))
                return stage, ComputeMeter(**info["meter"])
        except Exception as exc:
            log.warning("%s: damaged checkpoint (%s); the trigger stage runs again", npz, exc)
            return None

    def load_legacy_meter(self) -> ComputeMeter | None:
        """Checkpoints written before the meter moved into the learner files kept it in meter.json."""
        if self.directory and self._path("meter", "json").exists():
            return ComputeMeter(**json.loads(self._path("meter", "json").read_text()))
        return None


RoundObserver = Callable[[str, dict], None]


def _fit_with_retries(data: TensorData, train_cfg: TrainConfig, indices: np.ndarray, cfg: DefenseConfig,
                      meter: ComputeMeter, what: str, model=None, progress=False) -> tuple[torch.nn.Module, int]:
    lr = train_cfg.lr
    for attempt in range(cfg.max_retries + 1):
        try:
            trial = dataclasses.replace(train_cfg, lr=lr)
            return fit(data, trial, indices=indices, model=model, meter=meter, progress=progress), attempt
        except TrainingDiverged as exc:
            if attempt == cfg.max_retries:
                raise TrainingDiverged(f"{what}: loss diverged {attempt + 1} times (last lr {lr:g}): {exc}") from exc
            log.warning("%s: %s; retrying with lr %g", what, exc, lr / 10)
            lr /= 10
    raise AssertionError("unreachable")


def draw_suspects(scores: np.ndarray, minor: np.ndarray, silhouette: np.ndarray, labels: np.ndarray, n_classes: int,
                  cfg: DefenseConfig) -> tuple[np.ndarray, list[dict]]:
    """The trigger stage's suspects and marked groups under cfg's split settings, from what the stage measured."""
    return split_suspects(scores, labels, n_classes, cfg.trigger_max_share, cfg.trigger_separation,
                          cfg.trigger_min_size, minor, silhouette, cfg.trigger_cluster)


def weak_learner(data: TensorData, labels: np.ndarray, n_classes: int, active: np.ndarray, data_perc: float,
                 cfg: DefenseConfig, seed: int, meter: ComputeMeter, observe: RoundObserver | None = None,
                 progress=False, name: str = "learner") -> tuple[np.ndarray, torch.nn.Module, list[dict], int]:
    """One ISPL weak learner over `active` (bool mask). Returns (core_set mask, core model, rounds, retries)."""
    rng = np.random.default_rng(seed)
    active_idx = np.flatnonzero(active)
    active_labels = labels[active_idx]
    n_rounds = refit_rounds_for(cfg, data_perc)
    retries = 0
    rounds: list[dict] = []
    # Round 0: the first learner of a bag starts from a random half (Binomial(0.5) per sample); later learners
    # start from their whole active set, as in the paper's code.
    train_local = rng.random(len(active_idx)) < 0.5 if active.all() else np.ones(len(active_idx), dtype=bool)
    active_keep = np.ones(len(active_idx), dtype=bool)
    loss_ema = np.zeros(len(active_idx))
    model = None
    base = dataclasses.replace(cfg.learner_train, seed=derive_seed(seed, 0))
    if data_perc < 0.999:
        for it in range(n_rounds):
            epochs = cfg.warmup_epochs if it == 0 else cfg.refit_epochs
            train_cfg = dataclasses.replace(base, epochs=epochs, seed=derive_seed(seed, it))
            model, r = _fit_with_retries(data, train_cfg, active_idx[train_local], cfg, meter,
                                         f"{name} round {it}", model=model, progress=progress)
            retries += r
            losses, _ = per_sample_loss(model, data, active_idx, meter=meter)
            losses = np.nan_to_num(losses, nan=np.nanmean(losses))
            loss_ema = losses * (1 - cfg.loss_decay) + loss_ema * cfg.loss_decay
            thresh = min(3, max(1, n_rounds - 2 - it)) * data_perc
            thresh = max(0.0, min(1.0, thresh))
            active_keep = trim(loss_ema, active_labels, n_classes, thresh, cfg.class_floor, cfg.balanced_core)
            # The expansion: the next round sees only a random 1/beta of what was kept.
            train_local = active_keep & (rng.random(len(active_idx)) < 1.0 / cfg.beta)
            if train_local.sum() < 2:
                train_local = active_keep.copy()
            info = {"learner": name, "round": it, "kept_fraction": float(active_keep.mean()),
                    "kept": int(active_keep.sum()), "mean_loss": float(losses.mean()),
                    "train_size": int(train_local.sum()), "threshold": float(thresh)}
            if observe:
                observe("round", {**info, "kept_indices": active_idx[active_keep]})
            rounds.append(info)
    core_set = np.zeros(len(labels), dtype=bool)
    core_set[active_idx[active_keep]] = True
    core_cfg = dataclasses.replace(base, epochs=cfg.core_epochs, seed=derive_seed(seed, 1000))
    core_model, r = _fit_with_retries(data, core_cfg, np.flatnonzero(core_set), cfg, meter, f"{name} core model",
                                      progress=progress)
    return core_set, core_model, rounds, retries + r


def run_defense(images: np.ndarray, labels: np.ndarray, n_classes: int, cfg: DefenseConfig,
                checkpoint_dir: str | Path | None = None, observe: RoundObserver | None = None,
                progress: bool = False, device: str | None = None, fingerprint: str = "") -> DefenseResult:
    """Run ISPL+B on a dataset (uint8 NHWC images, int labels). Returns the keep-mask and per-sample scores."""
    start = time.monotonic()
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if n == 0:
        raise ValueError("cannot sanitize an empty dataset")
    data = TensorData(images, labels, device=device, num_classes=n_classes)
    ckpt = Checkpoint(checkpoint_dir, learner_fingerprint(cfg, fingerprint),
                      json.dumps(cfg.to_dict(), sort_keys=True, default=str))
    meter = ckpt.load_legacy_meter() or ComputeMeter()
    spent_before = meter.seconds  # wall time of the checkpointed work this run reuses

    def stamp() -> ComputeMeter:
        meter.seconds = spent_before + time.monotonic() - start
        return meter

    stage = None
    suspects = np.zeros(n, dtype=bool)
    if cfg.trigger_epochs > 0:
        loaded = ckpt.load_trigger()
        if loaded is not None:
            stage, meter = loaded
            spent_before, start = meter.seconds, time.monotonic()
        else:
            stage = run_trigger_stage(data, images, labels, n_classes, cfg.learner_train, cfg.trigger_epochs,
                                      cfg.trigger_max_share, cfg.detect_mirrors, cfg.mirror_share, meter,
                                      derive_seed(cfg.seed, 5))
            ckpt.save_trigger(stage, dataclasses.replace(stamp()))
        # Drawn from what the stage measured on every run: other split settings reuse the stage's model.
        marked, groups = draw_suspects(stage.scores, stage.minor, stage.silhouette, labels, n_classes, cfg)
        stage = dataclasses.replace(stage, suspects=marked, groups=groups)
        suspects = stage.suspects
        if observe:
            observe("trigger", {"suspects": int(suspects.sum()), "groups": stage.groups,
                                "mirror_pairs": [list(p) for p in stage.mirror_pairs],
                                "suspect_indices": np.flatnonzero(suspects)})
        extra = [p for p in stage.mirror_pairs if p not in cfg.learner_train.flip_pairs]
        if extra:
            cfg = dataclasses.replace(cfg, learner_train=dataclasses.replace(
                cfg.learner_train, flip_pairs=tuple(cfg.learner_train.flip_pairs) + tuple(extra)))
    learners: list[LearnerRecord] = []
    per_learner = cfg.data_fraction / cfg.boost
    bar = _progress(progress, total=cfg.bags * cfg.boost, desc="weak learners")
    for bag in range(cfg.bags):
        active = np.ones(n, dtype=bool)
        for index in range(cfg.boost):
            if active.sum() <= cfg.min_active * n:
                log.info("bag %d: active set down to %d samples; stopping after %d learners", bag, active.sum(), index)
                break
            rec = ckpt.load_learner(bag, index)
            if rec is not None and rec.meter is not None:
                # Learners finish in order: the last one reused carries the compute of all the work before it.
                meter = dataclasses.replace(rec.meter)
                spent_before, start = meter.seconds, time.monotonic()
            if rec is None:
                data_perc = min(1.0, per_learner * n / active.sum())
                seed = derive_seed(cfg.seed, 1, bag, index)
                core_set, core_model, rounds, retries = weak_learner(
                    data, labels, n_classes, active, data_perc, cfg, seed, meter, observe, progress=False,
                    name=f"bag{bag}-learner{index}")
                probabilities = predict_probabilities(core_model, data, meter)
                rec = LearnerRecord(bag, index, core_set, probabilities.argmax(1).astype(np.int64),
                                    probabilities.astype(np.float16), rounds, retries,
                                    dataclasses.replace(stamp()))
                ckpt.save_learner(rec)
            learners.append(rec)
            if observe:
                observe("learner", {"bag": bag, "index": index, "core_size": int(rec.core_set.sum()),
                                    "core_indices": np.flatnonzero(rec.core_set),
                                    "agreement": float((rec.predictions == labels).mean())})
            if cfg.boost > 1:
                active &= ~rec.core_set
            bar.update(1)
    bar.close()
    predictions = np.stack([rec.predictions for rec in learners])
    vote_agreement = (predictions == labels[None, :]).mean(axis=0)
    keep = vote_keep(learners, labels, n_classes, cfg)
    if observe:
        observe("vote", {"kept_fraction": float(keep.mean()), "kept_indices": np.flatnonzero(keep)})

    if cfg.refinement_rounds > 0 and not keep.any():
        raise DefenseError(
            f"the vote kept none of the {n} samples (mean learner agreement with the labels "
            f"{vote_agreement.mean():.1%}): the weak learners are too weak for this dataset; train them longer "
            f"(core_epochs, learner_train.epochs) or use fewer, larger core sets (boost)")
    folds = cfg.refinement_folds
    models: list = [None] * folds
    correct, probs, history, first_round = None, None, [], 0
    kept_rounds: list[np.ndarray] = []
    trusted = keep
    state = ckpt.load_refinement()
    if state is not None:
        for f, weights in enumerate(state["state_dicts"]):
            models[f] = _build_like(cfg.learner_train, n_classes, data)
            models[f].load_state_dict(weights)
        correct, keep = state["correct"].numpy(), state["keep"].numpy()
        probs = state["probs"].numpy() if "probs" in state else None
        history, first_round = json.loads(state["history"]), int(state["round"]) + 1
        meter = ComputeMeter(**json.loads(state["meter"]))
        if "kept_rounds" in state:
            kept_rounds = list(state["kept_rounds"].numpy())
        if observe:  # the trajectory of the checkpointed rounds, so a resumed run's curves are whole
            for info, packed in zip(history, kept_rounds or [None] * len(history)):
                replay = {**info, "replayed": True}
                if packed is not None:
                    replay["kept_indices"] = np.flatnonzero(np.unpackbits(packed, count=n).astype(bool))
                observe("refinement", replay)
        spent_before, start = meter.seconds, time.monotonic()  # its time covers all work up to that round
        trusted = _trusted(cfg, keep, correct)
    trusted = trusted & ~suspects
    # Cross-fitting: a fixed, seeded fold per sample; fold model f never trains on fold f and alone judges it.
    fold_of = np.random.default_rng(derive_seed(cfg.seed, 4)).integers(0, folds, n) if folds > 1 else None
    bar = _progress(progress, total=cfg.refinement_rounds, desc="refinement", initial=first_round)
    for it in range(first_round, cfg.refinement_rounds):
        if folds == 1:  # one model: the paper's refinement, or outside judging (validate() allows only this)
            outside = cfg.refinement_judge == "outside"
            if outside and probs is None:  # the vote's keep is trusted as it stands: p(label) = 1, never judged
                probs = np.eye(n_classes, dtype=np.float32)[labels]
                correct = trusted.astype(np.float64)
            models[0], _ = _fit_with_retries(data, _refinement_train(cfg, it),
                                             np.flatnonzero((trusted if outside else keep) & ~suspects), cfg, meter,
                                             f"refinement round {it}", model=models[0])
            if outside:
                judged = np.flatnonzero(~trusted)
                if len(judged):
                    # The latest verdict replaces the earlier ones: each round's model has trained longer, on more.
                    probs[judged] = torch.softmax(predict_logits(models[0], data, judged, meter=meter),
                                                  dim=1).numpy()
                    correct[judged] = probs[judged, labels[judged]]
                keep = cross_fit_keep(probs, labels, n_classes, cfg, suspects)
                trusted = _trusted(cfg, keep, correct) & ~suspects
            else:
                preds = predict(models[0], data, meter=meter)
                if correct is None:
                    correct = np.full(n, 0.5)
                correct = (1 - cfg.refinement_decay) * (preds == labels) + cfg.refinement_decay * correct
                keep = (correct > cfg.refinement_threshold) & ~(suspects & (correct < cfg.trigger_threshold))
        else:
            judged_probs = np.zeros((n, n_classes), dtype=np.float32)
            for f in range(folds):
                outside = fold_of != f
                train_idx = np.flatnonzero(_class_floor(cfg.refinement_class_floor, trusted & outside, correct,
                                                        labels, outside & ~suspects))
                if len(train_idx) == 0:
                    raise DefenseError(f"refinement round {it}: fold {f} has no trusted sample to train on")
                models[f], _ = _fit_with_retries(data, _refinement_train(cfg, it, f), train_idx, cfg, meter,
                                                 f"refinement round {it} fold {f}", model=models[f])
                judged = np.flatnonzero(fold_of == f)
                if len(judged):
                    judged_probs[judged] = torch.softmax(predict_logits(models[f], data, judged, meter=meter),
                                                         dim=1).numpy()
            probs = judged_probs if probs is None else (
                (1 - cfg.refinement_decay) * judged_probs + cfg.refinement_decay * probs)
            correct = probs[np.arange(n), labels].astype(np.float64)
            keep = cross_fit_keep(probs, labels, n_classes, cfg, suspects)
            trusted = _trusted(cfg, keep, correct) & ~suspects
        if not keep.any():
            raise DefenseError(f"refinement round {it} kept none of the {n} samples: the refinement model "
                               "predicts no label correctly; train it longer (refinement_epochs)")
        info = {"round": it, "kept_fraction": float(keep.mean()), "kept": int(keep.sum())}
        history.append(info)
        if observe:
            observe("refinement", {**info, "kept_indices": np.flatnonzero(keep)})
        kept_rounds.append(np.packbits(keep))
        ckpt.save_refinement(it, models, correct, keep, history, stamp(), probs, np.stack(kept_rounds))
        bar.update(1)
    bar.close()
    model = models[0]
    if correct is None:  # no refinement rounds: the vote decides
        correct = keep.astype(float)
    mean_probs = np.mean([rec.probabilities.astype(np.float64) for rec in learners], axis=0)
    suspicion = review_order(keep, labels, n_classes, mean_probs, vote_agreement, correct,
                             judged=cfg.refinement_judge == "outside" and probs is not None)
    return DefenseResult(keep, suspicion, vote_agreement, correct, learners, history, meter,
                         stamp().seconds, model, stage)


def review_order(keep: np.ndarray, labels: np.ndarray, n_classes: int, mean_probs: np.ndarray,
                 vote_agreement: np.ndarray, correct: np.ndarray, judged: bool = False) -> np.ndarray:
    """The suspicion score: removed samples in [0.5, 1], kept ones in [0, 0.5], so that review goes in this order.

    Kept: how little the learners and the refinement agree with the label (mean of agreement, refinement score
    and the learners' mean p(label)). Removed: (1 - mean p(label)) times the enrichment of the sample's (label,
    most probable other class) cell, relative to the most enriched cell of its label. A poisoning relabels a group
    of one class's images as another, so one (target, source) cell fills far beyond its transposed cell, while
    natural confusions run both ways; by contradiction alone the poisons drown among the hard images of the
    target class, and the enrichment lifts them to the top of the review.

    `judged` (outside judging): `correct` is then the refinement's verdict p(label), from a model that never
    trained on the sample, and removed samples are ranked by 1 - that alone: it ranks poisons higher than the
    learners' score does, and the cell enrichment on top of it only got in the way (figures: docs/results.md,
    "Design choices")."""
    label_probability = mean_probs[np.arange(len(labels)), labels]
    kept_score = 1.0 - (vote_agreement + correct + label_probability) / 3.0
    removed_score = (1.0 - np.clip(correct, 0.0, 1.0)) if judged else attack_score(mean_probs, labels, n_classes)
    return np.where(keep, 0.5 * kept_score, 0.5 + 0.5 * removed_score)


def attack_score(mean_probs: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """In [0, 1]: (1 - mean p(label)) times the enrichment of the sample's cell; review_order's score for removed
    samples."""
    label_probability = mean_probs[np.arange(len(labels)), labels]
    return (1.0 - label_probability) * cell_enrichment(mean_probs, labels, n_classes)


def cell_enrichment(probs: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Per sample, in [0, 1]: the ratio C[label, other] / C[other, label] of its cell, divided by the largest
    ratio in its label's row. `other` is the sample's most probable class besides its label; C counts the samples
    whose most probable class is not their label, by (label, predicted), with +1 smoothing."""
    predicted = probs.argmax(axis=1)
    wrong = predicted != labels
    counts = np.zeros((n_classes, n_classes))
    np.add.at(counts, (labels[wrong], predicted[wrong]), 1.0)
    ratio = (counts + 1.0) / (counts.T + 1.0)
    np.fill_diagonal(ratio, 0.0)
    row_max = ratio.max(axis=1, keepdims=True)
    ratio = ratio / np.where(row_max > 0, row_max, 1.0)
    return ratio[labels, most_probable_other(probs, labels)]


def most_probable_other(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per sample, its most probable class besides its label: the cell a low p(label) puts it in."""
    others = probs.astype(np.float64, copy=True)
    others[np.arange(len(labels)), labels] = -np.inf
    return others.argmax(axis=1)


def held_out_probabilities(learners: list[LearnerRecord]) -> np.ndarray:
    """Mean softmax over the learners whose core set does not hold the sample (all learners for a sample that
    every core set holds). A model that trained on a sample says little about whether its label fits."""
    n = len(learners[0].core_set)
    total = np.zeros(learners[0].probabilities.shape, dtype=np.float64)
    count = np.zeros(n)
    for rec in learners:
        out = ~rec.core_set
        total[out] += rec.probabilities[out].astype(np.float64)
        count += out
    everywhere = count == 0
    if everywhere.any():
        for rec in learners:
            total[everywhere] += rec.probabilities[everywhere].astype(np.float64)
        count[everywhere] = len(learners)
    return total / count[:, None]


def anomalous_cells(probs: np.ndarray, labels: np.ndarray, n_classes: int, threshold: float, ratio: float,
                    z_min: float) -> np.ndarray:
    """Bool (label, predicted) matrix: cells of the low-scoring samples (p(label) < threshold, predicted = their
    most probable other class) that a quasi-symmetric confusion model does not explain.

    Natural confusions are roughly symmetric up to a propensity per class (a class the judges under-predict, for
    instance one that lost samples to the attack, is confused *into* other classes more than the reverse):
    log(C[t,s] / C[s,t]) ~ u_t - u_s, fitted by weighted least squares (weights: inverse variance of the log
    ratio), refitted once without the pairs it cannot explain. A group of one class's images relabelled as another
    (source -> target) fills only the (target, source) cell: flagged where C[t,s] exceeds `ratio` times its
    expectation C[s,t] * exp(u_t - u_s) and the excess is significant (z >= z_min).

    z is the signed root of the likelihood-ratio statistic of C[t,s] out of C[t,s] + C[s,t] against the fitted
    share exp(u_t - u_s) / (1 + exp(u_t - u_s)). The Wald z of the log ratio it replaces has a variance term
    1 / (C[s,t] + 0.5) that caps it below log(2 C[t,s] + 1) / sqrt(2) when the transposed cell is empty, which is
    what a poisoning looks like: a large attacked cell facing an empty one stayed under the usual z_min. The
    likelihood-ratio z grows with the cell's count (docs/results.md, "Design choices")."""
    n = len(labels)
    score = probs[np.arange(n), labels]
    predicted = most_probable_other(probs, labels)
    low = score < threshold
    counts = np.zeros((n_classes, n_classes))
    np.add.at(counts, (labels[low], predicted[low]), 1)
    np.fill_diagonal(counts, 0.0)
    log_ratio = np.log((counts + 0.5) / (counts.T + 0.5))
    weight = 1.0 / (1.0 / (counts + 0.5) + 1.0 / (counts.T + 0.5))
    np.fill_diagonal(weight, 0.0)
    z = np.zeros_like(counts)
    shift = np.zeros_like(counts)  # u_t - u_s fitted without the pair itself
    used = weight.copy()
    for _ in range(2):  # second pass: the fit also leaves out the pairs the first pass could not explain
        for t, s in zip(*np.nonzero(counts > counts.T)):
            w = used.copy()
            w[t, s] = w[s, t] = 0.0  # leave this pair out: one odd cell must not explain itself
            laplacian = np.diag(w.sum(axis=1)) - w + 1e-9 * np.eye(n_classes)
            u = np.linalg.solve(laplacian, (w * log_ratio).sum(axis=1))
            shift[t, s] = u[t] - u[s]
            z[t, s] = _binomial_z(counts[t, s], counts[t, s] + counts[s, t], 1.0 / (1.0 + np.exp(-shift[t, s])))
        used = np.where((z > z_min) | (z.T > z_min), 0.0, weight)
    expected = counts.T * np.exp(shift)
    cells = (counts > ratio * (expected + 1.0)) & (z >= z_min)
    np.fill_diagonal(cells, False)
    return cells


def _binomial_z(x: float, m: float, share: float) -> float:
    """Signed root of the likelihood-ratio statistic of x successes in m trials against probability `share`
    (0 < share < 1): about a standard normal deviate under that share, positive when x exceeds it."""
    def term(k: float, expected: float) -> float:
        return k * np.log(k / expected) if k > 0 else 0.0

    deviance = 2.0 * (term(x, m * share) + term(m - x, m * (1.0 - share)))
    return float(np.copysign(np.sqrt(max(deviance, 0.0)), x - m * share))


def cross_fit_keep(probs: np.ndarray, labels: np.ndarray, n_classes: int, cfg: DefenseConfig,
                   suspects: np.ndarray | None = None) -> np.ndarray:
    """Keep where the judged p(label) >= refinement_threshold, except samples of an anomalous cell scoring below
    anomaly_threshold and the trigger stage's suspects scoring below trigger_threshold."""
    score = probs[np.arange(len(labels)), labels]
    keep = score >= cfg.refinement_threshold
    _, in_cell = flagged_cells(probs, labels, n_classes, cfg)
    keep &= ~(in_cell & (score < cfg.anomaly_threshold))
    if suspects is not None:
        keep &= ~(suspects & (score < cfg.trigger_threshold))
    return keep


def flagged_cells(probs: np.ndarray, labels: np.ndarray, n_classes: int,
                  cfg: DefenseConfig) -> tuple[np.ndarray, np.ndarray]:
    """The anomalous (label, predicted) cells under cfg's test (none when anomaly_ratio is 0), and per sample
    whether its (label, most probable other class) cell is one of them."""
    cells = np.zeros((n_classes, n_classes), dtype=bool)
    if cfg.anomaly_ratio > 0:
        cells = anomalous_cells(probs, labels, n_classes, cfg.anomaly_threshold, cfg.anomaly_ratio, cfg.anomaly_z)
    if not cells.any():
        return cells, np.zeros(len(labels), dtype=bool)
    return cells, cells[labels, most_probable_other(probs, labels)]


def _refinement_train(cfg: DefenseConfig, *round_and_fold: int) -> TrainConfig:
    """The refinement model's training: the learners' recipe with the refinement's epochs."""
    return dataclasses.replace(cfg.learner_train, epochs=cfg.refinement_epochs,
                               seed=derive_seed(cfg.seed, 3, *round_and_fold))


def _trusted(cfg: DefenseConfig, keep: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """The samples the next cross-fitted round trains on (before the class floor)."""
    if cfg.refinement_train_threshold is None:
        return keep
    return keep & (correct >= cfg.refinement_train_threshold)


def _class_floor(fraction: float, chosen: np.ndarray, correct: np.ndarray | None, labels: np.ndarray,
                 pool: np.ndarray) -> np.ndarray:
    """`chosen` (a subset of `pool`) with, for every class, at least `fraction` of the class's samples in `pool`:
    the highest p(label) (`correct`) of those not chosen yet are added."""
    if fraction <= 0 or correct is None:
        return chosen
    chosen = chosen.copy()
    for c in np.unique(labels[pool]):
        members = np.flatnonzero(pool & (labels == c))
        short = int(np.ceil(fraction * len(members))) - int(chosen[members].sum())
        if short > 0:
            candidates = members[~chosen[members]]
            chosen[candidates[np.argsort(-correct[candidates], kind="stable")[:short]]] = True
    return chosen


def predict_probabilities(model: torch.nn.Module, data: TensorData, meter: ComputeMeter) -> np.ndarray:
    return torch.softmax(predict_logits(model, data, None, meter=meter), dim=1).numpy()


def _build_like(train_cfg: TrainConfig, n_classes: int, data: TensorData) -> torch.nn.Module:
    from incompat.models import build_model

    model = build_model(train_cfg.model, n_classes, in_channels=data.image_shape[0], width=train_cfg.width)
    return model.to(data.device).to(memory_format=torch.channels_last)


def _progress(enabled: bool, total: int, desc: str, initial: int = 0):
    """A bar on a terminal; without one (DVC, nohup, a Prefect worker) a line every so often."""
    from incompat.progress import progress

    return progress(enabled, total, desc, initial=initial)
