"""Small helpers shared by the command-group modules: the parser class, group help, operational errors.

Nothing here imports torch, Ray, MLflow or pydantic: `lidit --help` builds every parser through this module and
must stay fast (tests/cli/test_help.py checks what the parser build imports).
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default unless it has none worth showing (None, False, empty) or the help names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or "default" in text.lower()
            or default in (None, False, argparse.SUPPRESS)
            or default == []
            or isinstance(action, (argparse._HelpAction, argparse._VersionAction))
        ):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` with the house formatter; sub-parsers inherit the class, hence the formatter."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


def group_help(parser: argparse.ArgumentParser) -> int:
    """Handler of a bare command group (`lidit starter`): print its help, exit code 2."""
    parser.print_help()
    return 2


class CommandError(Exception):
    """An operational failure (nothing to debug): printed as one line, `what failed; what to do`, exit code 1.

    Raise it for conditions a user fixes (server down, cache missing, port taken); bugs keep their tracebacks.
    """

    def __init__(self, what: str, todo: str, exit_code: int = 1) -> None:
        super().__init__(f"{what}; {todo}")
        self.what, self.todo, self.exit_code = what, todo, exit_code
