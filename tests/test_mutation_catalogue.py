"""The mutation catalogue stays applicable: every planted bug still matches the code exactly once and names
tests that exist (``python tests/mutations/run.py`` plants them; benchmarks/results/mutations.md has the table)."""

import ast
from pathlib import Path

import pytest
from mutations.catalogue import MUTATIONS

ROOT = Path(__file__).resolve().parents[1]


def test_names_are_unique():
    names = [m.name for m in MUTATIONS]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("m", MUTATIONS, ids=lambda m: m.name)
def test_mutation_applies_once_and_its_tests_exist(m):
    source = (ROOT / m.file).read_text()
    assert source.count(m.old) == 1, f"{m.name}: the code it mutates changed; update tests/mutations/catalogue.py"
    mutated = source.replace(m.old, m.new)
    assert mutated != source
    if m.file.endswith(".py"):
        ast.parse(mutated)  # a bug, not a syntax error: the tests must fail on behaviour
    assert m.tests
    for node in m.tests:
        path, _, name = node.partition("::")
        tree = ast.parse((ROOT / path).read_text())
        if name:
            defined = {f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}
            assert name.split("[")[0] in defined, f"{m.name}: {node} does not exist"
