"""Keyword-only constructors: an unknown keyword gets a TypeError that names the right one."""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def suggest_keywords(aliases: dict[str, str] | None = None) -> Callable[[F], F]:
    """Decorate ``__init__``: unknown keywords raise ``TypeError`` with the likely intended argument.

    ``aliases`` maps names users bring from other loaders to dalimix's (``num_workers`` ->
    ``num_threads``); other unknown names get the closest known name, if any is close.
    """
    aliases = dict(aliases or {})

    def decorate(init: F) -> F:
        params = inspect.signature(init).parameters
        known = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n != "self"]
        owner = init.__qualname__.rsplit(".", 1)[0]

        @functools.wraps(init)
        def wrapper(self, *args, **kwargs):
            unknown = [k for k in kwargs if k not in params]
            if unknown:
                hints = []
                for k in unknown:
                    if k in aliases:
                        hints.append(f"{k}= is not an argument of {owner}: use {aliases[k]}")
                    else:
                        close = difflib.get_close_matches(k, known, n=1)
                        hints.append(
                            f"{k}= is not an argument of {owner}" + (f": did you mean {close[0]}=?" if close else "")
                        )
                raise TypeError("; ".join(hints) + f" (its arguments: {', '.join(known)})")
            return init(self, *args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
