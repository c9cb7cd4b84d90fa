"""A runtime backend's options: :class:`BackendOption` (name, default, check, help), declared on
its :class:`~gnr_fast.runtime.registry.BackendSpec`, and the checks the bundled backends use.

A check takes the option's name and the value given and returns the value to keep (a ``Path`` for
a folder given as a string), or raises :class:`~gnr_fast.errors.ConfigError` saying what
``RuntimeConfig.<name>`` must be.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

Check = Callable[[str, Any], Any]
"""``(option name, value) -> the value kept``; raises :class:`ConfigError` for a bad value."""


def any_value(name: str, value: Any) -> Any:
    """The check of an option taking any value as given."""
    return value


@dataclass(frozen=True)
class BackendOption:
    """One option a backend reads from its :class:`~gnr_fast.runtime.config.RuntimeConfig`.

    Attributes:
        name: the keyword of ``RuntimeConfig(...)`` and the attribute its runners read
            (``config.<name>``, or ``config.option(backend, name)``); unique across backends.
        default: its value when not given (kept as given: the check does not run on it).
        help: one line for ``gnr-fast doctor`` and the CLI help.
        check: ``(name, value) -> value kept``, raising :class:`ConfigError` for a bad value.
    """

    name: str
    default: Any
    help: str
    check: Check = any_value

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ConfigError(f"a backend option needs a name that is a Python identifier, got {self.name!r}")

    def checked(self, value: Any) -> Any:
        """``value`` as the option keeps it (:attr:`check`)."""
        return self.check(self.name, value)


def one_of(*choices: str, as_list: bool = False) -> Check:
    """The check of an option taking one of ``choices`` (its error names them as ``'a' or 'b'``,
    or as ``one of ['a', 'b', ...]`` with ``as_list``)."""
    if as_list:
        named = f"one of {list(choices)}"
    else:
        named = " or ".join((", ".join(repr(c) for c in choices[:-1]), repr(choices[-1]))) if len(choices) > 1 else repr(choices[0])

    def check(name: str, value: Any) -> Any:
        if value not in choices:
            raise ConfigError(f"RuntimeConfig.{name} must be {named}, got {value!r}")
        return value
    return check


def flag(name: str, value: Any) -> bool:
    """The check of a ``True``/``False`` option."""
    if not isinstance(value, bool):
        raise ConfigError(f"RuntimeConfig.{name} must be True or False, got {value!r}")
    return value


def positive_int(name: str, value: Any) -> int:
    """The check of a positive integer option (``bool`` refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"RuntimeConfig.{name} must be a positive integer, got {value!r}")
    return value


def optional_path(name: str, value: Any) -> Path | None:
    """The check of a file or folder option: ``None`` or a path (a string becomes a ``Path``)."""
    return None if value is None else Path(value)


def paths(name: str, value: Any) -> tuple[Path, ...]:
    """The check of a folders option: a tuple (or list) of paths, each a ``Path``."""
    if isinstance(value, (str, Path)) or not all(isinstance(p, (str, Path)) for p in value):
        raise ConfigError(f"RuntimeConfig.{name} must be a tuple of folders, got {value!r}")
    return tuple(Path(p) for p in value)
