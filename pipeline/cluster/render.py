"""A minimal, strict template renderer for the sbatch templates in slurm/: ``{{ name }}`` placeholders only.

Shell scripts are full of ``${...}`` and ``$(...)``, so the templates use ``{{ name }}`` and nothing else: no
logic in templates (the Python side computes every value), and an unknown or missing name is an error.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def placeholders(template: str) -> set[str]:
    return set(_PLACEHOLDER.findall(template))


def render(template: str, values: Mapping[str, object]) -> str:
    """Substitute every ``{{ name }}``; raises KeyError naming any placeholder without a value."""
    missing = sorted(placeholders(template) - set(values))
    if missing:
        raise KeyError(f"template values missing for: {', '.join(missing)}")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), template)


def quote(value: object) -> str:
    """Shell-quote one word (paths with spaces, odd characters)."""
    return shlex.quote(str(value))


def join_command(words: Iterable[object]) -> str:
    return " ".join(quote(w) for w in words)


def exports(env: Mapping[str, str]) -> str:
    """``export K=V`` lines, values shell-quoted, in a stable order."""
    return "\n".join(f"export {k}={quote(v)}" for k, v in sorted(env.items()))
