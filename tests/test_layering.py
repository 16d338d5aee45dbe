"""Enforce the import layers of DESIGN.md section 2: imports inside memopt/ point down only.

Every ``.py`` under memopt/ is parsed with ``ast`` (nothing is imported, so a broken module
cannot hide a violation) and each ``import memopt.X`` / ``from memopt.X import ...`` / relative
import is resolved to an absolute module name. A module may import from a strictly lower layer,
from its own unit (``memopt.optim.galore`` may import ``memopt.optim._functional``), or along
one of the few same-layer edges in ``SAME_LAYER_ALLOWED``; the top-level ``memopt/__init__.py``
may import anything. Other siblings in one layer are independent (``memopt.optim`` never
imports ``memopt.sharding``). No module imports tests/, benchmarks/ or recipes/. Imports under
``if TYPE_CHECKING:`` and inside functions count too: they are dependencies all the same.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG_ROOT = Path(__file__).resolve().parents[1] / "memopt"

# unit (memopt.<first component>) -> layer number; see DESIGN.md section 2.
LAYERS: dict[str, int] = {
    "memopt._utils": 1,
    "memopt.offload": 2,
    "memopt.memory": 2,
    "memopt.optim": 3,
    "memopt.activations": 3,
    "memopt.sharding": 3,
    "memopt.checkpoint": 3,
    "memopt.config": 4,
    "memopt.api": 4,
    "memopt.integrations": 5,
    "memopt.cli": 5,
    "memopt.__main__": 6,  # ``python -m memopt``: the CLI
}
# Same-layer edges the design intends (one direction only, so no cycles): the entry point
# consumes the typed config, and the CLI drives the integrations. Everything else in one layer
# is an independent sibling.
SAME_LAYER_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        ("memopt.api", "memopt.config"),
        ("memopt.cli", "memopt.integrations"),
    }
)
TOP = "memopt"  # memopt/__init__.py: may import anything; nothing below may import it.
FORBIDDEN_ROOTS = frozenset({"tests", "benchmarks", "recipes"})


def module_name(path: Path, pkg_root: Path = PKG_ROOT) -> tuple[str, bool]:
    """Return (dotted module name, is_package) for a file under ``pkg_root``."""
    parts = ["memopt", *path.relative_to(pkg_root).with_suffix("").parts]
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def unit_of(module: str) -> str:
    """``memopt.optim.galore`` -> ``memopt.optim``; ``memopt`` -> ``memopt``."""
    return ".".join(module.split(".")[:2])


def imported_modules(module: str, is_package: bool, source: str) -> list[tuple[int, str]]:
    """All (line, absolute module) pairs a module imports, relative imports resolved."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(p for p in [*base_parts, node.module or ""] if p)
            else:
                base = node.module or ""
            # ``from memopt import optim`` imports memopt.optim; ``from memopt import foo``
            # (an attribute of the top package) imports the top package itself.
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((node.lineno, candidate if unit_of(candidate) in LAYERS else base))
    return found


def check_source(module: str, is_package: bool, source: str) -> list[str]:
    """Layering violations of one module, as human-readable strings (empty when clean)."""
    where = module + (" (__init__)" if is_package else "")
    own = unit_of(module)
    if module != TOP and own not in LAYERS:
        return [f"{where}: unit {own!r} has no layer; add it to LAYERS in tests/test_layering.py"]
    problems: list[str] = []
    for line, target in imported_modules(module, is_package, source):
        root = target.split(".")[0]
        if root in FORBIDDEN_ROOTS:
            problems.append(f"{where}:{line} imports {target!r}; memopt never imports {root}/")
            continue
        if root != "memopt" or module == TOP:
            continue
        dest = unit_of(target)
        if dest == own or (own, dest) in SAME_LAYER_ALLOWED:
            continue
        if dest == TOP:
            problems.append(
                f"{where}:{line} imports the top-level package 'memopt' (a cycle); "
                "import from the defining subpackage instead"
            )
        elif dest not in LAYERS:
            problems.append(f"{where}:{line} imports {target!r}, whose unit has no layer")
        elif LAYERS[dest] >= LAYERS[own]:
            kind = "a sibling in" if LAYERS[dest] == LAYERS[own] else "a higher"
            problems.append(
                f"{where}:{line} (L{LAYERS[own]}) imports {target!r}: {kind} layer "
                f"L{LAYERS[dest]}; imports must point down only"
            )
    return problems


def check_tree(pkg_root: Path = PKG_ROOT) -> list[str]:
    problems: list[str] = []
    for path in sorted(pkg_root.rglob("*.py")):
        module, is_package = module_name(path, pkg_root)
        problems += check_source(module, is_package, path.read_text(encoding="utf-8"))
    return problems


# --- the rule, applied to the real package ---------------------------------------------------


def test_memopt_imports_point_down_only() -> None:
    assert (PKG_ROOT / "__init__.py").is_file(), f"no package at {PKG_ROOT}"
    problems = check_tree()
    assert not problems, "layering violations:\n" + "\n".join(problems)


# --- the checker itself must catch violations ------------------------------------------------


def test_checker_flags_upward_import() -> None:
    problems = check_source("memopt._utils.x", False, "import memopt.optim\n")
    assert len(problems) == 1 and "memopt._utils.x:1" in problems[0] and "L3" in problems[0]
    assert check_source("memopt._utils.x", False, "from memopt.optim import galore\n")


def test_checker_flags_siblings() -> None:
    assert check_source("memopt.optim.galore", False, "from memopt.sharding import zero\n")
    assert check_source("memopt.offload.tier", False, "import memopt.memory.ledger\n")
    assert check_source("memopt.api", False, "from memopt.cli import main\n")
    assert check_source("memopt.config", False, "from memopt.api import setup\n")
    assert not check_source("memopt.api", False, "from memopt.config import MemoptConfig\n")


def test_checker_resolves_relative_imports() -> None:
    # memopt/optim/galore.py: ``..sharding`` is memopt.sharding (a sibling), ``.`` is memopt.optim.
    assert check_source("memopt.optim.galore", False, "from ..sharding import zero\n")
    assert check_source("memopt.optim.galore", False, "from .. import sharding\n")
    assert not check_source("memopt.optim.galore", False, "from . import _functional\n")
    assert not check_source("memopt.optim.galore", False, "from .._utils import device\n")
    # memopt/optim/__init__.py: ``.`` is memopt.optim itself.
    assert not check_source("memopt.optim", True, "from .galore import GaLoreAdamW\n")
    assert check_source("memopt._utils", True, "from ..offload import tiers\n")


def test_checker_allows_down_and_own_unit() -> None:
    src = "import torch\nimport memopt._utils.device\nfrom memopt.offload import pinned\n"
    assert not check_source("memopt.sharding.zero", False, src)
    assert not check_source("memopt.config", False, "from memopt.optim import GaLoreConfig\n")
    assert not check_source("memopt", True, "from memopt import cli, optim\nimport memopt.api\n")


def test_checker_flags_top_package_and_outside_trees() -> None:
    assert check_source("memopt.optim.galore", False, "from memopt import __version__\n")
    assert check_source("memopt.optim.galore", False, "import memopt\n")
    assert check_source("memopt", True, "import tests._harness\n")
    assert check_source("memopt.cli", False, "from recipes.llama import config\n")
    assert check_source("memopt.sharding.zero", False, "import benchmarks\n")


def test_checker_flags_unassigned_unit_and_checks_nested_scopes() -> None:
    assert check_source("memopt.newthing", False, "")
    src = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import memopt.api\n"
    assert check_source("memopt.memory.ledger", False, src)
    src = "def f():\n    from memopt.integrations import hf\n"
    assert check_source("memopt.sharding.zero", False, src)


def test_check_tree_on_a_synthetic_package(tmp_path: Path) -> None:
    (tmp_path / "_utils").mkdir()
    (tmp_path / "__init__.py").write_text("from memopt import optim\n")
    (tmp_path / "_utils" / "__init__.py").write_text('"""utils"""\n')
    (tmp_path / "_utils" / "x.py").write_text("import memopt.optim\n")
    problems = check_tree(tmp_path)
    assert len(problems) == 1 and problems[0].startswith("memopt._utils.x:1"), problems
