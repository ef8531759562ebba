"""Every Python snippet of the README runs as written (the engine guides, marked
``<!-- guide: ... -->``, run against the engines' real classes in tests/engines)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def snippets() -> list[tuple[int, str]]:
    text = README.read_text()
    found = []
    for m in re.finditer(r"(<!-- guide: \w+ -->\n)?```python\n(.*?)```", text, re.S):
        if m.group(1) is None:
            found.append((text[:m.start()].count("\n") + 1, m.group(2)))
    return found


def test_the_readme_has_snippets():
    assert len(snippets()) >= 3


@pytest.mark.parametrize("line,code", snippets(), ids=lambda v: f"line {v}" if isinstance(v, int) else "")
def test_snippet_runs_as_written(line, code):
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": f"readme_{line}"})
