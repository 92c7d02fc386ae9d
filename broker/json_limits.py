"""JSON that valid syntax allows and no backend can take: nesting too deep, numbers too large.

A body 1,000 levels deep overflows the recursion of every Python parser on its way (hotq's, a
consumer's, the backend's); 1e999 parses as infinity and a 400-digit integer fits no backend's
integers. Both are found here in C-speed passes over the raw bytes; only a body with a suspicious
number is parsed again, to name the field.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from broker.errors import InvalidRequest

MAX_JSON_DEPTH = 64  # arrays and objects inside each other; real requests (tool schemas included) stay far below
_INT_RANGE = (-(2**63), 2**64)  # the widest integers a backend holds (signed or unsigned 64-bit)

_STRINGS = re.compile(rb'"(?:[^"\\]+|\\.)*"')
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))
_AS_SQUARE = bytes.maketrans(b"{}", b"[]")  # in valid JSON only the nesting matters, not the kind
_LONG_NUMBER = re.compile(rb"\d{20}|[eE][+-]?\d{3}")  # a 20-digit integer or a 3-digit exponent: look closer


def too_deep() -> InvalidRequest:
    return InvalidRequest(f"the JSON is nested more than {MAX_JSON_DEPTH} levels deep", code="json_too_deep")


def check_structure(document: bytes) -> None:
    """Refuse a (syntactically valid) JSON document nested past MAX_JSON_DEPTH or holding a number
    no backend can take, naming that number's field."""
    structure = _STRINGS.sub(b"", document)  # what is left is brackets, punctuation, numbers and literals
    brackets = structure.translate(_AS_SQUARE, _NOT_BRACKETS)
    for _ in range(MAX_JSON_DEPTH):  # each pass removes the innermost pairs
        if not brackets:
            break
        brackets = brackets.replace(b"[]", b"")
    if brackets:
        raise too_deep()
    if _LONG_NUMBER.search(structure):
        try:
            path = _unhonourable(json.loads(document), "")
        except ValueError:  # an integer past Python's own digit limit
            raise InvalidRequest("the body holds a number longer than any backend takes") from None
        if path is not None:
            raise InvalidRequest(f"`{path}` is a number no backend can take (too large)", param=path)


def _unhonourable(value: Any, path: str) -> str | None:
    """The path of the first number that is infinite once parsed or beyond 64-bit integers."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path
    if isinstance(value, int) and not isinstance(value, bool):
        return None if _INT_RANGE[0] <= value < _INT_RANGE[1] else path
    if isinstance(value, dict):
        children = ((f"{path}.{key}" if path else str(key), child) for key, child in value.items())
    elif isinstance(value, list):
        children = ((f"{path}[{index}]", child) for index, child in enumerate(value))
    else:
        return None
    for child_path, child in children:
        found = _unhonourable(child, child_path)
        if found is not None:
            return found
    return None
