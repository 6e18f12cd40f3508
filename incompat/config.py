"""params.yaml, typed once: the DVC stages, the flows and the CLI all read parameters through `load_params`."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from incompat.ispl import DefenseConfig
from incompat.training import TrainConfig

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(ValueError):
    pass


@dataclass
class IngestParams:
    source: str = "../shared/data/cifar10/train.parquet"
    test_source: str | None = "../shared/data/cifar10/test.parquet"
    subset: int | None = None
    seed: int = 0
    image_size: list[int] | None = None
    on_bad_sample: str = "fail"


@dataclass
class PoisonParams:
    scenario: str = "paper:100:2"


@dataclass
class GridParams:
    scenarios: list[str] | None = None  # scenario specs; None = the paper's grid below
    paper_seed: int = 100
    ids: str = "0-23"  # paper scenario ids: "0-23", "2,15"
    workers: int = 1  # local Dask worker processes (1 = no Dask)
    memory_limit: str = "4GiB"
    retrain: bool = True
    out: str = "data/grid"


@dataclass
class Params:
    ingest: IngestParams = field(default_factory=IngestParams)
    poison: PoisonParams = field(default_factory=PoisonParams)
    train: TrainConfig = field(default_factory=TrainConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    grid: GridParams = field(default_factory=GridParams)
    profile: str = "paper"
    raw: dict = field(default_factory=dict)


def _typed(cls, values: dict | None, group: str):
    values = values or {}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"params.yaml [{group}]: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    return cls(**values)


# The paper's names for two knobs, accepted anywhere a defense key is (`dvc exp run -S defense.alpha=4`).
PAPER_NAMES = {"alpha": "boost"}


def resolve_defense(raw: dict, profile: str | None = None, overrides: dict | None = None) -> tuple[str, DefenseConfig]:
    """The paper's defaults, then the chosen profile's overrides, then the `defense` group's own keys."""
    # a null in the `defense` group means "the profile's value" (the key is there so `dvc exp run -S` can set it)
    group = {PAPER_NAMES.get(k, k): v for k, v in (raw.get("defense") or {}).items() if v is not None}
    overrides = {PAPER_NAMES.get(k, k): v for k, v in (overrides or {}).items()}
    profile = profile or group.pop("profile", "paper")
    group.pop("profile", None)
    profiles = raw.get("defense_profiles") or {"paper": {}}
    if profile not in profiles:
        raise ConfigError(f"params.yaml: unknown defense profile {profile!r}; profiles: {sorted(profiles)}")
    values = {PAPER_NAMES.get(k, k): v for k, v in (profiles[profile] or {}).items()}
    for key, value in {**group, **overrides}.items():
        if key == "learner_train" and isinstance(value, dict):
            values["learner_train"] = {**values.get("learner_train", {}), **value}
        else:
            values[key] = value
    try:
        return profile, DefenseConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"params.yaml [defense, profile {profile}]: {exc}") from None


def parse_overrides(pairs: list[str]) -> dict:
    """`key=value` strings (dotted keys for nested groups, values read as YAML) -> an overrides mapping."""
    overrides: dict = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"an override must look like key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        target = overrides
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = yaml.safe_load(value)
    return overrides


def load_params(path: str | os.PathLike = DEFAULT_PARAMS, profile: str | None = None,
                defense_overrides: dict | None = None) -> Params:
    path = Path(path)
    if path.exists():
        with open(path) as fh:
            raw = yaml.safe_load(fh) or {}
    else:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of parameter groups")
    known_groups = {"ingest", "poison", "train", "defense", "defense_profiles", "grid"}
    unknown = set(raw) - known_groups
    if unknown:
        raise ConfigError(f"{path}: unknown parameter group(s) {sorted(unknown)}")
    try:
        train = TrainConfig.from_dict(raw.get("train") or {})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path} [train]: {exc}") from None
    chosen, defense = resolve_defense(raw, profile, defense_overrides)
    return Params(
        ingest=_typed(IngestParams, raw.get("ingest"), "ingest"),
        poison=_typed(PoisonParams, raw.get("poison"), "poison"),
        train=train,
        defense=defense,
        grid=_typed(GridParams, raw.get("grid"), "grid"),
        profile=chosen,
        raw=raw,
    )
