"""Deprecation shims: a renamed or moved public name keeps working for one release, with a DeprecationWarning
that says what to write instead. Every rename in rlloss goes through here, so each warns the same way."""
from __future__ import annotations

import functools
import warnings
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)

def warn_deprecated(message: str, stacklevel: int = 3) -> None:
    """One DeprecationWarning ``message`` (plus when it goes away), pointing at the caller of the caller."""
    warnings.warn(f"{message}; the old name will be removed in the next release", DeprecationWarning,
                  stacklevel=stacklevel)


def renamed_keywords(**renames: str) -> Callable[[F], F]:
    """Accept each old keyword (``old="new"``) of the decorated function for one release: the call gets the
    value under the new name and one DeprecationWarning naming every old keyword it used; giving both the old
    and the new name is a TypeError. The signature (``inspect.signature``, ``help``) shows the new names only."""

    def decorate(func: F) -> F:
        qualname = func.__qualname__

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            old = [name for name in renames if name in kwargs]
            if old:
                for name in old:
                    new = renames[name]
                    if new in kwargs:
                        raise TypeError(f"{qualname}() got both {name}= (deprecated) and {new}=; pass {new}= only")
                    kwargs[new] = kwargs.pop(name)
                said = ", ".join(f"{name}= is now {renames[name]}=" for name in old)
                warn_deprecated(f"{qualname}(): {said}")
            return func(*args, **kwargs)

        wrapper.deprecated_keywords = dict(renames)  # for the docs and tests
        return wrapper  # type: ignore[return-value]

    return decorate
