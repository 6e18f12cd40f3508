"""params.yaml, typed once: the DVC stages, the flows and the CLI all read parameters through `load_params`.

Every field's type and range is declared once, on the field (incompat.bounds; the engine's DefenseConfig and
TrainConfig declare theirs, the groups below theirs), and pydantic checks a group against those declarations when
it is read: strict types (no `true` for a count, no `"lots"` for a subset), ranges, choices, unknown keys. A bad
value is one line naming where it came from: `params.yaml [defense] refinement_rounds: must be an integer >= 0,
got -5`, or `--set refinement_rounds: ...` when the command line set it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import annotated_types as at
import pydantic

from incompat.bounds import Count, Seed, declared_rules
from incompat.ispl import DefenseConfig
from incompat.safe_yaml import YamlInputError, load_yaml
from incompat.training import TrainConfig

DEFAULT_PARAMS = Path("params.yaml")
# A parameter file is a page of text; anything much larger is a mistake (or an attack) and is not parsed.
MAX_PARAMS_BYTES = 1 << 20


class ConfigError(ValueError):
    pass


def _scenario_ids(text: str) -> str:
    """`0-23`, `2,15`, `0-3,7`: paper scenario ids 0..23, each range low-high."""
    from incompat.attacks import N_PAPER_SCENARIOS

    parts = text.split(",")
    for part in parts:
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        low, high = (int(match.group(1)), int(match.group(2) or match.group(1))) if match else (1, 0)
        if not match or low > high or high >= N_PAPER_SCENARIOS:
            raise ValueError(f"must look like 0-23 or 2,15 (paper scenario ids 0..{N_PAPER_SCENARIOS - 1}, each "
                             f"range low-high), got {text!r}")
    return text


def _memory_size(text: str) -> str:
    """What Dask's parse_bytes takes for a worker's memory limit: `4GiB`, `500MB`, `2e9`, `auto`."""
    if not re.fullmatch(r"auto|\d+(\.\d+)?(e\d+)?\s*([kKMGTP]i?)?B?", text.strip()):
        raise ValueError(f"must be a size such as 4GiB, 500MB or auto, got {text!r}")
    return text


NonEmptyText = Annotated[str, at.MinLen(1)]


@dataclass
class IngestParams:
    source: NonEmptyText = "../shared/data/cifar10/train.parquet"
    test_source: NonEmptyText | None = "../shared/data/cifar10/test.parquet"
    subset: Count | None = None  # a stratified subset of this many samples; None: all of them
    seed: Seed = 0
    image_size: Annotated[list[Count], at.Len(2, 2)] | None = None  # [height, width]
    on_bad_sample: Literal["fail", "skip"] = "fail"


@dataclass
class PoisonParams:
    scenario: NonEmptyText = "paper:100:2"


@dataclass
class GridParams:
    scenarios: Annotated[list[NonEmptyText], at.MinLen(1)] | None = None  # scenario specs; None = the paper's grid
    paper_seed: Seed = 100
    ids: Annotated[str, pydantic.AfterValidator(_scenario_ids)] = "0-23"  # paper scenario ids: "0-23", "2,15"
    workers: Count = 1  # local Dask worker processes (1 = no Dask)
    memory_limit: Annotated[str, pydantic.AfterValidator(_memory_size)] = "4GiB"
    retrain: bool = True
    out: NonEmptyText = "data/grid"


@dataclass
class Params:
    ingest: IngestParams = field(default_factory=IngestParams)
    poison: PoisonParams = field(default_factory=PoisonParams)
    train: TrainConfig = field(default_factory=TrainConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    grid: GridParams = field(default_factory=GridParams)
    profile: str = "paper"
    raw: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ validation

@functools.cache
def _adapter(cls: type) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(cls)


def _nested_config(cls: type, name: str) -> type | None:
    """The dataclass a field holds (DefenseConfig.learner_train -> TrainConfig), else None."""
    hint = {f.name: f.type for f in dataclasses.fields(cls)}.get(name)
    return TrainConfig if hint in (TrainConfig, "TrainConfig") else None


def _unknown_key(cls: type, values: dict, prefix: tuple = ()) -> tuple[tuple, list[str]] | None:
    """The first key (as a path) that `cls` does not have, with the keys it has; nested configs too."""
    known = [f.name for f in dataclasses.fields(cls)]
    for key, value in values.items():
        if key not in known:
            return (*prefix, key), known
        inner = _nested_config(cls, key)
        if inner is not None and isinstance(value, dict):
            found = _unknown_key(inner, value, (*prefix, key))
            if found:
                return found
    return None


def _error_text(cls: type, error: dict) -> str:
    """One pydantic error as `must be ..., got ...`, worded from the field's own declaration where it has one."""
    loc = tuple(error["loc"])
    if error["type"] == "value_error":
        return " ".join(str(error["ctx"]["error"]).split())
    owner = cls
    for part in loc[:-1]:
        owner = _nested_config(owner, part) if isinstance(part, str) and dataclasses.is_dataclass(owner) else None
    rule = declared_rules(owner).get(loc[-1]) if owner is not None and loc else None
    got = error.get("input")
    if rule is not None and (rule.base is not object or rule.choices is not None):
        return f"must be {rule.describe()}, got {got!r}"
    return f"{' '.join(error['msg'].split())}, got {got!r}"


def _typed(cls: type, values: Any, where: Callable[[tuple], str]):
    """`values` as a `cls`, checked against the fields' declarations; `where(key_path)` names a key's origin."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where(())}: must be a mapping of keys to values, got {values!r}")
    unknown = _unknown_key(cls, values)
    if unknown:
        path, known = unknown
        raise ConfigError(f"{where(path)}: unknown key; known: {', '.join(known)}")
    try:
        # JSON mode: strict types, yet a YAML list is a fine tuple and a mapping a fine nested config.
        return _adapter(cls).validate_json(json.dumps(values, default=str), strict=True)
    except pydantic.ValidationError as exc:
        errors = exc.errors(include_url=False)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigError(f"{where(tuple(errors[0]['loc']))}: {_error_text(cls, errors[0])}{more}") from None


def _key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _in(values: dict, path: tuple) -> bool:
    for part in path:
        if not isinstance(values, dict) or part not in values:
            return False
        values = values[part]
    return True


# The paper's names for two knobs, accepted anywhere a defense key is (`dvc exp run -S defense.alpha=4`).
PAPER_NAMES = {"alpha": "boost"}


def resolve_defense(raw: dict, profile: str | None = None, overrides: dict | None = None,
                    source: str = "params.yaml") -> tuple[str, DefenseConfig]:
    """The paper's defaults, then the chosen profile's overrides, then the `defense` group's own keys, then the
    command line's (--set). `source` names the file in errors."""
    group = raw.get("defense") or {}
    if not isinstance(group, dict):
        raise ConfigError(f"{source} [defense]: must be a mapping of keys to values, got {group!r}")
    # a null in the `defense` group means "the profile's value" (the key is there so `dvc exp run -S` can set it)
    group = {PAPER_NAMES.get(k, k): v for k, v in group.items() if v is not None}
    overrides = {PAPER_NAMES.get(k, k): v for k, v in (overrides or {}).items()}
    profile = profile or group.pop("profile", "paper")
    group.pop("profile", None)
    profiles = raw.get("defense_profiles") or {"paper": {}}
    if not isinstance(profiles, dict):
        raise ConfigError(f"{source} [defense_profiles]: must be a mapping of profile names to groups")
    if not isinstance(profile, str) or profile not in profiles:
        raise ConfigError(f"{source}: unknown defense profile {profile!r}; profiles: {sorted(profiles)}")
    chosen = profiles[profile] or {}
    if not isinstance(chosen, dict):
        raise ConfigError(f"{source} [defense_profiles.{profile}]: must be a mapping of keys to values")
    from_profile = {PAPER_NAMES.get(k, k): v for k, v in chosen.items()}
    values: dict = dict(from_profile)
    for key, value in {**group, **overrides}.items():
        if key == "learner_train" and isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    if isinstance(values.get("learner_train"), dict):  # on top of the paper's learner recipe, not TrainConfig's
        values["learner_train"] = {**DefenseConfig().learner_train.to_dict(), **values["learner_train"]}

    def where(path: tuple) -> str:
        if not path:
            return f"{source} [defense, profile {profile}]"
        if _in(overrides, path):
            return f"--set {_key(path)}"
        if _in(group, path) or not _in(from_profile, path):
            return f"{source} [defense] {_key(path)}"
        return f"{source} [defense_profiles.{profile}] {_key(path)}"

    config = _typed(DefenseConfig, values, where)
    try:
        config.validate()  # the rules that tie fields together
    except ValueError as exc:
        raise ConfigError(f"{where(())}: {exc}") from None
    return profile, config


def parse_overrides(pairs: list[str]) -> dict:
    """`key=value` strings (dotted keys for nested groups, values read as YAML) -> an overrides mapping."""
    overrides: dict = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"an override must look like key=value, got {pair!r}")
        target = overrides
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--set {key}: {part} is set to a value as well as to keys")
        try:
            target[parts[-1]] = load_yaml(value, origin=f"--set {key}")
        except YamlInputError as exc:
            raise ConfigError(str(exc)) from None
    return overrides


def read_params_file(path: str | os.PathLike) -> dict:
    """The raw groups of a parameter file. A missing file is an error, never the built-in defaults: a mistyped
    --params would otherwise run the paper profile on ResNet-32 over the whole dataset."""
    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "no such parameter file"
        raise ConfigError(f"{path}: {what} (--params names the parameter file; the project's is params.yaml)")
    size = path.stat().st_size
    if size > MAX_PARAMS_BYTES:
        raise ConfigError(f"{path}: {size:,} bytes; a parameter file over {MAX_PARAMS_BYTES:,} bytes is refused")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"), origin=str(path))
    except YamlInputError as exc:
        raise ConfigError(str(exc)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of parameter groups, got {type(raw).__name__}")
    return raw


GROUPS = ("ingest", "poison", "train", "defense", "defense_profiles", "grid")


def load_params(path: str | os.PathLike | None = DEFAULT_PARAMS, profile: str | None = None,
                defense_overrides: dict | None = None) -> Params:
    """The typed parameters of `path`; `path=None`: the built-in defaults (the paper's recipe), for code that
    asks for them by name. A missing file, an unknown key, a value of the wrong type or out of range: ConfigError,
    one line naming the file, group and key (or the --set flag)."""
    raw = {} if path is None else read_params_file(path)
    source = "built-in defaults" if path is None else str(path)
    unknown = [g for g in raw if g not in GROUPS]
    if unknown:
        raise ConfigError(f"{source}: unknown parameter group(s) {sorted(map(str, unknown))}; known: "
                          f"{', '.join(GROUPS)}")

    def group_where(group: str) -> Callable[[tuple], str]:
        return lambda path_: f"{source} [{group}]" + (f" {_key(path_)}" if path_ else "")

    train = _typed(TrainConfig, raw.get("train"), group_where("train"))
    chosen, defense = resolve_defense(raw, profile, defense_overrides, source)
    return Params(
        ingest=_typed(IngestParams, raw.get("ingest"), group_where("ingest")),
        poison=_typed(PoisonParams, raw.get("poison"), group_where("poison")),
        train=train,
        defense=defense,
        grid=_typed(GridParams, raw.get("grid"), group_where("grid")),
        profile=chosen,
        raw=raw,
    )
