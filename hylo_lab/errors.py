"""The one error type a user's mistake raises: the CLI prints its message as one line and exits with code 2.
read_yaml_mapping reads a user's YAML file (a recipe, a sweep) with such errors."""

from __future__ import annotations

from pathlib import Path


class UserError(ValueError):
    """Bad input (arguments, files, recipes, paths): the message says what was wrong and what to do."""


def read_yaml_mapping(path, what: str, error: type[UserError] = UserError, keys=()) -> dict:
    """The YAML file `path`, a `what` ("recipe file", "sweep file"), as a dict; else `error` in one line:
    "<what> <path> not found; ...", "... is not valid YAML: line 2, column 7: <problem>", "... is empty; ..." or
    "... holds a list; it should be a mapping [with keys <keys>]"."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} not found; check the path")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise error(f"{what} {path} is not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        got = "is empty" if data is None else f"holds a {type(data).__name__}"
        raise error(f"{what} {path} {got}; it should be a mapping" + (f" with keys {', '.join(keys)}" if keys else ""))
    return data


def _yaml_problem(exc) -> str:
    """A YAML parse error in one line: "line 2, column 7: expected ',' or ']', but got ':'"."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(getattr(exc, "problem", None) or exc).split())
