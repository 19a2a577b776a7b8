"""The package's shape, as docs/design.md section 7 describes it: the step's path from
`FusedLAMB.step()` to a kernel in at most 8 files that exist under the names given, no import cycle
between lamb_kernels' modules, and no module over 400 lines."""
import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lamb_kernels"
MAX_LINES = 400


def _path_section() -> str:
    text = (ROOT / "docs" / "design.md").read_text()
    start = text.index("### The step's path, file by file")
    return text[start:text.index("\n## ", start)]


def test_the_steps_path_is_at_most_8_files_that_exist():
    steps = re.findall(r"(?m)^(\d+)\. `([^`]+)`", _path_section())
    assert [int(n) for n, _ in steps] == list(range(1, len(steps) + 1)) and len(steps) <= 8, steps
    named = re.findall(r"`([\w/]+\.(?:py|cpp|cu))`", _path_section())
    for name in named:
        if name.startswith("tests/"):
            continue
        path = ROOT / name if name.startswith(("csrc/", "lamb_kernels/")) else PACKAGE / name
        assert path.is_file(), f"docs/design.md names {name}, which is not {path}"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, modules: set) -> set:
    """The package's modules that `path` imports at module level (not inside functions: those run
    when called, as the backends' lazy imports do)."""
    package = _module_name(path).split(".") if path.name == "__init__.py" else _module_name(path).split(".")[:-1]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + (node.module.split(".") if node.module else []))
            for alias in node.names:
                name = f"{target}.{alias.name}"
                found.add(name if name in modules else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found & modules


def test_no_module_imports_one_that_imports_it_back():
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    graph = {_module_name(p): _imports(p, modules) for p in paths}
    # A package's __init__ imports its modules (its face); a module importing its own package's
    # __init__ for a sibling is the same arrow, so packages are left out of the cycle search.
    packages = {_module_name(p) for p in paths if p.name == "__init__.py"}
    graph = {m: {d for d in deps if d not in packages} for m, deps in graph.items() if m not in packages}
    state = {}

    def visit(module, trail):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", f"import cycle: {' -> '.join(trail + [module])}"
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            visit(dep, trail + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
