"""The project's import graph has no circle and no arrow from a lower layer to a higher one.

Every module of the project's packages and scripts is read with `ast` (not imported), and every
import in it counts, those inside functions and under `if TYPE_CHECKING:` included: an import
moved into a function to dodge a circle is still a circle. An import names the project module it
loads: `from trainer.run import best` is trainer.run.best, `from trainer.evaluation import
format_table` the package trainer.evaluation (its __init__).

The layers (README, "What is here"; each package's __init__ docstring):

* model/ imports nothing of the rest of the project; data_shards/ nothing of model/ or trainer/;
  monitoring/ none of model/, data_shards/, trainer/; nothing imports bench/ or cluster/.
* Inside trainer/, each module belongs to one room, and a room imports only the rooms listed in
  TRAINER_ROOMS: the chain evaluator -> inference -> evaluation and run never goes backwards,
  nothing imports the evaluator but the command lines, and nothing imports a command line.
  The training side (trainer/training/) imports neither the evaluator nor inference nor a
  command line. A new module of trainer/ must
  be given a room here (the test says so).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "data_shards", "monitoring", "trainer", "cluster", "bench")

# What the top-level packages may import of each other (themselves always).
PACKAGE_RULES: dict[str, set[str]] = {
    "model": set(),
    "data_shards": {"monitoring"},
    "monitoring": set(),
    "trainer": {"model", "data_shards", "monitoring"},
    "cluster": set(),
    "bench": {"model", "data_shards", "monitoring", "trainer"},
}

# The command lines (`python trainer/<name>.py`, README "Command-line tools"): nothing imports them.
CLI_MODULES = {"launch", "evaluate", "encode", "report", "retrieve", "explain", "caption"}

# Room of trainer/ -> the rooms it may import (itself always).
TRAINER_ROOMS: dict[str, set[str]] = {
    "evaluation": set(),
    "config": {"evaluation"},
    "run": {"config"},
    "inference": {"evaluation", "run", "config"},
    "evaluator": {"inference", "evaluation", "run", "config"},
    "reporting": {"evaluation", "run", "config"},
    "training": {"evaluation", "run", "config"},
    "cli": {"evaluator", "inference", "evaluation", "run", "config", "reporting", "training"},
    "package": set(),
}


def trainer_room(module: str) -> str | None:
    """The room of a module of trainer/ (None: none assigned)."""
    parts = module.split(".")
    if parts == ["trainer"]:
        return "package"
    name = parts[1]
    if len(parts) == 2 and name in CLI_MODULES:
        return "cli"
    if name in TRAINER_ROOMS and name not in ("cli", "package"):
        return name
    return None


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the project module it loads
    where: str  # file:line


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_sources() -> dict[str, tuple[str, str]]:
    """module -> (its file, relative to the repository, its source)."""
    sources = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            sources[module_name(path)] = (str(path.relative_to(ROOT)), path.read_text(encoding="utf-8"))
    return sources


def imports_of(sources: Mapping[str, tuple[str, str]]) -> list[Import]:
    """Every import of a project module by a project module."""
    known = set(sources)
    packages = {name for name, (file, _) in sources.items() if file.endswith("__init__.py")}

    def resolve(name: str) -> str | None:  # the longest prefix of `name` that is a project module
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            candidate = ".".join(parts[:end])
            if candidate in known:
                return candidate
        return None

    found = []
    for module, (file, source) in sources.items():
        package = module if module in packages else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(source, filename=file)):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                # `from package import submodule` loads the submodule; any other name, the package.
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
            for target in targets:
                resolved = resolve(target)
                if resolved is not None and resolved != module:
                    found.append(Import(module, resolved, f"{file}:{node.lineno}"))
    return found


def circles(edges: Iterable[Import]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
        graph.setdefault(edge.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for child in sorted(graph[node]):
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in on_stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def layer_violations(edges: Iterable[Import]) -> list[str]:
    """Every import that runs against the layers, as `file:line: what`."""
    problems = []
    for edge in edges:
        source_package, target_package = edge.source.split(".")[0], edge.target.split(".")[0]
        if source_package != target_package:
            if target_package not in PACKAGE_RULES[source_package]:
                problems.append(f"{edge.where}: {edge.source} imports {edge.target}: {source_package}/ may import "
                                f"{sorted(PACKAGE_RULES[source_package]) or 'nothing'} of the project")
            continue
        if source_package != "trainer":
            continue
        source_room, target_room = trainer_room(edge.source), trainer_room(edge.target)
        if source_room is None or target_room is None:
            unassigned = edge.source if source_room is None else edge.target
            problems.append(f"{edge.where}: {unassigned} belongs to no room of trainer/: give it one in "
                            "tests/test_import_layers.py")
        elif source_room != target_room and target_room not in TRAINER_ROOMS[source_room]:
            problems.append(f"{edge.where}: {edge.source} ({source_room}) imports {edge.target} ({target_room}): "
                            f"{source_room} may import {sorted(TRAINER_ROOMS[source_room]) or 'nothing'} of trainer/")
    return list(dict.fromkeys(problems))  # one line per import statement, however many names it takes


def check(sources: Mapping[str, tuple[str, str]]) -> list[str]:
    edges = imports_of(sources)
    problems = layer_violations(edges)
    for component in circles(edges):
        members = set(component)
        lines = {f"{e.where}: {e.source} -> {e.target}" for e in edges if e.source in members and e.target in members}
        problems.append("circle of " + ", ".join(component) + ":\n    " + "\n    ".join(sorted(lines)))
    return problems


def test_the_project_has_no_circle_and_no_back_arrow() -> None:
    sources = project_sources()
    assert {"trainer.evaluation", "trainer.run.layout", "trainer.evaluator.actor", "model.vsrn"} <= set(sources)
    problems = check(sources)
    assert not problems, "\n".join(problems)


def test_every_module_of_trainer_has_a_room() -> None:
    unassigned = [m for m in project_sources() if m.startswith("trainer") and trainer_room(m) is None]
    assert not unassigned, f"give these modules a room in TRAINER_ROOMS: {unassigned}"


def _synthetic(modules: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    return {name: (name.replace(".", "/") + ".py", source) for name, source in modules.items()}


def test_the_check_finds_circles_back_arrows_and_imports_hidden_in_functions() -> None:
    fine = _synthetic({
        "trainer.run.best": "from trainer.run.layout import BEST_FILE\n",
        "trainer.run.layout": "import os\n",
        "trainer.evaluator.checkpoint_eval": "from trainer.inference import encoding\nfrom trainer.run import best\n",
        "trainer.inference.encoding": "from trainer.evaluation import GalleryIds\n",
        "trainer.evaluation": "",
    })
    assert check(fine) == []
    circle = _synthetic({
        "trainer.evaluator.checkpoint_eval": "from trainer.inference.retrieval import Gallery\n",
        "trainer.inference.retrieval": "def f():\n    from trainer.evaluator.checkpoint_eval import x\n",
    })
    problems = check(circle)
    circle_of = "circle of trainer.evaluator.checkpoint_eval, trainer.inference.retrieval"
    assert any(p.startswith(circle_of) for p in problems)
    assert any("trainer/inference/retrieval.py:2: trainer.inference.retrieval (inference) imports "
               "trainer.evaluator.checkpoint_eval (evaluator)" in p for p in problems)
    back = _synthetic({
        "data_shards.convert": "def ids():\n    from trainer.run import layout\n",
        "trainer.run.layout": "",
        "model.vsrn": "import data_shards.format\n",
        "data_shards.format": "",
        "trainer.run.best": "from trainer.evaluation import METRIC_KEYS\n",
        "trainer.evaluation": "",
        "trainer.training.worker": "from trainer import evaluate\n",
        "trainer.evaluate": "",
        "trainer.newthing": "",
        "trainer.run.records": "from trainer.newthing import x\n",
    })
    problems = check(back)
    expected = ["data_shards/convert.py:2: data_shards.convert imports trainer.run.layout",
                "model/vsrn.py:1: model.vsrn imports data_shards.format",
                "trainer/run/best.py:1: trainer.run.best (run) imports trainer.evaluation (evaluation)",
                "trainer/training/worker.py:1: trainer.training.worker (training) imports trainer.evaluate (cli)",
                "trainer/run/records.py:1: trainer.newthing belongs to no room"]
    for text in expected:
        assert any(p.startswith(text) for p in problems), (text, problems)
