"""The command line's argument parser: one-line errors that name a mistyped option and the nearest real one.

argparse checks required arguments before it reports unknown ones, so ``gnr-fast edit img.png -s a
--target-prompt b`` used to print a usage block saying ``-t/--target`` is required, never naming
``--target-prompt``. :class:`CliParser` first looks for options the (sub)command does not have and
reports the first one with the closest known option; every argparse error is one line.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")


class CliParser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` (subcommand parsers are of the same class) whose errors are
    one line, ``<prog>: error: <message> (see <prog> --help)``, and which names unknown options."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.option_names: dict[str, str] = {}  # every option string -> how help shows the option ("-t/--target")
        self.has_subcommands = False
        super().__init__(*args, **kwargs)  # adds -h/--help through add_argument

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        return self._known(super().add_argument(*args, **kwargs))

    def add_argument_group(self, *args: Any, **kwargs: Any) -> Any:
        """An argument group whose options this parser knows as its own (argparse adds a group's
        options through the group, past :meth:`add_argument`)."""
        group = super().add_argument_group(*args, **kwargs)
        add = group.add_argument
        group.add_argument = lambda *a, **k: self._known(add(*a, **k))
        return group

    def _known(self, action: argparse.Action) -> argparse.Action:
        for name in action.option_strings:
            self.option_names[name] = "/".join(action.option_strings)
        return action

    def add_subparsers(self, **kwargs: Any) -> Any:
        self.has_subcommands = True
        return super().add_subparsers(**kwargs)

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        if not self.has_subcommands:  # a parser with subcommands hands their options on unread
            self.check_options(list(sys.argv[1:] if args is None else args))
        return super().parse_known_args(args, namespace)

    def check_options(self, args: list[str]) -> None:
        """Fail on the first option in ``args`` (before a ``--``) that this parser does not know,
        naming the closest known option."""
        for token in args:
            if token == "--":
                return
            if not token.startswith("-") or token == "-" or NEGATIVE_NUMBER.match(token):
                continue
            name = token.split("=", 1)[0]
            if token.startswith("--"):
                known = name in self.option_names or any(option.startswith(name) for option in self.option_names
                                                         if option.startswith("--"))
            else:
                known = token[:2] in self.option_names
            if not known:
                self.error(f"unrecognized option {name!r}{self.suggestion(name)}")

    def suggestion(self, name: str) -> str:
        """``"; did you mean -t/--target?"`` for the option closest to ``name``, or ``""``."""
        bare = {option.lstrip("-"): option for option in self.option_names}  # the dashes would match anything
        close = difflib.get_close_matches(name.lstrip("-"), list(bare), n=1, cutoff=0.6)
        return f"; did you mean {self.option_names[bare[close[0]]]}?" if close else ""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
