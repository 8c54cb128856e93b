"""The package's layers stay true: each imports only from the layers before it.

    sync -> storage -> engine -> transport -> service      client: sync only

Every import counts, also inside functions and under `TYPE_CHECKING`: an import is a
dependency whether or not it runs at start-up.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Final

import verdant_trio

LAYERS = ("sync", "storage", "engine", "transport", "service")
PACKAGE = Path(verdant_trio.__file__).parent
PURE: Final = {
    "service/cluster/placement.py": frozenset({
        "__future__", "collections", "collections.abc", "dataclasses", "re", "string", "typing",
        "zlib",
    }),
}  # fmt: skip
"""Modules of pure logic, and every module they may import: none that does I/O."""


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every import of the package in a file."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if "." in target:
                found.append((node.lineno, target))
            else:  # `from verdant_trio import x`: the module x (or a name of the package)
                found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    top = root.name
    return [(line, module) for line, module in found if module.split(".")[0] == top]


def layer_of(module: str) -> str:
    """The layer a module of the package belongs to: a layer, "client", or "top" (the package
    itself, which re-exports the public API)."""
    parts = module.split(".")
    if len(parts) == 1:
        return "top"
    return parts[1] if parts[1] in (*LAYERS, "client") else "unknown"


def allowed(importer: str, imported: str) -> bool:
    if importer == "top":
        return True
    if importer == "client":
        return imported == "sync"
    if imported in ("top", "client", "unknown"):
        return False
    return LAYERS.index(imported) <= LAYERS.index(importer)


def violations(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        importer = layer_of(module_name(path, root))
        for line, module in imported_modules(path, root):
            imported = layer_of(module)
            if not allowed(importer, imported):
                found.append(f"{path.relative_to(root.parent)}:{line}: {importer} imports {module}")
    return found


def test_every_module_sits_in_a_layer() -> None:
    strays = [
        str(path.relative_to(PACKAGE)) for path in PACKAGE.glob("*.py")
        if path.name not in ("__init__.py", "client.py")
    ]
    assert not strays, strays
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__") \
        == sorted(LAYERS)


def test_no_layer_imports_from_a_later_one() -> None:
    assert violations(PACKAGE) == []


def all_imports(path: Path) -> set[str]:
    """Every module a file imports, the package's own included (relative ones as written)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add("." * node.level + (node.module or ""))
    return found


def test_pure_modules_import_nothing_that_does_io() -> None:
    """The placement table's logic (service.cluster) is shared by the CLI, the daemon and the
    HAProxy configuration; it stays plain code over text, so it imports no I/O."""
    for name, allowed_modules in PURE.items():
        imported = all_imports(PACKAGE / name)
        assert imported <= allowed_modules, (name, sorted(imported - allowed_modules))
    # the check can fail: the table file's module, which does the I/O, would not pass
    assert "os" in all_imports(PACKAGE / "service/cluster/tablefile.py")


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The checker itself can fail: an upward import, a function-level one and a client that
    reaches into the engine are all reported."""
    root = tmp_path / "verdant_trio"
    for layer in LAYERS:
        (root / layer).mkdir(parents=True)
        (root / layer / "__init__.py").write_text("")
    (root / "__init__.py").write_text("from .service import daemon\n")
    (root / "sync" / "protocol.py").write_text("from ..engine.core import VerdantCore\n")
    (root / "storage" / "shard.py").write_text(textwrap.dedent("""
        from ..sync import protocol
        def later():
            from ..transport import app
    """))
    (root / "engine" / "core.py").write_text("from verdant_trio.storage.shard import Shard\n")
    (root / "client.py").write_text("from .engine.core import VerdantCore\nfrom .sync import protocol\n")
    assert violations(root) == [
        "verdant_trio/client.py:1: client imports verdant_trio.engine.core",
        "verdant_trio/storage/shard.py:4: storage imports verdant_trio.transport",
        "verdant_trio/sync/protocol.py:1: sync imports verdant_trio.engine.core",
    ]


def test_checking_a_configuration_loads_no_server(tmp_path: Path) -> None:
    """`verdant-trio check-config` validates a file without importing Quart or hypercorn."""
    config = tmp_path / "verdant-trio.toml"
    config.write_text('[auth]\ntoken_secret = "0123456789abcdef0123456789abcdef"\n')
    probe = textwrap.dedent(f"""
        import sys
        from verdant_trio.service.cli import main
        code = main(["check-config", {str(config)!r}])
        heavy = sorted({{m.split(".")[0] for m in sys.modules}}
                       & {{"quart", "quart_trio", "hypercorn", "werkzeug", "h11", "wsproto"}})
        print("loaded:", ",".join(heavy))
        sys.exit(code)
    """)
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "loaded: \n" in result.stdout, result.stdout
