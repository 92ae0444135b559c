"""Saved hybrids in the Hub's remote-code layout: the modeling code beside the weights, named in `auto_map`.

`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` reads `auto_map` from config.json and imports
the files it names from `dir`, which resolves relative imports between files of that one folder only. So the
package modules that config.py and model.py reach are written flat, generated from the package at every save
(the package stays the only source):
- `hylo_lab.x.y`, `.y` and `..x.y` imports of a package module become `.y` (config -> configuration_hylo,
  model -> modeling_hylo, every other module keeps its own name, which must be unique);
- imports inside functions (the optional GPU packages: fla, mamba_ssm, triton) are wrapped in
  `try:` / `finally: pass`, which transformers' import check skips, so a machine without them still loads.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from .outputs import atomic_file

PACKAGE = "hylo_lab"
PACKAGE_DIR = Path(__file__).resolve().parent
ROOTS = {f"{PACKAGE}.config": "configuration_hylo", f"{PACKAGE}.model": "modeling_hylo"}
AUTO_MAP = {"AutoConfig": "configuration_hylo.HyloConfig", "AutoModelForCausalLM": "modeling_hylo.HyloForCausalLM"}


class ExportError(RuntimeError):
    """The package's sources cannot be written as flat remote code (an import the export does not handle)."""


def module_path(module: str) -> Path:
    path = PACKAGE_DIR.joinpath(*module.split(".")[1:]).with_suffix(".py")
    if not path.is_file():
        raise ExportError(f"{module} is not a module file of {PACKAGE} (packages and __init__ imports cannot be "
                          f"flattened: import the module that defines the name)")
    return path


def package_imports(module: str, tree: ast.Module):
    """(node, imported module) for every `from <package module> import ...` in `tree`, relative ones resolved."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == PACKAGE for a in node.names):
            raise ExportError(f"{module} line {node.lineno}: `import {PACKAGE}...` cannot be flattened; "
                              f"use `from <module> import name`")
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            parent = module.split(".")[: -node.level]
            target = ".".join(parent + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if target == PACKAGE or target.startswith(PACKAGE + "."):
            yield node, target


def flat_name(module: str) -> str:
    return ROOTS.get(module, module.rsplit(".", 1)[-1])


def closure() -> dict[str, str]:
    """{package module: flat file stem} for every module the roots reach (imports inside functions included)."""
    found, todo = {}, list(ROOTS)
    while todo:
        module = todo.pop()
        if module in found:
            continue
        found[module] = flat_name(module)
        tree = ast.parse(module_path(module).read_text(encoding="utf-8"))
        todo += [target for _, target in package_imports(module, tree)]
    stems = sorted(found.values())
    clashes = {s for s in stems if stems.count(s) > 1}
    if clashes:
        raise ExportError(f"modules {sorted(m for m, s in found.items() if s in clashes)} would share a flat file "
                          f"name; rename one")
    return found


def flatten(module: str) -> str:
    """One module's source with package imports made flat and function-level imports hidden in try blocks."""
    text = module_path(module).read_text(encoding="utf-8")
    tree = ast.parse(text)
    lines = text.splitlines()
    renamed = {node.lineno: target for node, target in package_imports(module, tree)}
    hidden = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
              and node.col_offset > 0 and node.lineno not in renamed and not getattr(node, "level", 0)]
    for lineno, target in renamed.items():
        lines[lineno - 1] = re.sub(r"\bfrom\s+[\w.]+\s+import\b", f"from .{flat_name(target)} import",
                                   lines[lineno - 1], count=1)
    for node in sorted(hidden, key=lambda n: n.lineno, reverse=True):
        first = lines[node.lineno - 1]
        indent = first[: node.col_offset]
        if indent.strip():
            raise ExportError(f"{module} line {node.lineno}: put the import on a line of its own")
        body = ["    " + line for line in lines[node.lineno - 1: node.end_lineno]]
        lines[node.lineno - 1: node.end_lineno] = [indent + "try:", *body, indent + "finally:", indent + "    pass"]
    rel = module_path(module).relative_to(PACKAGE_DIR.parent).as_posix()
    source = f"# Generated from {rel} by hylo_lab.hub at save time: edit the package, not this copy.\n"
    source += "\n".join(lines) + "\n"
    compile(source, f"{flat_name(module)}.py", "exec")
    return source


def write_remote_code(directory) -> list[Path]:
    """Write the flat modules into `directory` (beside a saved config.json) and add `auto_map` to its config.json.
    Each file is written under a temporary name and renamed into place. Returns the paths written."""
    directory = Path(directory)
    written = []
    for module, stem in sorted(closure().items()):
        written.append(_replace(directory / f"{stem}.py", flatten(module)))
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["auto_map"] = dict(AUTO_MAP)
    _replace(config_file, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return written


def _replace(path: Path, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
