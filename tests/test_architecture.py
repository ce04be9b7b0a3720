"""Dependencies inside ``stt/`` point one way: no import cycle, type-checking imports included,
and only the CLI (which wires everything together) imports the worker."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "stt"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] \
                    if node.level else []
                target = ".".join([*base, *([node.module] if node.module else [])])
                candidates = {target} | {f"{target}.{a.name}" for a in node.names}
                deps |= {c for c in candidates if c in modules}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in modules}
        graph[name] = deps - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        for dep in sorted(graph.get(node, ())):
            if dep in path:
                found.append([*path[path.index(dep):], dep])
            elif dep not in done:
                visit(dep, [*path, dep])
        done.add(node)

    for node in sorted(graph):
        visit(node, [node])
    return found


def test_no_import_cycle_in_the_package() -> None:
    graph = import_graph()
    assert "stt.worker" in graph and "stt.status" in graph
    assert cycles(graph) == []


def test_only_the_cli_imports_the_worker() -> None:
    graph = import_graph()
    assert sorted(m for m, deps in graph.items() if "stt.worker" in deps) == ["stt.cli"]


def test_the_cycle_finder_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_a_session_reads_no_clock_and_does_no_io() -> None:
    """The session and its parts get the time as an argument; only the worker has a clock."""
    banned = {"time", "datetime", "asyncio", "socket", "nats", "threading", "stt.worker",
              "stt.engines.local", "stt.engines.http"}
    for name in ("session", "segmenter", "stabilizer", "protocol"):
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not imported & banned, (name, imported & banned)
    graph = import_graph()
    for part in ("stt.segmenter", "stt.stabilizer"):  # below the session: no protocol either
        assert not graph[part] & {"stt.session", "stt.protocol"}, (part, graph[part])
