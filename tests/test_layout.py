"""The arrows of ARCHITECTURE.md hold: every import between sora's folders goes down the layer list, none
reaches `tools/` (scripts, not a package), and only `cli/` ends the process (SystemExit)."""

from __future__ import annotations

import ast
from pathlib import Path

SORA = Path(__file__).resolve().parents[1] / "sora"
# what each folder may import (besides itself); ARCHITECTURE.md, "Arrows"
ALLOWED = {
    "timeline": set(),
    "script": {"timeline"},
    "checkpoints": set(),
    "media": {"timeline"},
    "data": {"timeline", "script", "media"},
    "models": {"timeline"},
    "diffusion": {"timeline", "models"},
    "evaluation": {"timeline", "script", "media", "data", "models", "diffusion"},
    "inference": {"timeline", "script", "media", "data", "models", "diffusion", "checkpoints"},
    "training": {"timeline", "script", "media", "data", "models", "diffusion", "evaluation", "checkpoints",
                 "inference"},
    "cli": {"timeline", "script", "media", "data", "models", "diffusion", "evaluation", "checkpoints", "inference",
            "training"},
}


def imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)


def folder(path: Path) -> str:
    return path.relative_to(SORA).with_suffix("").parts[0]


def test_imports_only_run_down_the_layers():
    wrong = []
    for path in sorted(SORA.rglob("*.py")):
        if path.parent == SORA and path.name == "__init__.py":
            continue
        src = folder(path)
        for line, module in imports(path):
            top, _, rest = module.partition(".")
            if top == "tools":
                wrong.append(f"{path.relative_to(SORA.parent)}:{line} imports {module} (tools/ is not a package)")
            elif top == "sora" and rest:
                dst = rest.split(".")[0]
                if dst != src and dst not in ALLOWED[src]:
                    wrong.append(f"{path.relative_to(SORA.parent)}:{line}: {src} -> {dst} ({module})")
    assert not wrong, "\n".join(wrong)
    assert set(ALLOWED) == {folder(p) for p in SORA.rglob("*.py") if p.parent != SORA or p.stem != "__init__"}


def test_only_the_command_lines_exit():
    raising = [f"{p.relative_to(SORA.parent)}:{n.lineno}" for p in sorted(SORA.rglob("*.py")) if folder(p) != "cli"
               for n in ast.walk(ast.parse(p.read_text()))
               if isinstance(n, ast.Raise) and "SystemExit" in ast.unparse(n.exc or ast.Constant(None))]
    assert not raising, f"library code ends the process (raise an error the CLI turns into one line): {raising}"
