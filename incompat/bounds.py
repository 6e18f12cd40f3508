"""Each config field's type and range, declared once on the field itself.

A field of an engine config (DefenseConfig, TrainConfig) is declared as, e.g., `epochs: Count = 15` or
`refinement_threshold: Fraction = 0.5`: `typing.Annotated` with annotated_types markers. `incompat.config` has
pydantic read the same declarations when it validates params.yaml (types, ranges, nested values, unknown keys),
and `check_declared` enforces them on a config built in code, so the engine itself needs no pydantic.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from typing import Annotated, Any, Literal

import annotated_types as at

# annotated_types has no "finite" marker; pydantic applies a Predicate as is.
Finite = at.Predicate(math.isfinite)

Count = Annotated[int, at.Ge(1)]  # something done or made at least once: epochs, learners, batch size
NonNegativeInt = Annotated[int, at.Ge(0)]  # rounds or retries that may be zero
Seed = Annotated[int, at.Interval(ge=0, lt=2**32)]  # numpy's SeedSequence / RandomState take 0 <= seed < 2**32
Fraction = Annotated[float, at.Interval(ge=0, le=1), Finite]  # a share or a probability, both ends allowed
FractionBelowOne = Annotated[float, at.Interval(ge=0, lt=1), Finite]  # decays, trims: 1 would mean "all"
PositiveFraction = Annotated[float, at.Interval(gt=0, le=1), Finite]  # a share that must not be empty
NonNegativeFloat = Annotated[float, at.Ge(0), Finite]
PositiveFloat = Annotated[float, at.Gt(0), Finite]


@dataclasses.dataclass(frozen=True)
class Rule:
    """What one field accepts: its base type, its bounds, its choices (Literal), and whether None is allowed."""

    base: Any
    bounds: tuple = ()
    choices: tuple | None = None
    optional: bool = False

    def describe(self) -> str:
        """`an integer >= 1`, `a number in [0, 1]`, `one of 'fail', 'skip'`, each with ` or null` when allowed."""
        if self.choices is not None:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            text = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
                self.base, f"a {getattr(self.base, '__name__', self.base)}")
            limits = _limits(self.bounds)
            if "ge" in limits and "le" in limits:
                text += f" in [{_num(limits['ge'])}, {_num(limits['le'])}]"
            elif "gt" in limits and "le" in limits:
                text += f" in ({_num(limits['gt'])}, {_num(limits['le'])}]"
            elif "ge" in limits and "lt" in limits:
                text += f" in [{_num(limits['ge'])}, {_num(limits['lt'])})"
            else:
                for key, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
                    if key in limits:
                        text += f" {sign} {_num(limits[key])}"
            bounded_both_ways = {"ge", "gt"} & set(limits) and {"le", "lt"} & set(limits)
            if self.base is float and Finite in self.bounds and not bounded_both_ways:
                text = text.replace("a number", "a finite number", 1)
            if self.base is str and any(isinstance(b, at.MinLen) and b.min_length >= 1 for b in self.bounds):
                text = "a non-empty string"
        return text + (" or null" if self.optional else "")

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if self.choices is not None:
            return value in self.choices
        if self.base is bool:
            return isinstance(value, bool)
        if self.base is int:
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        elif self.base is float:
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        elif self.base is str:
            ok = isinstance(value, str)
        else:
            return True  # containers and nested configs: their own validate() checks them
        return ok and all(_within(b, value) for b in self.bounds)


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _limits(bounds: tuple) -> dict:
    limits: dict = {}
    for b in bounds:
        if isinstance(b, at.Interval):
            limits.update({k: getattr(b, k) for k in ("gt", "ge", "lt", "le") if getattr(b, k) is not None})
        elif isinstance(b, (at.Gt, at.Ge, at.Lt, at.Le)):
            key = type(b).__name__.lower()
            limits[key] = getattr(b, key)
    return limits


def _within(bound: Any, value: Any) -> bool:
    if isinstance(bound, at.Predicate):
        return bool(bound.func(value))
    if isinstance(bound, at.MinLen):
        return len(value) >= bound.min_length
    limits = _limits((bound,))
    return all((k != "gt" or value > v) and (k != "ge" or value >= v) and (k != "lt" or value < v)
               and (k != "le" or value <= v) for k, v in limits.items())


def rule_of(hint: Any) -> Rule:
    """The Rule of one resolved field annotation (`Annotated[...]`, `X | None`, `Literal[...]`, a plain type)."""
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        if len(args) != 1:
            return Rule(base=object, optional=optional)
        hint = args[0]
    bounds: tuple = ()
    if typing.get_origin(hint) is Annotated:
        hint, *meta = typing.get_args(hint)
        bounds = tuple(meta)
    if typing.get_origin(hint) is Literal:
        return Rule(base=object, choices=typing.get_args(hint), optional=optional)
    base = hint if hint in (int, float, bool, str) else object
    return Rule(base=base, bounds=bounds, optional=optional)


@functools.cache
def declared_rules(cls: type) -> dict[str, Rule]:
    """Field name -> Rule for a dataclass whose annotations are declared with the aliases above."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: rule_of(hints[f.name]) for f in dataclasses.fields(cls)}


def check_declared(config: Any, what: str) -> None:
    """Raise ValueError naming the first field whose value its declaration does not accept."""
    for name, rule in declared_rules(type(config)).items():
        value = getattr(config, name)
        if not rule.accepts(value):
            raise ValueError(f"{what}{name} must be {rule.describe()}, got {value!r}")
