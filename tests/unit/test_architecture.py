"""The layout tells the story: no import circles, layers that depend one way, small modules, one shape for
every program, and unit ↔ executable ↔ module ↔ test names that line up one to one."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LIB = REPO / "lib" / "unbounded_agent"
BIN = REPO / "bin"
UNITS = REPO / "units"
UNIT_TESTS = REPO / "tests" / "unit"
MAX_LINES = 400
# Programs that no unit runs: the toolset's own CLI, /usr/bin/unbounded-agent (the launcher), the postinst's
# slot seeding, and the systemd generator (systemd runs it at daemon-reload).
NOT_UNITS = {"unbounded-agent", "unbounded-agent-launcher", "unbounded-agent-seed-slots", "unbounded-agent-generator"}
# The daemon runs the agent binary (upgraded by AgentUpgrade), not a program of the toolset.
AGENT_UNITS = {"unbounded-agent-daemon.service"}


def module_name(path: Path) -> str:
    rel = path.relative_to(LIB.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(LIB.rglob("*.py"))}


def imports_of(name: str, path: Path) -> set[str]:
    """Every module of the package that `name` imports, at its top or inside a function."""
    known = modules()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [f"{prefix}.{a.name}" for a in node.names] + [prefix]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("unbounded_agent."):
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    return {name: imports_of(name, path) for name, path in modules().items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == "open":
                found.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in sorted(edges):
        if n not in state:
            visit(n)
    return found


def test_no_module_imports_itself_back_through_others():
    assert cycles(graph()) == []


def layer(module: str) -> str:
    """A module's layer: its subpackage (upgrade, reset, queue, kube, cli) or, for a core module, itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_the_layers_depend_one_way():
    packages: dict[str, set[str]] = {}
    for name, deps in graph().items():
        packages.setdefault(layer(name), set()).update(layer(d) for d in deps if layer(d) != layer(name))
    assert cycles(packages) == []
    core = {p.stem for p in LIB.glob("*.py") if p.stem != "__init__"} - {"daemon"}
    for name, deps in graph().items():
        if layer(name) in core:  # the core never reaches up into an operation, the queue or the API
            assert {layer(d) for d in deps} <= core, f"{name} imports {sorted(deps)}"


def test_the_fan_out_controller_uses_none_of_the_host_side_packages():
    """It runs on a management host or in a pod: only the Kubernetes API, never the host's queue or operations."""
    edges = graph()
    reached, todo = set(), [m for m in edges if layer(m) == "fleet"]
    while todo:
        m = todo.pop()
        if m not in reached:
            reached.add(m)
            todo += edges.get(m, ())
    assert todo == [] and reached and not {layer(m) for m in reached} & {"upgrade", "reset", "queue", "cli"}


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


@pytest.mark.parametrize("path", sorted(LIB.rglob("*.py")), ids=lambda p: str(p.relative_to(LIB)))
def test_no_module_is_long(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_no_issue_numbers_in_code_or_units():
    pattern = re.compile(r"\bissues? #?\d+", re.I)
    offenders = [str(p.relative_to(REPO)) for p in [*LIB.rglob("*.py"), *BIN.iterdir(), *UNITS.iterdir()]
                 if pattern.search(p.read_text())]
    assert offenders == []


SHAPE = re.compile(r'#!/usr/bin/python3 -I\n"""[\s\S]+?"""\n\nimport sys\n\nfrom (unbounded_agent[\w.]*) import (\w+)\n\n'
                   r'sys\.exit\(\2\.(\w+)\(\)\)\n')


def programs() -> dict[str, tuple[str, str]]:
    """program -> (module, function) from each bin/ script, which must have the one shape."""
    out = {}
    for p in sorted(BIN.iterdir()):
        m = SHAPE.fullmatch(p.read_text())
        assert m, f"bin/{p.name} does not have the shape of every program"
        out[p.name] = (f"{m[1]}.{m[2]}", m[3])
    return out


def test_every_program_has_the_same_few_lines_and_its_function_exists():
    for prog, (module, function) in programs().items():
        path = modules()[module]
        defined = {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
        assert function in defined, f"bin/{prog}: {module}.{function} does not exist"


def unit_programs() -> dict[str, str]:
    """unit file -> the toolset program its ExecStart runs."""
    out = {}
    for unit in sorted(UNITS.glob("*.service")):
        m = re.search(r"^ExecStart=(\S+)", unit.read_text(), re.M)
        out[unit.name] = Path(m[1]).name if m else ""
    return out


def test_each_unit_runs_the_program_of_its_own_name():
    for unit, prog in unit_programs().items():
        if unit in AGENT_UNITS:
            continue
        assert prog == re.sub(r"@?\.service$", "", unit), f"{unit} runs {prog}"
        assert (BIN / prog).is_file()


def hook_programs() -> set[str]:
    """The toolset programs a unit runs besides its ExecStart= (e.g. the daemon's ExecStopPost=)."""
    found = set()
    for unit in UNITS.glob("*.service"):
        found |= {Path(m).name for m in re.findall(r"^Exec(?!Start=)\w+=[-+@:!]*(/usr/libexec/\S+)", unit.read_text(), re.M)}
    return found


def test_each_program_has_its_unit_and_its_module_its_test():
    units = set(unit_programs().values()) | hook_programs()
    for prog, (module, _) in programs().items():
        assert prog in units or prog in NOT_UNITS, f"bin/{prog} is run by no unit"
        parts = [p for p in module.split(".")[1:] if p != "steps"]
        test = UNIT_TESTS / f"test_{'_'.join(parts)}.py"
        assert test.is_file(), f"{module} (bin/{prog}) has no {test.relative_to(REPO)}"


def test_the_units_readme_names_every_unit():
    readme = (UNITS / "README.md").read_text()
    named = {re.sub(r"@\.service$", "@", u.name).removesuffix(".service") for u in UNITS.iterdir() if u.suffix != ".md"}
    missing = [u for u in sorted(named) if u.removesuffix("@") not in readme and not u.startswith("unbounded-agent-reset-")]
    assert missing == []
    assert "unbounded-agent-reset-" in readme  # the steps are named as a family
