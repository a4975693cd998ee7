"""The project's code stays on torch's public API.

Private torch modules (`torch._C`, `torch._dynamo`, `torch.distributed._functional_collectives`,
any dotted name with a segment starting with an underscore) change between releases without
notice: `_functional_collectives.all_gather_single_autograd` exists from torch 2.13 only, and using
it broke every multi-worker run on the GPU host's torch 2.11. This test reads every module of the
project's packages and scripts with `ast` and fails on an import of such a module, or an attribute
chain from `torch` through one (`torch._foo`, `torch.distributed._bar.baz`). Strings are not code:
the reference-checkpoint converter's unpickler allow-list names `torch._utils._rebuild_tensor` as
data, which is fine.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "trainer", "data_shards", "monitoring", "cluster", "bench")


def _private(dotted: str) -> bool:
    parts = dotted.split(".")
    return parts[0] == "torch" and any(part.startswith("_") and not part.startswith("__") for part in parts[1:])


def _dotted(node: ast.AST) -> str | None:
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(names)])
    return None


def private_torch_uses(source: str, filename: str) -> list[str]:
    """`file:line: name` of every private torch module or attribute the code names."""
    tree = ast.parse(source, filename=filename)
    aliases: dict[str, str] = {}  # local name -> torch dotted name it stands for
    found = []
    inner = {id(child.value) for child in ast.walk(tree) if isinstance(child, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "torch":
                    aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else "torch"
                    if _private(alias.name):
                        found.append(f"{filename}:{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "torch":
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                aliases[alias.asname or alias.name] = full
                if _private(full):
                    found.append(f"{filename}:{node.lineno}: from {node.module} import {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner:  # the whole chain, once
            dotted = _dotted(node)
            if dotted is None:
                continue
            head, _, rest = dotted.partition(".")
            if head in aliases:
                full = f"{aliases[head]}.{rest}"
                if _private(full):
                    found.append(f"{filename}:{node.lineno}: {dotted}")
    return sorted(set(found))


def _project_files() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


def test_the_check_finds_private_torch_modules_however_they_are_named() -> None:
    code = (
        "import torch\n"
        "import torch.distributed._functional_collectives as funcol\n"
        "from torch._dynamo import config\n"
        "from torch import _C\n"
        "import torch.distributed as dist\n"
        "x = torch._C._get_tracing_state()\n"
        "y = dist._functional_collectives.all_gather_single_autograd\n"
        "z = torch.nn.functional.relu\n"
        "allowed = ['torch._utils._rebuild_tensor']\n"
    )
    found = private_torch_uses(code, "example.py")
    assert {line.split(": ", 1)[1] for line in found} == {
        "import torch.distributed._functional_collectives",
        "from torch._dynamo import config",
        "from torch import _C",
        "torch._C._get_tracing_state",
        "dist._functional_collectives.all_gather_single_autograd",
    }


def test_the_project_uses_no_private_torch_module() -> None:
    files = _project_files()
    assert len(files) > 50  # the packages were found
    found = [use for path in files
             for use in private_torch_uses(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))]
    assert found == [], "private torch APIs break on upgrade; use a public one:\n" + "\n".join(found)
