"""Dotted overrides: any recipe field from a sweep axis or a notebook parameter, set on the recipe dict before
the checker reads it ("stages.kd-long.steps=300; student.layout=2MLA2M2")."""

from __future__ import annotations

import copy

from .recipe_check import RecipeError


def parse_overrides(text: str | dict | None) -> dict:
    """"stages.kd-long.steps=300; student.layout=2MLA2M2" (items split at ';' or newlines, values read as YAML)
    or a YAML mapping "{stages.kd-long.steps: 300}" -> {"stages.kd-long.steps": 300}. "" and None: {}."""
    import yaml

    if text is None or isinstance(text, dict):
        return dict(text or {})
    text = str(text).strip()
    if text.startswith("{"):
        try:
            out = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RecipeError(f"overrides {text!r} are not a valid YAML mapping: {exc}") from None
        if not isinstance(out, dict):
            raise RecipeError(f"overrides {text!r}: expected a mapping of dotted keys to values")
        return out
    out = {}
    for item in (i.strip() for i in text.replace("\n", ";").split(";")):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise RecipeError(f"override {item!r}: expected KEY=VALUE such as stages.kd-long.steps=300")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            raise RecipeError(f"override {item!r}: the value is not valid YAML") from None
    return out


def format_overrides(overrides: dict) -> str:
    """The inverse of parse_overrides: "key=value; ..." with values as JSON (a subset of YAML)."""
    import json

    return "; ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())


def apply_overrides(raw: dict, overrides: dict | str | None) -> dict:
    """A copy of the recipe dict `raw` with each dotted key set: `train.batch_size`, `stages.<name>.steps` (a stage
    by its name, or `stages.<index>`), `stages.kd-long.yarn.factor`. `stages.<name>: null` drops the stage; a
    missing mapping on the way is created. Unknown final keys are left for the recipe checker to name."""
    out = copy.deepcopy(raw)
    for key, value in parse_overrides(overrides).items():
        parts = str(key).split(".")
        node, where = out, []
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                names = [s.get("name") if isinstance(s, dict) else None for s in node]
                index = names.index(part) if part in names else int(part) if part.isdigit() else None
                if index is None or index >= len(node):
                    known = ", ".join(str(n) for n in names if n)
                    raise RecipeError(f"override {key}: {'.'.join(where) or 'recipe'} has no entry {part!r}"
                                      + (f" (it has {known})" if known else ""))
                if last:
                    if value is None:
                        node.pop(index)
                    else:
                        node[index] = value
                    break
                node = node[index]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                    break
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            else:
                raise RecipeError(f"override {key}: {'.'.join(where)} is {node!r}, not a mapping or a list")
            where.append(part)
    return out
