"""The package's rooms as the README's map draws them: every module is on the map, each imports only
rooms drawn above it (imports inside functions count), there is no import circle, and no module
reaches another through the package's lazy names (``from flaxsst import Classifier``)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "flaxsst"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package modules ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "flaxsst":
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "flaxsst")
    return found - {"flaxsst"} if module_name(path) != "flaxsst" else found


def readme_rooms() -> list[str]:
    """The modules the README's Layout block names, top to bottom (``flaxsst/serve/app.py`` ->
    ``flaxsst.serve.app``; a line naming several rooms gives each)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    names = []
    folder = None
    for line in block.splitlines():
        first = line.split()[0] if line.strip() else ""
        if not line.startswith(" "):  # a room's own line: a folder opens a block, anything else ends one
            folder = first if first.endswith("/") and first.startswith("flaxsst/") else None
        for match in re.findall(r"(flaxsst/[\w/]+\.py|(?<![\w/])[a-z_]+\.py)", line):
            path = match if match.startswith("flaxsst/") else (folder or "") + match
            if path.startswith("flaxsst/"):
                names.append(path[:-3].replace("/", "."))
    return list(dict.fromkeys(names))


def test_every_module_is_on_the_readme_map_and_imports_only_rooms_drawn_above_it():
    known = modules()
    order = readme_rooms()
    missing = sorted(set(known) - set(order) - {"flaxsst", "flaxsst.serve", "flaxsst.serve.__main__"})
    assert not missing, f"modules missing from the README's Layout: {missing}"
    assert not sorted(set(order) - set(known)), "the README names modules that do not exist"
    position = {name: index for index, name in enumerate(order)}
    upward = []
    for name, path in known.items():
        for imported in imports_of(path, set(known)):
            if name in position and imported in position and position[imported] > position[name]:
                upward.append(f"{name} imports {imported}, drawn below it")
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_circle():
    known = modules()
    graph = {name: imports_of(path, set(known)) - {name} for name, path in known.items()}
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for other in sorted(graph.get(node, ())):
            if state.get(other) == 1:
                circles.append(stack[stack.index(other):] + [other])
            elif other not in state:
                visit(other, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not circles, circles


def test_no_class_is_over_200_lines():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 200:
                long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, long


def test_no_module_imports_through_the_packages_lazy_names():
    lazy = re.compile(r"^\s*from flaxsst import .*\b(Classifier|ModelConfig|Tokenizer)\b", re.M)
    offenders = [name for name, path in modules().items() if lazy.search(path.read_text(encoding="utf-8"))]
    assert not offenders, offenders
