"""Size and documentation budgets for memopt/ (DESIGN.md section 5, conventions 5 and 9).

- every ``.py`` file: at most 400 lines, or 500 if it carries a ``# size-exempt: <reason>`` line;
- every function or method: at most 80 lines, counted ``def`` line to last line inclusive
  (decorators not counted);
- every module, ``__init__.py`` included, opens with a docstring.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG_ROOT = Path(__file__).resolve().parents[1] / "memopt"

MAX_FILE_LINES = 400
MAX_FILE_LINES_EXEMPT = 500
MAX_FUNCTION_LINES = 80
_EXEMPT = re.compile(r"^[ \t]*#[ \t]*size-exempt:[ \t]*\S", re.MULTILINE)


def check_source(name: str, source: str) -> list[str]:
    """Hygiene violations of one file, as human-readable strings (empty when clean)."""
    problems: list[str] = []
    n_lines = len(source.splitlines())
    exempt = bool(_EXEMPT.search(source))
    limit = MAX_FILE_LINES_EXEMPT if exempt else MAX_FILE_LINES
    if n_lines > limit:
        hint = "" if exempt else " (or add '# size-exempt: <reason>' for up to 500)"
        problems.append(f"{name}: {n_lines} lines > {limit}; split it{hint}")
    tree = ast.parse(source)
    if not ast.get_docstring(tree):
        problems.append(f"{name}: no module docstring (state the algorithm / pattern)")
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert node.end_lineno is not None
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                problems.append(
                    f"{name}:{node.lineno} function {node.name}() is {length} lines "
                    f"> {MAX_FUNCTION_LINES}"
                )
    return problems


def check_tree(pkg_root: Path = PKG_ROOT) -> list[str]:
    problems: list[str] = []
    for path in sorted(pkg_root.rglob("*.py")):
        name = str(path.relative_to(pkg_root.parent))
        problems += check_source(name, path.read_text(encoding="utf-8"))
    return problems


def test_memopt_hygiene() -> None:
    assert PKG_ROOT.is_dir(), f"no package at {PKG_ROOT}"
    problems = check_tree()
    assert not problems, "hygiene violations:\n" + "\n".join(problems)


# --- the checker itself must catch violations ------------------------------------------------

_DOC = '"""Doc."""\n'


def _function(n_lines: int) -> str:
    """A function spanning exactly ``n_lines`` lines."""
    return "def f():\n" + "    x = 1\n" * (n_lines - 1)


def test_clean_source_passes() -> None:
    assert not check_source("m.py", _DOC + _function(80) + "x = 2\n" * 300)


def test_flags_long_file_unless_exempt() -> None:
    long_src = _DOC + "x = 1\n" * 400
    assert any("401 lines > 400" in p for p in check_source("m.py", long_src))
    exempt = "# size-exempt: generated table\n" + long_src
    assert not check_source("m.py", exempt)
    assert check_source("m.py", exempt + "x = 1\n" * 100)  # 502 lines: over even the exempt cap
    assert check_source("m.py", "# size-exempt:\n" + long_src)  # a reason is required


def test_flags_long_function_and_method() -> None:
    problems = check_source("m.py", _DOC + _function(81))
    assert len(problems) == 1 and "f() is 81 lines" in problems[0]
    method = "class C:\n    async def g(self):\n" + "        x = 1\n" * 80
    assert any("g() is 81 lines" in p for p in check_source("m.py", _DOC + method))


def test_flags_missing_module_docstring() -> None:
    assert check_source("m.py", "x = 1\n") == [
        "m.py: no module docstring (state the algorithm / pattern)"
    ]
    assert check_source("__init__.py", "")


def test_check_tree_on_a_synthetic_package(tmp_path: Path) -> None:
    pkg = tmp_path / "memopt"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(_DOC)
    (pkg / "big.py").write_text(_DOC + _function(90))
    problems = check_tree(pkg)
    assert len(problems) == 1 and problems[0].startswith("memopt/big.py:2"), problems
