"""Hypothesis helpers that mutate one place of a JSON document: the artifact sidecar and the HTTP
request body fuzzers both pick a path and put an arbitrary JSON value there."""

from __future__ import annotations

from hypothesis import strategies as st


def json_values(integers: st.SearchStrategy, text_size: int, key_size: int, leaves: int) -> st.SearchStrategy:
    """Arbitrary JSON values (no NaN, which JSON cannot carry)."""
    scalars = st.none() | st.booleans() | integers | st.floats(allow_nan=False) | st.text(max_size=text_size)
    return st.recursive(
        scalars,
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=key_size), c, max_size=3),
        max_leaves=leaves,
    )


def paths(value, prefix=()):
    """Every path into a JSON document, the root () first."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths(v, prefix + (i,))


def replaced(value, path, new):
    """A copy of the document with the value at `path` replaced by `new`; the input is not touched."""
    if not path:
        return new
    out = dict(value) if isinstance(value, dict) else list(value)
    out[path[0]] = replaced(value[path[0]], path[1:], new)
    return out
