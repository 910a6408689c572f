"""The import graph follows the course: no module imports a later step's module, and the
cross-cutting modules import no step module when they are imported (CONTRIBUTING.md,
"Layout and layering"). Read from the source with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import course_lib

#: Every module of course_lib: its step (a package counts as one module), or None for the
#: cross-cutting modules, which any step may import and which import no step at top level
#: (the CLI and the doctor import step code inside the command that needs it).
MODULES: dict[str, int | None] = {
    "__init__": 1,  # the package re-exports step 1's setup names
    "config": 1, "anatomy": 1, "bigram": 1,
    "tokenizers": 2, "text_data": 2, "embeddings": 2,
    "attention": 3,
    "model": 4, "generation": 4,
    "training": 5, "checkpoint": 5, "pretrained": 5, "base_model": 5, "inference": 5,
    "classification": 6,
    "instruction": 7, "evaluation": 7, "preference": 7,
    "schedules": 8, "shards": 8, "mfu": 8, "trainer": 8,
    "lora": 9,
    "export": 9,
    "engine": 9,
    "serve": 9,
    "paths": None, "files": None, "checks": None, "data": None, "plots": None,
    "checker": None, "doctor": None, "cli": None, "notebook_runner": None,
    "site": None, "hints": None, "progress": None, "cohort": None,
}


def _module_of(path: Path, package: Path) -> str:
    """``config`` for ``course_lib/config.py``, ``tokenizers`` for ``course_lib/tokenizers/bpe.py``."""
    return path.relative_to(package).parts[0].removesuffix(".py")


def _imports(path: Path, package: Path) -> list[tuple[str, int, bool]]:
    """``(module imported, line, at import time?)`` for every import of a course_lib module in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    here = path.parent.relative_to(package.parent).parts  # ("course_lib",) or ("course_lib", "tokenizers")
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    parts = alias.name.split(".")
                    if parts[0] == package.name and len(parts) > 1:
                        found.append((parts[1], child.lineno, not in_function))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = list(here[: len(here) - child.level + 1])
                else:
                    base = []
                parts = base + (child.module.split(".") if child.module else [])
                if not parts or parts[0] != package.name:
                    continue
                if len(parts) > 1:
                    found.append((parts[1], child.lineno, not in_function))
                else:  # from . import data
                    found.extend((alias.name, child.lineno, not in_function) for alias in child.names)
            visit(child, nested)

    visit(tree, False)
    return found


def layering_violations(package: Path, modules: dict[str, int | None]) -> list[str]:
    """Every import that breaks the layering rule, as ``file:line: why``."""
    problems = []
    for path in sorted(package.rglob("*.py")):
        name = _module_of(path, package)
        where = path.relative_to(package.parent)
        if name not in modules:
            problems.append(f"{where}: module {name!r} is in no step; add it to MODULES in tests/test_layering.py "
                            "and to the table in CONTRIBUTING.md")
            continue
        step = modules[name]
        for target, line, at_import in _imports(path, package):
            if target == name or target not in modules:
                continue
            target_step = modules[target]
            if target_step is None:
                continue  # cross-cutting: anyone may import it
            if step is None and at_import:
                problems.append(f"{where}:{line}: cross-cutting {name} imports step {target_step}'s {target} at "
                                "import time; import it inside the function that needs it")
            elif step is not None and target_step > step:
                problems.append(f"{where}:{line}: step {step}'s {name} imports step {target_step}'s {target}")
    return problems


def test_no_module_imports_a_later_step():
    problems = layering_violations(Path(course_lib.__file__).parent, MODULES)
    assert not problems, "\n".join(problems)


def test_the_check_finds_each_kind_of_violation(tmp_path):
    pkg = tmp_path / "course_lib"
    (pkg / "tokenizers").mkdir(parents=True)
    sources = {
        "__init__.py": "from .config import x\n",
        "config.py": "def f():\n    from .model import GPTModel\n",        # step 1 -> step 4, even lazily
        "model.py": "from .checks import positive_int\nfrom .config import x\n",  # fine
        "checks.py": "import course_lib.config\n",                           # cross-cutting -> step at import
        "cli.py": "def main():\n    from . import training\n",              # fine: lazy, in a command
        "training.py": "from . import model\n",                               # fine
        "tokenizers/__init__.py": "from .bpe import B\n",
        "tokenizers/bpe.py": "from ..files import atomic_write\nfrom ..attention import A\n",  # step 2 -> step 3
        "attention.py": "",
        "files.py": "",
        "mystery.py": "",                                                     # in no step
    }
    for name, text in sources.items():
        (pkg / name).write_text(text, encoding="utf-8")
    modules = {"__init__": 1, "config": 1, "tokenizers": 2, "attention": 3, "model": 4, "training": 5,
               "checks": None, "cli": None, "files": None}
    problems = layering_violations(pkg, modules)
    assert len(problems) == 4, "\n".join(problems)
    for says in ("config.py:2: step 1's config imports step 4's model",
                 "checks.py:1: cross-cutting checks imports step 1's config at import time",
                 "bpe.py:2: step 2's tokenizers imports step 3's attention",
                 "module 'mystery' is in no step"):
        assert any(says in p for p in problems), (says, problems)


@pytest.mark.parametrize("name", sorted(n for n, s in MODULES.items() if s is not None and n != "__init__"))
def test_every_step_module_says_its_step_first(name):
    package = Path(course_lib.__file__).parent
    path = package / name / "__init__.py" if (package / name).is_dir() else package / f"{name}.py"
    if not path.exists():
        pytest.skip(f"{name} does not exist yet")
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    assert doc.startswith(f"Step {MODULES[name]} "), f"{path.name}'s docstring should start 'Step {MODULES[name]} — ...'"
