"""YAML that a person, or an attacker, wrote: plain data only, and bounded after its aliases are expanded.

`yaml.safe_load` already refuses Python tags, but an alias bomb ("billion laughs": nine lists of nine aliases of
the list before, nine levels deep) is a few hundred bytes that load as a shared structure of a billion leaves: fine
until something walks it (a dataclass copy, a JSON dump, a hash of the parameters), which then grows the process
by gigabytes. `load_yaml` counts the document's size with every alias expanded, from the composed node graph
(shared nodes counted once per use, memoised, so the count itself is linear), and refuses it over a limit that
no real parameter or scenario file comes near. Errors are one line naming the origin and the line.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

# Expanded nodes (every scalar, list and mapping, each alias counted as a full copy). params.yaml has ~200.
MAX_EXPANDED_NODES = 100_000


# libyaml's parser where PyYAML was built with it: params.yaml parses in ~8 ms instead of ~70 ms (busy 2-core
# machine), and it is read a few times per run. Same nodes, same safe constructor, same error classes.
_SafeBase = yaml.CSafeLoader if getattr(yaml, "__with_libyaml__", False) else yaml.SafeLoader


class _Loader(_SafeBase):
    """The safe loader that also reads `1e-9` and `1.5e3` as numbers, as YAML 1.2 does (and DVC, which reads the same
    params.yaml with ruamel): YAML 1.1 wants a dot and a signed exponent, and PyYAML would hand `--set
    data_fraction=1e-9` on as the string '1e-9'."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


class YamlInputError(ValueError):
    """The text is not YAML we accept; the message is one line naming the origin (and the line, when known)."""


def load_yaml(text: str, origin: str, max_nodes: int = MAX_EXPANDED_NODES) -> Any:
    """The plain data of one YAML document (None for an empty one)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        expanded = expanded_size(node, max_nodes, origin)
        if expanded > max_nodes:
            raise YamlInputError(f"{origin}: YAML expands to over {max_nodes:,} values through its aliases "
                                 f"(an alias bomb?); refused")
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        raise YamlInputError(_one_line(exc, origin)) from None
    except yaml.YAMLError as exc:
        raise YamlInputError(f"{origin}: not valid YAML ({_flat(str(exc))})") from None
    except RecursionError:
        raise YamlInputError(f"{origin}: YAML nested too deeply") from None
    finally:
        loader.dispose()


def expanded_size(root: yaml.Node, limit: int, origin: str = "YAML") -> int:
    """Nodes in the document with every alias expanded; stops counting once over `limit`. A recursive alias (a
    list that holds itself) would expand forever: refused."""
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            size[key] = 1 + sum(size[id(child)] for child in _children(node))
            if size[key] > limit:
                return size[key]
            continue
        if key in size:
            continue
        on_path.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in on_path:
                mark = child.start_mark
                raise YamlInputError(f"{origin} line {mark.line + 1}: an alias refers to a node that contains it "
                                     f"(a recursive structure); refused")
            if id(child) not in size:
                stack.append((child, False))
    return size[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _flat(text: str) -> str:
    return " ".join(str(text).split())


def _one_line(exc: yaml.MarkedYAMLError, origin: str) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = f"{origin} line {mark.line + 1} column {mark.column + 1}" if mark else origin
    problem = _flat(exc.problem or "not valid YAML")
    context = f" ({_flat(exc.context)})" if exc.context else ""
    return f"{where}: {problem}{context}"
