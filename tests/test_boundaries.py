"""The package boundaries of issue 9, checked by reading the source (no import, no broker).

Every module under services/, schemas/ and outreach/ is parsed with `ast`; every import in it counts,
wherever it sits (inside functions, under `if TYPE_CHECKING:`: a type is a dependency too), in each form
(`import a.b`, `from a import b`, relative imports resolved against the module's package) and
`importlib.import_module` / `__import__` called with a literal or an f-string's literal head.

The areas: `outreach` (the CLI), `schemas` (the shared vocabulary), the kernel (`services/common/`) and
one area per service package (every other sub-package of services/, found on disk so that a new service
is covered without editing this file). The rules, one test each:
- services never import `outreach` (the CLI may import services, never the reverse);
- a service imports only `schemas`, the kernel and itself; the read side's one exception: `services.api`
  may import `services.projections.views` (the queries) and nothing else of the projections;
- `schemas` imports nothing of ours;
- the kernel imports no service and not `outreach`.
"""
from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKED_ROOTS = ("services", "schemas", "outreach")
KERNEL = "common"
KNOWN_SERVICES = {"api", "command_handler", "projections", "sender", "simulator", "timeout_sweeper",
                  "webhook_receiver"}
API_MAY_READ = "services.projections.views"  # the one module of another service a service may import


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted
    line: int
    target: str  # what it imports, dotted (`from a import b` gives `a.b`: b may be a submodule)

    def __str__(self) -> str:
        return f"{self.module}:{self.line} imports {self.target}"


# ---------------------------------------------------------------- reading imports

def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(module: str, source: str, *, is_package: bool = False) -> Iterator[Import]:
    """Every import `module` makes, at any depth of its syntax tree."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source, module)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(module, package, node)
            for alias in node.names:
                yield Import(module, node.lineno, base if alias.name == "*" else f"{base}.{alias.name}")
        elif isinstance(node, ast.Call) and (target := _dynamic_import_target(node)):
            yield Import(module, node.lineno, target)


def _resolve_from(module: str, package: list[str], node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    if node.level - 1 >= len(package):
        raise ValueError(f"{module}:{node.lineno}: relative import beyond the top-level package")
    anchor = package[:len(package) - (node.level - 1)]
    return ".".join(anchor + ([node.module] if node.module else []))


def _dynamic_import_target(call: ast.Call) -> str | None:
    """`importlib.import_module("a.b")` / `__import__("a.b")`; for an f-string, its literal head up to the
    last dot (f"services.sender.{name}" reaches into services.sender)."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name not in ("import_module", "__import__") or not call.args:
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(head := arg.values[0], ast.Constant):
        return str(head.value).rpartition(".")[0] or None
    return None


# ---------------------------------------------------------------- the project on disk

def _python_files(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*.py")):
        if not any(part.startswith(".") or part == "__pycache__" for part in path.relative_to(ROOT).parts):
            yield path


@cache
def service_packages() -> frozenset[str]:
    """Every sub-package of services/ except the kernel: each directory there holding Python code."""
    return frozenset(d.name for d in (ROOT / "services").iterdir()
                     if d.is_dir() and d.name not in (KERNEL, "__pycache__") and not d.name.startswith(".")
                     and next(_python_files(d), None) is not None)


@cache
def project_imports() -> tuple[Import, ...]:
    found: list[Import] = []
    for root in CHECKED_ROOTS:
        for path in _python_files(ROOT / root):
            found += imports_of(module_name(path), path.read_text(encoding="utf-8"),
                                is_package=path.name == "__init__.py")
    return tuple(found)


# ---------------------------------------------------------------- the rules

def area(name: str) -> str | None:
    """Which of our areas a dotted name is in: "outreach", "schemas", "kernel", a service's name
    (services.<name>...), or None (a third-party module, or the bare `services` namespace)."""
    top, _, rest = name.partition(".")
    if top in ("outreach", "schemas"):
        return top
    if top == "services" and rest:
        sub = rest.partition(".")[0]
        return "kernel" if sub == KERNEL else sub
    return None


def is_service(area_name: str | None) -> bool:
    return area_name not in (None, "outreach", "schemas", "kernel")


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _under_services(module: str) -> bool:
    return _within(module, "services")


def _service_reaches_another(imp: Import) -> bool:
    own, reached = area(imp.module), area(imp.target)
    if not (is_service(own) and is_service(reached)) or own == reached:
        return False
    return not (own == "api" and _within(imp.target, API_MAY_READ))


@dataclass(frozen=True)
class Rule:
    id: str  # names the failing test
    name: str
    breaks: Callable[[Import], bool]


RULES = (
    Rule("services-never-import-outreach",
         "services never import outreach (the CLI may import services, never the reverse)",
         lambda imp: _under_services(imp.module) and area(imp.target) == "outreach"),
    Rule("services-import-no-other-service",
         "a service imports only schemas, the kernel and itself "
         f"(the API may also import {API_MAY_READ}, nothing else of the projections)",
         _service_reaches_another),
    Rule("schemas-import-nothing-of-ours",
         "schemas import nothing of services/ or outreach/ (the shared vocabulary depends on nothing of ours)",
         lambda imp: area(imp.module) == "schemas" and imp.target.partition(".")[0] in ("services", "outreach")),
    Rule("kernel-imports-no-service-nor-cli",
         "the kernel (services/common) imports no service and not outreach",
         lambda imp: area(imp.module) == "kernel" and (area(imp.target) == "outreach" or is_service(area(imp.target)))),
)


def violations(rule: Rule, imports: tuple[Import, ...] | list[Import]) -> list[Import]:
    return [imp for imp in imports if rule.breaks(imp)]


# ---------------------------------------------------------------- the tests

def test_every_known_service_package_is_found_so_the_rules_cannot_pass_vacuously():
    missing = KNOWN_SERVICES - service_packages()
    assert not missing, f"service packages not found under services/: {sorted(missing)}"
    checked = {area(imp.module) for imp in project_imports()}
    assert KNOWN_SERVICES | {"kernel", "schemas", "outreach"} <= checked, checked


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.id)
def test_boundary(rule: Rule):
    offending = violations(rule, project_imports())
    assert not offending, f"{rule.name}; broken by {len(offending)} import(s):\n" + "\n".join(
        f"  {imp}" for imp in offending)


def test_the_checker_catches_each_kind_of_violation_in_a_synthetic_module():
    sender_source = (
        "import os\n"
        "from schemas import times\n"
        "from services.common.retry import retrying\n"
        "from . import claims\n"
        "def late():\n"
        "    from ..command_handler.domain import model\n"                      # line 6: relative, in a function
        "    import outreach.cli\n"                                             # line 7
        "    return importlib.import_module(f'services.api.{name}')\n"          # line 8: dynamic
    )
    found = list(imports_of("services.sender.fake", sender_source))
    assert [str(imp) for imp in violations(RULES[0], found)] == ["services.sender.fake:7 imports outreach.cli"]
    assert [str(imp) for imp in violations(RULES[1], found)] == [
        "services.sender.fake:6 imports services.command_handler.domain.model",
        "services.sender.fake:8 imports services.api"]

    api_source = (
        "from services.projections.views import ReadViews\n"
        "from services.projections import views, storage\n"                    # line 2: storage is not views
        "import services.projections.fold\n"                                   # line 3
    )
    assert [str(imp) for imp in violations(RULES[1], list(imports_of("services.api.reads", api_source)))] == [
        "services.api.reads:2 imports services.projections.storage",
        "services.api.reads:3 imports services.projections.fold"]

    kernel_init = "from .. import sender\nfrom .sqlite import open_sqlite\nfrom schemas import ids\n"
    found = list(imports_of("services.common", kernel_init, is_package=True))
    assert [str(imp) for imp in violations(RULES[3], found)] == ["services.common:1 imports services.sender"]

    schemas_source = "from pydantic import BaseModel\nfrom services.common import ids\n"
    found = list(imports_of("schemas.fake", schemas_source))
    assert [str(imp) for imp in violations(RULES[2], found)] == ["schemas.fake:2 imports services.common.ids"]


def test_a_relative_import_beyond_the_top_package_is_reported_not_guessed():
    with pytest.raises(ValueError, match="schemas.fake:1"):
        list(imports_of("schemas.fake", "from ... import x\n"))
