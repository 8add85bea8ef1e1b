"""models/bundle.py spells every file name of the bundle: no other module of the parts holds a string
literal that names a bundle file or folder (docstrings aside). Found by reading the code (AST)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "offline", "service", "bench", "cli")
OWNER = "models/bundle.py"
# A bundle folder at the start of a path, a file of the bundle's layout, or the suffix of a stored
# file built from a stem (f"{stem}.npz").
BUNDLE_NAME = re.compile(
    r"^(detectors|features|report|adversarial|open_world)/"
    r"|(^|/)(manifest|mutants|metrics|sweep_mutants|scores|robustness|report)\.(json|npz|md)$"
    r"|^(weights|conductance)\.safetensors$"
    r"|\.(npz|safetensors|json)$"
    r"|^open_world[a-z_]*\.(md|png)$"
)
NOT_BUNDLE_FILES = {
    # (file, literal): why the literal names no bundle file
    ("models/data/cifar10.py", "train_part0.npz"): "the CIFAR-10 data set's own files",
    ("models/data/cifar10.py", "train_part1.npz"): "the CIFAR-10 data set's own files",
    ("models/data/cifar10.py", "test.npz"): "the CIFAR-10 data set's own files",
    ("offline/import_weights.py", ".safetensors"): "the suffix of a weights file given to import (--weights)",
    ("offline/import_weights.py", ".json"): "a file inside a torch.export archive (--weights)",
    ("models/data/splits.py", ".json"): "the suffix of an index file given with --exclude-indices",
    ("bench/hostile.py", "reports/hostile.json"): "the hostile benchmark's output in the repository",
}
NOT_YET_MOVED: set[str] = set()


def bundle_names(source: str) -> list[tuple[int, str]]:
    """(line, literal) of every non-docstring string constant in ``source`` that names a bundle file."""
    tree = ast.parse(source)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
        and BUNDLE_NAME.search(node.value)
    ]


def test_the_scan_finds_bundle_names() -> None:
    found = [
        name
        for _, name in bundle_names(
            '"""features/x.npz in a docstring"""\nA = "detectors/scores.npz"\n'
            'B = f"{stem}.json"\nC = "report/metrics.json"\nD = "a sentence."\n'
        )
    ]
    assert sorted(found) == [".json", "detectors/scores.npz", "report/metrics.json"]


def test_no_bundle_file_name_outside_the_bundle_module() -> None:
    stray = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel == OWNER or rel in NOT_YET_MOVED:
                continue
            stray += [
                f"{rel}:{line}: {name!r}"
                for line, name in bundle_names(path.read_text())
                if (rel, name) not in NOT_BUNDLE_FILES
            ]
    assert not stray, "bundle file names belong in models/bundle.py:\n" + "\n".join(stray)
