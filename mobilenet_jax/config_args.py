"""Config strings: ``configs/v1.py:width=0.5,resolution=160`` or ``configs/v1.py:quickstart``."""

from __future__ import annotations

import ast
from typing import Any


def parse(arg: str | None, **defaults: Any) -> dict[str, Any]:
    """Parses ``'quickstart,width=0.5'`` into ``{'quickstart': True, 'width': 0.5}`` over ``defaults``.

    Keys must be among ``defaults``, so a typo is an error, not a silently ignored option.
    """
    values = dict(defaults)
    for token in filter(None, (t.strip() for t in (arg or "").split(","))):
        key, sep, raw = token.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"Unknown config option {key!r}; known options: {', '.join(sorted(defaults))}.")
        if not sep:
            values[key] = True
            continue
        try:
            values[key] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            values[key] = raw.strip()
    return values
