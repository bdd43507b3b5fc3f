"""Mutation check of ddpm.py: does test_math.py fail when a formula is changed a little? Standard library only.

    python -m tools.mutation                # run every mutant (from the repository root), then print the score
    python -m tools.mutation --list         # print the numbered mutants without running anything
    python -m tools.mutation --only 12,40   # run just these mutants, e.g. to reproduce a survivor

Each mutant is one small change to ddpm.py: + <-> -, * <-> /, // -> /, & <-> |, a power dropped, a comparison
loosened or flipped (< <-> <=, > <-> >=, == <-> !=, is <-> is not, in <-> not in), and <-> or, a unary minus or
`not` dropped, an `if` negated, a numeric constant c -> c + 1, True <-> False, a sqrt, clamp or round dropped,
an index i -> i + 1 and i - 1, a range(n) -> range(n - 1) and range(n + 1). Docstrings, error messages and other
strings are never changed. The real ddpm.py is never touched: each mutant is written, with copies of
test_math.py and conftest.py, into its own temporary folder, where the equivalent of `python -m pytest -x -q
-p no:cacheprovider test_math.py` runs (pytest.main in a child forked from this process, which has imported
torch once), with a fixed hypothesis seed and the default profile (40 examples), shrinking off (a failure is a
failure; shrinking only makes it smaller). Tests that use the mutated function run first. Two mutants run at
a time (--jobs), one thread each.

A mutant is killed when a test fails, when the test file cannot even be collected against it, or when it runs
past --timeout (a hang: reported as such). A survivor is printed with the reason it is equivalent when it is
one of EQUIVALENT below, and as UNEXPLAINED otherwise. The last line is `score: K/N killed (P%)`.
"""
import argparse
import ast
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET, TESTS, CONFTEST = "ddpm.py", "test_math.py", "conftest.py"

# Survivors that no test can kill, each with the reason no observable behaviour changes. Keyed by
# "function: before -> after" as printed, so the list survives edits elsewhere in ddpm.py.
EQUIVALENT = {}

# Loaded with -p after conftest.py: the same profile, without the shrink and explain phases.
NO_SHRINK_PLUGIN = '''from hypothesis import Phase, settings


def pytest_sessionstart(session):
    phases = [Phase.explicit, Phase.reuse, Phase.generate]
    settings.register_profile("mutation", parent=settings.default, phases=phases)
    settings.load_profile("mutation")
'''

BINARY_SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
                ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd}
COMPARE_SWAPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
                 ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
DROPPED_CALLS = {"sqrt", "clamp", "round"}


@dataclass(frozen=True)
class Mutant:
    """One change: replace the source bytes [start, end) of ddpm.py by `after`."""

    number: int
    line: int
    function: str
    start: int
    end: int
    before: str
    after: str

    @property
    def signature(self):
        """Return "function: before -> after", the key of EQUIVALENT."""
        return f"{self.function}: {self.before} -> {self.after}"


def protected_nodes(tree):
    """Return the ids of the nodes never mutated: docstrings, f-strings (messages) and whole raise statements."""
    protected = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            protected.update(id(child) for child in ast.walk(body[0]))
        if isinstance(node, (ast.Raise, ast.JoinedStr)):
            protected.update(id(child) for child in ast.walk(node))
    return protected


def enclosing_functions(tree):
    """Return {id(node): name of the outermost function or class around it, or "<module>"}."""
    names = {}
    for top in tree.body:
        name = top.name if isinstance(top, (ast.FunctionDef, ast.ClassDef)) else "<module>"
        if isinstance(top, ast.ClassDef):
            for member in top.body:
                member_name = f"{top.name}.{member.name}" if isinstance(member, ast.FunctionDef) else top.name
                names.update((id(node), member_name) for node in ast.walk(member))
            names.update((id(node), top.name) for node in top.decorator_list for node in ast.walk(node))
        else:
            names.update((id(node), name) for node in ast.walk(top))
    return names


def replacements(node):
    """Yield (node whose source is replaced, replacement expression) for every mutation of this node."""
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY_SWAPS:
        yield node, ast.BinOp(node.left, BINARY_SWAPS[type(node.op)](), node.right)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        yield node, node.left
    if isinstance(node, ast.Compare):
        for index, op in enumerate(node.ops):
            if type(op) in COMPARE_SWAPS:
                ops = list(node.ops)
                ops[index] = COMPARE_SWAPS[type(op)]()
                yield node, ast.Compare(node.left, ops, node.comparators)
    if isinstance(node, ast.BoolOp):
        yield node, ast.BoolOp(ast.Or() if isinstance(node.op, ast.And) else ast.And(), node.values)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
        yield node, node.operand
    if isinstance(node, (ast.If, ast.IfExp)) and not isinstance(node.test, (ast.Compare, ast.BoolOp, ast.UnaryOp)):
        yield node.test, ast.UnaryOp(ast.Not(), node.test)
    if isinstance(node, ast.Constant) and isinstance(node.value, bool):
        yield node, ast.Constant(not node.value)
    elif isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        yield node, ast.Constant(node.value + 1)
    if isinstance(node, ast.Call):
        yield from call_replacements(node)
    # An index into a table shifts; a key into a module-level mapping (an UPPER_CASE name) is not an index.
    is_mapping = isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id.isupper()
    is_index = isinstance(node, ast.Subscript) and not isinstance(node.slice, (ast.Slice, ast.Constant, ast.Tuple))
    if is_index and not is_mapping:
        for op in (ast.Add, ast.Sub):
            yield node.slice, ast.BinOp(node.slice, op(), ast.Constant(1))


def call_replacements(node):
    """Yield the mutations of a call: a dropped sqrt/clamp/round, a range(n) shifted by one."""
    function = node.func
    name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
    if name in DROPPED_CALLS:
        is_method = isinstance(function, ast.Attribute) and not (
            isinstance(function.value, ast.Name) and function.value.id in ("torch", "math"))
        if is_method:
            yield node, function.value
        elif node.args:
            yield node, node.args[0]
    if name == "range" and len(node.args) == 1:
        for op in (ast.Sub, ast.Add):
            yield node.args[0], ast.BinOp(node.args[0], op(), ast.Constant(1))


def byte_offset(line_starts, lineno, col_offset):
    """Return the offset in the file's bytes of (lineno, col_offset), ast's 1-based line and byte column."""
    return line_starts[lineno - 1] + col_offset


def find_mutants(source):
    """Return the list of Mutants of source (a str), numbered from 1 in the order of the file, without duplicates."""
    tree = ast.parse(source)
    data = source.encode()
    line_starts = [0]
    for line in data.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))
    protected, functions = protected_nodes(tree), enclosing_functions(tree)
    found, seen = [], set()
    for node in ast.walk(tree):
        if id(node) in protected:
            continue
        for target, replacement in replacements(node):
            start = byte_offset(line_starts, target.lineno, target.col_offset)
            end = byte_offset(line_starts, target.end_lineno, target.end_col_offset)
            before = " ".join(data[start:end].decode().split())
            after = ast.unparse(replacement)
            if ast.unparse(target) == after or (start, end, after) in seen:
                continue
            seen.add((start, end, after))
            found.append((start, target.lineno, functions.get(id(node), "<module>"), end, before, after))
    found.sort()
    return [Mutant(number, line, function, start, end, before, after)
            for number, (start, line, function, end, before, after) in enumerate(found, 1)]


def mutated_source(source, mutant):
    """Return source with the mutant applied; the replacement is parenthesised, so precedence cannot change."""
    data = source.encode()
    return (data[: mutant.start] + f"({mutant.after})".encode() + data[mutant.end:]).decode()


def test_order(tests_source, function):
    """Return the test names of test_math.py in file order, except that those naming ddpm.<function> come first and
    those that reach it through a helper of test_math.py next: a mutant is usually killed by one of them."""
    tree = ast.parse(tests_source)
    definitions = {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    uses = {}
    for name, node in definitions.items():
        uses[name] = {child.attr for child in ast.walk(node) if isinstance(child, ast.Attribute)
                      and isinstance(child.value, ast.Name) and child.value.id == "ddpm"}
        uses[name] |= {child.id for child in ast.walk(node) if isinstance(child, ast.Name) and child.id in definitions}
    changed = True
    while changed:
        changed = False
        for name in uses:
            expanded = set().union(uses[name], *(uses[other] for other in uses[name] if other in uses))
            changed |= expanded != uses[name]
            uses[name] = expanded
    direct = {name: {child.attr for child in ast.walk(node) if isinstance(child, ast.Attribute)}
              for name, node in definitions.items()}
    tests = [name for name in definitions if name.startswith("test_")]
    wanted = function.split(".")[0]
    return sorted(tests, key=lambda name: (wanted not in direct[name], wanted not in uses[name]))


def pytest_arguments(tests):
    """Return the arguments of `python -m pytest -x -q -p no:cacheprovider test_math.py`, tests in the given order.

    A fixed hypothesis seed makes a run reproducible; --assert=plain skips pytest's assertion rewriting, which
    changes only the failure messages (nobody reads them here) and costs seconds per run."""
    return ["-x", "-q", "-p", "no:cacheprovider", "-p", "mutation_no_shrink", "--hypothesis-seed=0", "--assert=plain",
            "-W", "ignore", *(f"{TESTS}::{name}" for name in tests)]


def prepare(source, tests_source, conftest_source, mutant):
    """Return (a new temporary folder holding the mutated ddpm.py, test_math.py and conftest.py, the test order)."""
    folder = Path(tempfile.mkdtemp(prefix="ddpm-mutant-"))
    (folder / TARGET).write_text(source if mutant is None else mutated_source(source, mutant))
    (folder / TESTS).write_text(tests_source)
    (folder / CONFTEST).write_text(conftest_source)
    (folder / "mutation_no_shrink.py").write_text(NO_SHRINK_PLUGIN)
    return folder, test_order(tests_source, "" if mutant is None else mutant.function)


def start_pytest(folder, tests):
    """Fork a child that runs pytest in folder, its output in folder/output.txt; return the child's pid.

    The parent has imported torch, pytest and hypothesis once (and nothing from the folder), so a child skips
    the seconds of start-up a fresh `python -m pytest` spends; it runs in a new session, so a hang is killed whole.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 70
    try:
        os.setsid()
        output = os.open(folder / "output.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(output, 1)
        os.dup2(output, 2)
        os.chdir(folder)
        sys.path.insert(0, str(folder))
        import pytest

        code = int(pytest.main(pytest_arguments(tests)))
    except BaseException:  # the child must never return into the parent's loop
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def verdict_of(code, folder, timeout):
    """Return the verdict of a finished run from its exit code (None: killed after the timeout) and its output."""
    if code is None:
        return f"killed (timeout after {timeout:.0f} s: it hangs)"
    if code == 0:
        return "survived"
    output = (folder / "output.txt").read_text(errors="replace")
    failed = [line.split()[1].split("::")[-1] for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))]
    if code == 1 and failed:
        return f"killed by {failed[0]}"
    last = output.strip().splitlines()[-1] if output.strip() else "no output"
    return f"killed (pytest exit code {code}: {last})"


def run_all(mutants, source, tests_source, conftest_source, jobs, timeout, report):
    """Run each mutant (None: the unmutated file) in its own folder, `jobs` at a time; call report(mutant, verdict,
    seconds) as each finishes."""
    pending, running = list(mutants), {}
    while pending or running:
        while pending and len(running) < jobs:
            mutant = pending.pop(0)
            folder, tests = prepare(source, tests_source, conftest_source, mutant)
            running[start_pytest(folder, tests)] = (mutant, folder, time.monotonic())
        time.sleep(0.05)
        for pid, (mutant, folder, started) in list(running.items()):
            finished, status = os.waitpid(pid, os.WNOHANG)
            if finished:
                code = os.waitstatus_to_exitcode(status)
            elif time.monotonic() - started > timeout:
                os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                code = None
            else:
                continue
            del running[pid]
            verdict = verdict_of(code, folder, timeout)
            shutil.rmtree(folder, ignore_errors=True)
            report(mutant, verdict, time.monotonic() - started)


def parse_args(argv):
    """Return the parsed command line."""
    parser = argparse.ArgumentParser(description="Mutation check of ddpm.py against test_math.py.")
    parser.add_argument("--list", action="store_true", help="print the numbered mutants and exit")
    parser.add_argument("--only", help="comma-separated mutant numbers to run (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="mutants run at once, one core each (default 2)")
    parser.add_argument("--timeout", type=float,
                        help="seconds per mutant before it counts as a hang (default: 10 x the unmutated run, >= 120)")
    return parser.parse_args(argv)


def main(argv=None):
    """Run the mutation check and print one line per mutant, the survivors, and the score last."""
    args = parse_args(argv)
    source = (ROOT / TARGET).read_text()
    tests_source, conftest_source = (ROOT / TESTS).read_text(), (ROOT / CONFTEST).read_text()
    mutants = find_mutants(source)
    if args.list:
        for mutant in mutants:
            print(f"#{mutant.number:<4} line {mutant.line:<4} {mutant.signature}")
        print(f"{len(mutants)} mutants")
        return 0
    if args.only:
        wanted = {int(number) for number in args.only.split(",")}
        mutants = [mutant for mutant in mutants if mutant.number in wanted]
    # Before torch is imported: one thread per run, `jobs` runs on `jobs` cores.
    os.environ.update(OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    import hypothesis  # noqa: F401  (imported once here, inherited by every forked run)
    import pytest  # noqa: F401
    import torch  # noqa: F401

    started = time.monotonic()
    unmutated = []
    run_all([None], source, tests_source, conftest_source, 1, 600, lambda *result: unmutated.append(result))
    _, verdict, baseline = unmutated[0]
    if verdict != "survived":
        print(f"the unmutated ddpm.py does not pass {TESTS}: {verdict}")
        return 1
    timeout = args.timeout or max(120.0, 10 * baseline)
    print(f"unmutated: {TESTS} passes in {baseline:.1f} s; {len(mutants)} mutants, {args.jobs} at a time, "
          f"timeout {timeout:.0f} s")
    results = []

    def report(mutant, verdict, seconds):
        results.append((mutant, verdict))
        print(f"[{len(results)}/{len(mutants)}] #{mutant.number} line {mutant.line} {mutant.signature}: {verdict} "
              f"({seconds:.1f} s)", flush=True)

    run_all(mutants, source, tests_source, conftest_source, args.jobs, timeout, report)
    survivors = sorted((mutant for mutant, verdict in results if verdict == "survived"), key=lambda m: m.number)
    print(f"\n{len(survivors)} survivors:")
    for mutant in survivors:
        reason = EQUIVALENT.get(mutant.signature)
        explanation = f"equivalent: {reason}" if reason else "UNEXPLAINED: kill it with a test, or explain it here"
        print(f"#{mutant.number} line {mutant.line} {mutant.signature}\n    {explanation}")
    killed = len(results) - len(survivors)
    print(f"run time {time.monotonic() - started:.0f} s")
    print(f"score: {killed}/{len(results)} killed ({100 * killed / max(len(results), 1):.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
