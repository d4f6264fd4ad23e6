"""The structure the code keeps: one-way layers, no import cycles, families instead of architecture
tests, benchmarks that use the public probe only. Static checks over the source (no imports)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "library"

# What each layer may import from the package (besides itself and the layer-free helpers).
BASE = {"library.errors", "library.utils"}
LAYERS = {
    "config": {"config"},
    "models": {"models", "config"},
    "data": {"data", "config", "models"},
    "lora": {"lora", "config", "models"},
    "apt": {"apt", "config", "models"},
    "demo": {"demo", "config", "models"},
    "train": {"train", "config", "models", "data", "lora", "apt"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every library module a file imports: at the top, inside functions and under TYPE_CHECKING."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("library")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("library"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def library_modules() -> dict[str, Path]:
    return {module_name(p): p for p in LIBRARY.rglob("*.py")}


def test_layers_import_one_way():
    wrong = []
    for name, path in library_modules().items():
        parts = name.split(".")
        if len(parts) < 3 or parts[1] not in LAYERS:
            continue
        allowed = LAYERS[parts[1]]
        for target in imports(path):
            tparts = target.split(".")
            if len(tparts) < 2 or any(target == b or target.startswith(b + ".") for b in BASE):
                continue
            if tparts[1] not in allowed and tparts[1] in LAYERS:
                wrong.append(f"{name} imports {target}")
    assert not wrong, wrong


def test_no_import_cycles_between_library_modules():
    modules = library_modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for target in imports(path):
            while target and target not in modules:  # `from library.x import name` -> library.x
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                targets.add(target)
        graph[name] = targets
    seen, stack, cycles = set(), [], []

    def visit(node):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for nxt in graph.get(node, ()):
            visit(nxt)
        stack.pop()

    for node in graph:
        visit(node)
    assert not cycles, cycles[:3]


# An architecture compared with a literal name: `arch == "sdxl"`, `arch in ("sd1", "sd2")`, `is_sdxl`.
ARCH_TEST = re.compile(r"""arch\s*(==|!=)\s*["'](?!auto["'])|arch\s+(not\s+)?in\s*[(\[{]\s*["']|is_sdxl|"""
                       r"""(==|!=)\s*["'](sd1|sd2|sdxl|sd15)["']|["'](sd1|sd2|sdxl|sd15)["']\s*(==|!=)""")


def test_no_architecture_tests_outside_the_family_implementations():
    allowed = {LIBRARY / "models" / "stable_diffusion.py"}
    found = []
    for folder in (LIBRARY, ROOT / "tools", ROOT / "bench"):
        for path in folder.rglob("*.py"):
            if path in allowed:
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                code = line.split("#", 1)[0]
                if ARCH_TEST.search(code):
                    found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, found


def test_benches_use_the_public_probe_and_nothing_from_tests():
    private = re.compile(r"\btrainer\.(parts|reporting|_\w+)|\btrainer\.\w+\s*=[^=]|from tests\b|import tests\b")
    found = []
    for path in (ROOT / "bench").glob("*.py"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if private.search(line.split("#", 1)[0]):
                found.append(f"{path.name}:{n}: {line.strip()}")
    assert not found, found


def test_tools_and_benches_import_the_installed_package_without_editing_sys_path():
    edits = re.compile(r"sys\.path\.(insert|append)|sys\.path\s*\+?=|site\.addsitedir")
    found = []
    for path in [*(ROOT / "tools").glob("*.py"), *(ROOT / "bench").glob("*.py"), ROOT / "train_apt_lora.py"]:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if edits.search(line.split("#", 1)[0]):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, found
