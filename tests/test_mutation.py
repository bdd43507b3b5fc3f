"""tools/mutation.py: the mutants it makes of ddpm.py, and the score the README and docs/specification.md state.

Running the mutants takes minutes (python -m tools.mutation), so the suite checks what can be checked in
milliseconds: that each mutant is one small, well-formed change outside the strings, and that the count the
README states is the count of today's ddpm.py. Most edits of ddpm.py change that count, so an edit that is not
followed by a new mutation run fails here until the documents give the new score.
"""
import ast
import re

from repo_paths import readme_on_one_line
from tools import mutation

DDPM_SOURCE = (mutation.ROOT / mutation.TARGET).read_text()


def string_spans(source):
    """Return the (start, end) byte offsets of every string constant in source: docstrings, messages, keys."""
    data, starts = source.encode(), [0]
    for line in data.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    return [(starts[node.lineno - 1] + node.col_offset, starts[node.end_lineno - 1] + node.end_col_offset)
            for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.Constant, ast.JoinedStr)) and isinstance(getattr(node, "value", ""), str)]


def test_each_mutant_replaces_its_span_by_its_parenthesised_replacement_and_still_parses():
    """mutated_source keeps every byte outside [start, end), puts `(after)` there, and yields valid Python."""
    mutants = mutation.find_mutants(DDPM_SOURCE)
    assert len(mutants) > 100
    data = DDPM_SOURCE.encode()
    for mutant in mutants:
        mutated = mutation.mutated_source(DDPM_SOURCE, mutant).encode()
        tail = len(mutated) - (len(data) - mutant.end)  # where the bytes after the span start in the mutant
        assert mutated[:mutant.start] == data[:mutant.start] and mutated[tail:] == data[mutant.end:], mutant
        assert mutated[mutant.start:tail] == f"({mutant.after})".encode()
        assert mutated != data, mutant
        ast.parse(mutated)


def test_mutants_are_numbered_in_file_order_without_duplicates_and_never_touch_a_string():
    """Numbers run 1..N by position; no (span, replacement) twice; no mutant overlaps a string constant."""
    mutants = mutation.find_mutants(DDPM_SOURCE)
    assert [mutant.number for mutant in mutants] == list(range(1, len(mutants) + 1))
    assert [mutant.start for mutant in mutants] == sorted(mutant.start for mutant in mutants)
    assert len({(mutant.start, mutant.end, mutant.after) for mutant in mutants}) == len(mutants)
    strings = string_spans(DDPM_SOURCE)
    for mutant in mutants:
        inside = [span for span in strings if span[0] <= mutant.start and mutant.end <= span[1]]
        assert not inside, mutant


def test_small_source_gets_exactly_the_documented_kinds_of_mutants():
    """A two-line function gets + -> -, * -> /, the constant 2 -> 3, a dropped sqrt, t -> t + 1 and t - 1 as an
    index, and nothing in its docstring or its raise."""
    source = ('def f(x, t):\n    """Return sqrt(x[t]) * 2 + 1."""\n    if t < 0:\n        raise ValueError("t < 0")\n'
              '    return x[t].sqrt() * 2 + 1\n')
    found = {(mutant.before, mutant.after) for mutant in mutation.find_mutants(source)}
    assert found == {("x[t].sqrt() * 2 + 1", "x[t].sqrt() * 2 - 1"), ("x[t].sqrt() * 2", "x[t].sqrt() / 2"),
                     ("2", "3"), ("1", "2"), ("x[t].sqrt()", "x[t]"), ("t", "t + 1"), ("t", "t - 1"),
                     ("t < 0", "t <= 0"), ("0", "1")}


def test_readme_and_specification_state_the_mutant_count_of_todays_ddpm():
    """The README's "breaks ddpm.py in N small ways ... K/N caught" and the specification's "score: K/N killed" use
    N = the number of mutants of today's ddpm.py (re-run `python -m tools.mutation` and update both when not)."""
    count = len(mutation.find_mutants(DDPM_SOURCE))
    readme = readme_on_one_line()
    specification = (mutation.ROOT / "docs" / "specification.md").read_text()
    ways = re.search(r"breaks `ddpm.py` in (\d+) small ways", readme)
    caught = re.search(r"(\d+)/(\d+) caught", readme)
    score = re.search(r"score: (\d+)/(\d+) killed", specification)
    assert ways and caught and score
    assert int(ways.group(1)) == count and int(caught.group(2)) == count and int(score.group(2)) == count, (
        f"ddpm.py now has {count} mutants: run python -m tools.mutation and update README.md and "
        f"docs/specification.md")
    assert caught.group(1) == score.group(1)
