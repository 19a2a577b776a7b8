"""The Python blocks of README.md and docs/*.md that claim to run do run, and the excerpts stay
excerpts.

Two markers, each an HTML comment (invisible on GitHub) alone on the line before a ```python fence:

    <!-- runnable -->
        The block is a complete program: it runs in a fresh interpreter, in an empty folder, with
        the checkout importable, and must exit 0 within RUN_TIMEOUT_S. It is skipped, naming the
        package, when it imports one that is not installed (transformers, lightning: the examples
        extra).

    <!-- excerpt: examples/some_script.py -->
        The block is a run of consecutive lines of that file, indentation aside (the block may be
        dedented), so that what a page shows cannot drift from the script that the tests run.

A block with neither marker is not checked here. A marker that does not sit on a Python block fails.
"""
import ast
import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_TIMEOUT_S = 120
MARKER = re.compile(r"^<!--\s*(runnable|excerpt:\s*(\S+))\s*-->\s*$")
FENCE = re.compile(r"^```\s*(\w*)\s*$")


def marked_blocks():
    """(page, line number of the fence, kind, excerpt's file or None, code) for every marked block."""
    blocks = []
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines):
            marker = MARKER.match(line.strip())
            if not marker:
                continue
            kind = "runnable" if marker.group(1) == "runnable" else "excerpt"
            fence = FENCE.match(lines[number + 1]) if number + 1 < len(lines) else None
            if not fence or fence.group(1) != "python":
                blocks.append((page, number + 1, "misplaced", None, line))
                continue
            end = next(i for i in range(number + 2, len(lines)) if lines[i].strip() == "```")
            blocks.append((page, number + 2, kind, marker.group(2), "\n".join(lines[number + 2:end]) + "\n"))
    return blocks


def case_id(block):
    page, line = block[:2]
    return f"{page.relative_to(ROOT)}:{line}"


BLOCKS = marked_blocks()


def test_every_marker_sits_on_a_python_block():
    misplaced = [f"{case_id(b)}: {b[4]}" for b in BLOCKS if b[2] == "misplaced"]
    assert not misplaced, f"a marker not followed by a ```python fence: {misplaced}"


def imported_top_levels(code: str) -> set:
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.partition(".")[0])
    return names


@pytest.mark.parametrize("block", [b for b in BLOCKS if b[2] == "runnable"], ids=case_id)
def test_runnable_block_runs(block, tmp_path):
    page, line, _, _, code = block
    missing = sorted(name for name in imported_top_levels(code) if importlib.util.find_spec(name) is None)
    if missing:
        pytest.skip(f"{case_id(block)} imports {', '.join(missing)}, not installed (pip install -e '.[examples]')")
    script = tmp_path / "snippet.py"
    script.write_text(code, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, f"{case_id(block)} failed:\n{code}\n--- stderr ---\n{done.stderr[-4000:]}"


def is_run_of_lines(excerpt: str, source: str) -> bool:
    """Whether the excerpt's lines are consecutive lines of source, both dedented alike."""
    want = textwrap.dedent(excerpt).strip("\n").splitlines()
    have = source.splitlines()
    return any(textwrap.dedent("\n".join(have[i:i + len(want)])).splitlines() == want
               for i in range(len(have) - len(want) + 1))


@pytest.mark.parametrize("block", [b for b in BLOCKS if b[2] == "excerpt"], ids=case_id)
def test_excerpt_is_taken_from_its_file(block):
    page, line, _, source, code = block
    path = ROOT / source
    assert path.is_file(), f"{case_id(block)} names {source}, which does not exist"
    assert is_run_of_lines(code, path.read_text(encoding="utf-8")), \
        f"{case_id(block)} is no longer a run of lines of {source}:\n{code}"


def test_the_excerpt_rule():
    source = "def f():\n    a = 1\n\n    return a\n"
    assert is_run_of_lines("a = 1\n\nreturn a\n", source)
    assert is_run_of_lines("def f():\n    a = 1\n", source)
    assert not is_run_of_lines("a = 1\nreturn a\n", source)  # a line left out
    assert not is_run_of_lines("a = 2\n", source)
