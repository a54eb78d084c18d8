"""Check the layout's import boundaries (shared/design.md, "Layout").

Only the transport modules (``*/transport.py`` and ``fedmq/paho_client.py``) import paho, only
``fedmq/codec.py`` (and its ``msgpack_views``, and the sub-protocols' codecs
``fedmq/secagg/codec.py`` and ``fedmq/cluster_wire.py``) imports msgpack, only
``aggregator/exporter.py`` imports prometheus_client, only ``aggregator/kernel*.py`` imports
numba, and amqtt only ``fedmq/embedded_broker.py``. The shared
``fedmq`` core never imports either side at module level (the CLI and the demo, the composition
roots, import them lazily inside functions). Exit 1 and list the offending lines otherwise.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedmq", "aggregator", "device_agent")

# top-level module -> predicate on the importing file's path (relative, POSIX)
ALLOWED = {
    "paho": lambda p: p.endswith("/transport.py") or p == "fedmq/paho_client.py",
    "msgpack": lambda p: p in ("fedmq/codec.py", "fedmq/msgpack_views.py",
                               "fedmq/secagg/codec.py", "fedmq/cluster_wire.py"),
    "prometheus_client": lambda p: p == "aggregator/exporter.py",
    "numba": lambda p: p.startswith("aggregator/kernel"),
    "amqtt": lambda p: p == "fedmq/embedded_broker.py",
    # The optional extras: `watch` (rich) and `plot` (matplotlib).
    "rich": lambda p: p == "fedmq/watch_render.py",
    "matplotlib": lambda p: p == "aggregator/report.py",
}

#: Modules that need an optional extra at import time: nothing may import them at module
#: level (``fedmq watch`` imports the renderer once it has checked that rich is there).
LAZY_ONLY = ("fedmq.watch_render", "matplotlib")


def imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    """(line, top-level module) of every import in a file, nested ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module.split(".")[0]


def top_level_imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, top-level module) of the imports a module runs when it is imported."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module.split(".")[0]


def top_level_import_names(path: Path) -> Iterator[tuple[int, str]]:
    """(line, full dotted name) of the module-level imports; ``from a import b`` gives both
    ``a`` and ``a.b`` (b may be a submodule)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def violations(root: Path = ROOT) -> list[str]:
    """Every import that crosses the layout, as ``path:line: message``."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            for line, module in imported_modules(path):
                allowed = ALLOWED.get(module)
                if allowed is not None and not allowed(rel):
                    found.append(f"{rel}:{line}: imports {module}, which only "
                                 f"{_who(module)} may import")
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            for line, name in top_level_import_names(path):
                if any(name == m or name.startswith(m + ".") for m in LAZY_ONLY):
                    found.append(f"{rel}:{line}: imports {name} at module level; it needs an "
                                 "optional extra, so import it inside the function that uses it")
    for path in sorted((root / "fedmq").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        for line, module in top_level_imports(path):
            if module in ("aggregator", "device_agent"):
                found.append(f"{rel}:{line}: the shared core imports {module} at module "
                             "level; import it lazily in a composition root, or move the "
                             "shared part into fedmq")
    return found


def _who(module: str) -> str:
    return {"paho": "*/transport.py and fedmq/paho_client.py",
            "msgpack": "fedmq/codec.py, fedmq/msgpack_views.py and the sub-protocols' "
                       "codecs (fedmq/secagg/codec.py, fedmq/cluster_wire.py)",
            "prometheus_client": "aggregator/exporter.py",
            "numba": "aggregator/kernel*.py", "amqtt": "fedmq/embedded_broker.py",
            "rich": "fedmq/watch_render.py",
            "matplotlib": "aggregator/report.py"}[module]


if __name__ == "__main__":
    bad = violations()
    for v in bad:
        print(v)
    if bad:
        sys.exit(1)
    print("import boundaries: ok")
