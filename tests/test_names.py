"""No two things in the project share a name (issue 25): a reader who meets a public name knows
which one it is. Names may repeat only where several modules implement one interface: the
kernels (bncore/nn/kernels: NAME, forward, backward, supports, ...), each dashboard view's
``layout``, a program's ``main``, and each training framework's ``BNScopeCallback`` (the name
its users look for: ``bnscope.lightning.BNScopeCallback``, ``bnscope.hf.BNScopeCallback``)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bncore", "server", "dashboard", "bnscope")
#: Folders whose modules implement one interface, each by the same names.
INTERFACES = {"bncore/nn/kernels": None, "dashboard/views": {"layout"}}
ENTRY_POINTS = {"main"}
#: One name, one interface, in exactly these modules.
SHARED = {"BNScopeCallback": {"bnscope/lightning.py", "bnscope/hf.py"}}


def public_names() -> dict[str, set[str]]:
    """Each public top-level class, function and constant, with the modules defining it."""
    found: dict[str, set[str]] = defaultdict(set)
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT)
            if "migrations" in rel.parts:  # frozen history, not code one reads
                continue
            for node in ast.parse(path.read_text()).body:
                names: list[str] = []
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    names = [node.name]
                elif isinstance(node, ast.Assign | ast.AnnAssign):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    names = [t.id for t in targets if isinstance(t, ast.Name) and t.id.isupper()]
                found.update({n: found[n] | {str(rel)} for n in names if not n.startswith("_")})
    return found


def implements_one_interface(name: str, modules: set[str]) -> bool:
    if name in ENTRY_POINTS or modules <= SHARED.get(name, set()):
        return True
    for folder, names in INTERFACES.items():
        inside = {m for m in modules if m.startswith(folder + "/") or m.startswith(folder + ".")}
        if (names is None or name in names) and len(modules - inside) <= (names is not None):
            return True
    return False


def test_no_two_things_share_a_name():
    clashes = {
        name: sorted(modules)
        for name, modules in public_names().items()
        if len(modules) > 1 and not implements_one_interface(name, modules)
    }
    assert not clashes, f"names defined in more than one module: {clashes}"


def test_the_check_sees_a_clash():
    """The rule catches what it is for: a name in two unrelated modules."""
    assert not implements_one_interface("Records", {"bncore/record/tables.py", "server/x.py"})
    assert implements_one_interface("forward", {"bncore/nn/kernels/cpu.py",
                                                "bncore/nn/kernels/reference.py"})  # fmt: skip
