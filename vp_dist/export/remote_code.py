"""Self-contained model code for the squeezed export (`trust_remote_code=True`, no vp_dist needed).

`bundle_remote_code(out_dir)` copies the source of every module in `SELF_CONTAINED_MODULES`
(vp_dist/export/__init__.py) into the export folder as a flat file (`vp_dist.export.modeling` ->
`export_modeling.py`) and rewrites their imports of each other into same-folder relative imports,
which is the form `transformers` follows when it copies remote code into its module cache.
`auto_map` (the config's) then names those files. The list is data: a new squeezed layer module is
one more entry, as long as it imports only the standard library, torch, transformers and other
listed modules; an import of any other vp_dist module is refused at export time, naming it.
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

ROOT_PACKAGE = "vp_dist"


def flat_name(module: str) -> str:
    """`vp_dist.export.modeling` -> `export_modeling` (the file stem inside the export folder)."""
    return module.removeprefix(ROOT_PACKAGE + ".").replace(".", "_")


def _source_file(module: str) -> Path:
    return Path(importlib.import_module(module).__file__)


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (`from ..squeeze import x` inside `module`)."""
    if node.level == 0:
        return node.module or ""
    is_package = _source_file(module).name == "__init__.py"
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _rewrite(module: str, source: str, bundled: set[str]) -> str:
    """The module's source with imports of bundled modules made relative to the export folder."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    edits = []  # (first line, last line, column, replacement)
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == ROOT_PACKAGE for a in node.names):
                raise ValueError(f"{module}: `import {node.names[0].name}` cannot be bundled; use "
                                 f"`from .x import y` between SELF_CONTAINED_MODULES")
            continue
        target = _absolute(module, node)
        if target != ROOT_PACKAGE and not target.startswith(ROOT_PACKAGE + "."):
            continue
        names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
        if target in bundled:
            replacement = f"from .{flat_name(target)} import {names}"
        else:
            # `from .. import adapters`: each name must itself be a bundled module. The first line
            # is what makes transformers copy the file (it follows `from .x import` lines only).
            pieces = []
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule not in bundled:
                    raise ValueError(f"{module} imports {submodule if target == ROOT_PACKAGE else target}, "
                                     f"which is not in SELF_CONTAINED_MODULES: add it there (it must import "
                                     f"only torch, transformers and the listed modules) or avoid the import")
                flat = flat_name(submodule)
                pieces += [f"from .{flat} import __name__ as _{flat}_module_name  # noqa: F401 (bundled file)",
                           f"from . import {flat} as {alias.asname or alias.name}"]
            indent = " " * node.col_offset
            replacement = f"\n{indent}".join(pieces)
        edits.append((node.lineno, node.end_lineno, node.col_offset, node.end_col_offset, replacement))
    for first, last, col, end_col, replacement in sorted(edits, reverse=True):
        head, tail = lines[first - 1][:col], lines[last - 1][end_col:]
        lines[first - 1:last] = [head + replacement + tail]
    return "".join(lines)


def bundle_remote_code(out_dir: str | Path, modules: tuple[str, ...] | None = None) -> list[Path]:
    """Write the flat copies of `modules` (default: SELF_CONTAINED_MODULES) into `out_dir`."""
    if modules is None:
        from . import SELF_CONTAINED_MODULES as modules
    bundled = set(modules)
    written = []
    for module in modules:
        source = _source_file(module).read_text()
        header = (f"# Copied from {module} by vp_dist.export.remote_code (imports rewritten); "
                  f"loaded with trust_remote_code=True.\n")
        path = Path(out_dir) / f"{flat_name(module)}.py"
        path.write_text(header + _rewrite(module, source, bundled))
        written.append(path)
    return written


def auto_map(config_module: str, modeling_module: str, auto_classes: dict[str, str],
             config_class: str) -> dict[str, str]:
    """The config.json `auto_map`: Auto class name -> `file_stem.ClassName` inside the export folder."""
    mapping = {"AutoConfig": f"{flat_name(config_module)}.{config_class}"}
    mapping.update({auto: f"{flat_name(modeling_module)}.{name}" for auto, name in auto_classes.items()})
    return mapping
