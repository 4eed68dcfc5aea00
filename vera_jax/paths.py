"""One path convention and one matcher for every rule in the project.

Parameters are named by '/'-joined paths (``bert/encoder/layer/3/attention/self/query/kernel``).
Rules are ``(regex, value)`` pairs matched with ``re.fullmatch``, first match wins, compiled once; the
same helper drives targeting, optimizer labels, sharding rules and checkpoint filters.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

from flax import traverse_util

__all__ = [
    "SEP",
    "flatten",
    "unflatten",
    "module_paths",
    "patterns_regex",
    "compile_rules",
    "first_match",
    "label_paths",
    "split_leaf",
]

SEP = "/"
T = TypeVar("T")


def flatten(tree: Mapping) -> dict[str, Any]:
    """Nested dict (or FrozenDict) -> ``{'a/b/kernel': leaf}`` in traversal order; integer keys (an NNX
    list's ``layers/0``) are written as digits."""
    return {SEP.join(map(str, key)): leaf for key, leaf in traverse_util.flatten_dict(tree).items()}


def unflatten(flat: Mapping[str, Any], like: Mapping | None = None) -> dict:
    """Inverse of `flatten`: plain nested dicts. With ``like``, a path that ``like`` holds gets ``like``'s own
    keys back (the integers of an NNX list), so the result fits the tree it came from."""
    if like is None:
        return traverse_util.unflatten_dict(dict(flat), sep=SEP)
    keys = {SEP.join(map(str, key)): key for key in traverse_util.flatten_dict(like)}
    return traverse_util.unflatten_dict({keys.get(path, tuple(path.split(SEP))): leaf for path, leaf in flat.items()})


def split_leaf(path: str) -> tuple[str, str]:
    """``'a/b/kernel'`` -> ``('a/b', 'kernel')``; a top-level leaf has module ``''``."""
    module, _, leaf = path.rpartition(SEP)
    return module, leaf


def module_paths(leaf_paths: Iterable[str]) -> list[str]:
    """Every module (inner node) path above the given leaf paths, in first-seen order."""
    seen: dict[str, None] = {}
    for path in leaf_paths:
        parts = path.split(SEP)
        for end in range(1, len(parts)):
            seen.setdefault(SEP.join(parts[:end]), None)
    return list(seen)


def patterns_regex(patterns: str | Sequence[str], *, with_leaves: bool = False) -> re.Pattern:
    """PEFT's target syntax as one compiled regex over module paths.

    A string is a regex that must match the whole path. A sequence of names matches every path that
    ends with one of them at a '/' boundary (``"query"`` matches ``.../self/query``). With
    ``with_leaves`` the regex also matches every path below a matched module.
    """
    if isinstance(patterns, str):
        body = patterns
    else:
        body = "(?:.*/)?(?:" + "|".join(re.escape(name) for name in patterns) + ")"
    if with_leaves:
        body = f"(?:{body})(?:/.+)?"
    return re.compile(body)


def compile_rules(rules: Sequence[tuple[str, T]]) -> tuple[tuple[re.Pattern, T], ...]:
    """``[(regex, value), ...]`` -> compiled, for `first_match` and `label_paths`."""
    compiled = []
    for pattern, value in rules:
        try:
            compiled.append((re.compile(pattern), value))
        except re.error as err:
            raise ValueError(f"Rule {pattern!r} is not a valid regular expression: {err}.") from None
    return tuple(compiled)


def first_match(rules: Sequence[tuple[re.Pattern, T]], path: str) -> T | None:
    """Value of the first rule whose regex matches the whole path, or None."""
    for regex, value in rules:
        if regex.fullmatch(path):
            return value
    return None


def label_paths(rules: Sequence[tuple[re.Pattern, T]], paths: Iterable[str]) -> dict[str, T]:
    """Label every path by its first matching rule.

    Raises:
      ValueError: a path matched no rule, or a rule matched no path (a typo would otherwise be silent).
    """
    paths = list(paths)
    labels: dict[str, T] = {}
    used: set[int] = set()
    for path in paths:
        for index, (regex, value) in enumerate(rules):
            if regex.fullmatch(path):
                labels[path] = value
                used.add(index)
                break
        else:
            raise ValueError(f"No rule matches the path {path!r}; add a rule for it (or a final '.*' rule).")
    unused = [rules[i][0].pattern for i in range(len(rules)) if i not in used]
    if unused:
        raise ValueError(f"Rules {unused} matched none of the {len(paths)} paths, e.g. {paths[:3]}; fix or drop them.")
    return labels
