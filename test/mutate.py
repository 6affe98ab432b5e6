#!/usr/bin/python3
"""make mutate: does the test suite notice when chatroom breaks a promise?

Each mutant in test/mutants.toml is one small, deliberate bug: a flipped comparison, a
changed default or limit, a deleted statement on the message path, two steps swapped.
For each, this script

  1. copies what `make chatroom` builds from (chatroom.c, name.txt, web/index.html,
     Makefile) into a temporary directory, and replaces the mutant's snippet in its copy
     of chatroom.c (or of the page) -- the snippet must occur exactly once, so the list
     stays honest as the code changes: a snippet that is gone, or no longer unique, is
     reported as STALE and counts as a failure;
  2. builds it there with the Makefile's own `chatroom` rule (./chatroom is not touched;
     civetweb's source is shared read-only through a link to build/civetweb), warnings
     not errors (a mutant may well leave a variable unused);
  3. runs only the tests named for it, against that binary (CHATROOM=..., which the
     pytest and node suites read), stopping at the first failure;
  4. says KILLED (some test failed, as it should) or SURVIVED (every test passed: the
     suite does not guard that promise, and needs a test).

Before the mutants it builds the unmutated copy and runs every test any mutant names
(the baseline): a test that fails without a mutant kills nothing, so the run stops there.

The summary lists every mutant with its result. The exit status is 0 only if every
mutant was killed: 1 if any survived, was stale or did not build, 2 for a bad list or a
failing baseline. Logs of every test run go to build/mutate/.

  test/mutate.py                  everything (what `make mutate` runs)
  test/mutate.py ID ...           only these mutants
  test/mutate.py --list           checks the list and every snippet, builds nothing
  test/mutate.py --no-baseline    skips the baseline
  test/mutate.py --keep           keeps the temporary trees (their paths are printed)

The list (test/mutants.toml) has one [[mutant]] table each:

  id        a short name, unique
  promise   the README promise or protocol rule it breaks, in words
  file      what it changes: "chatroom.c" (the default) or "web/index.html"
  find      the exact text to replace (TOML ''' strings keep tabs and newlines as they are)
  replace   what goes there instead
  pytest    pytest node ids (test/test_x.py::test_name[param]) or "FILE -k EXPRESSION"
  node      node test files, each optionally with ::NAME-PATTERN (a regular expression
            matched against test names, node --test-name-pattern)
"""
import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIST = ROOT / "test" / "mutants.toml"
LOGS = ROOT / "build" / "mutate"
PYTHON = "/usr/bin/python3"
SOURCES = ["chatroom.c", "name.txt", "web/index.html", "Makefile"]
MUTABLE = {"chatroom.c", "web/index.html"}
KEYS = {"id", "promise", "file", "find", "replace", "pytest", "node"}
TEST_TIMEOUT = 900  # seconds for one test run; a mutant that hangs the tests is killed


class BadList(Exception):
    """test/mutants.toml is not a list this script can use."""


def load_mutants(path=LIST):
    """The mutants, checked for shape: every key known, ids unique, tests named."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    mutants = data.get("mutant", [])
    if not mutants:
        raise BadList(f"{path} has no [[mutant]] tables")
    seen = set()
    for i, m in enumerate(mutants):
        where = f"{path.name}, mutant #{i + 1} ({m.get('id', 'no id')})"
        unknown = set(m) - KEYS
        if unknown:
            raise BadList(f"{where}: unknown keys {sorted(unknown)}")
        for key in ("id", "promise", "find", "replace"):
            if not isinstance(m.get(key), str):
                raise BadList(f"{where}: '{key}' must be a string")
        if m["id"] in seen:
            raise BadList(f"{where}: the id is used twice")
        seen.add(m["id"])
        m.setdefault("file", "chatroom.c")
        if m["file"] not in MUTABLE:
            raise BadList(f"{where}: file must be one of {sorted(MUTABLE)}")
        if m["find"] == m["replace"]:
            raise BadList(f"{where}: replace is the same as find")
        m.setdefault("pytest", [])
        m.setdefault("node", [])
        if not m["pytest"] and not m["node"]:
            raise BadList(f"{where}: no tests named (pytest or node)")
    return mutants


def snippet_problem(mutant, texts):
    """None if the mutant's snippet occurs exactly once in its file, else what is wrong."""
    n = texts[mutant["file"]].count(mutant["find"])
    if n == 1:
        return None
    first = mutant["find"].strip().splitlines()[0] if mutant["find"].strip() else ""
    if n == 0:
        return f"snippet not found in {mutant['file']}: {first!r}"
    return f"snippet found {n} times in {mutant['file']} (it must be unique): {first!r}"


def make_tree(texts, mutant=None):
    """A temporary tree to build from: the sources, one of them mutated."""
    tree = Path(tempfile.mkdtemp(prefix=f"chatroom-mutant-{mutant['id'] if mutant else 'none'}-"))
    tree.chmod(0o755)  # tests that switch to an ordinary user run the binary from here
    for name in SOURCES:
        dest = tree / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        text = texts[name]
        if mutant and name == mutant["file"]:
            text = text.replace(mutant["find"], mutant["replace"], 1)
        dest.write_text(text, "utf-8")
    (tree / ".ci").symlink_to(ROOT / ".ci")
    (tree / "build").mkdir()
    (tree / "build" / "civetweb").symlink_to(ROOT / "build" / "civetweb")
    return tree


def build(tree):
    """Builds tree/chatroom with the Makefile's rule; returns (binary or None, output).
    Warnings are not errors here: a mutant that leaves a variable unused is still a bug
    to catch, not a build to refuse."""
    r = subprocess.run(["make", "-s", "-C", str(tree), "chatroom",
                        "WARNINGS=-std=c11 -Wall -Wextra"], capture_output=True, text=True)
    binary = tree / "chatroom"
    return (binary if r.returncode == 0 and binary.exists() else None), r.stdout + r.stderr


def test_runs(mutant):
    """The commands that run a mutant's tests: pytest node ids together, each -k
    selection alone, each node test file with its name patterns."""
    runs = []
    ids = [t for t in mutant["pytest"] if " -k " not in t]
    if ids:
        runs.append([PYTHON, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-rfE", *ids])
    for t in mutant["pytest"]:
        if " -k " in t:
            file, _, expr = t.partition(" -k ")
            runs.append([PYTHON, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-rfE",
                         file.strip(), "-k", expr.strip()])
    files = {}
    for t in mutant["node"]:
        file, _, pattern = t.partition("::")
        files.setdefault(file, [])
        if pattern:
            files[file].append(pattern)
    for file, patterns in files.items():
        runs.append(["node", "--test", "--test-reporter=tap",
                     *[f"--test-name-pattern={p}" for p in patterns], file])
    return runs


def run_tests(binary, runs, log):
    """Runs the commands one after another until one fails. Returns (passed, what failed:
    the failing tests as the runner named them, or 'timeout')."""
    env = dict(os.environ, CHATROOM=str(binary))
    env.pop("PROTOCOL_SERVER", None)
    with open(log, "w") as out:
        for argv in runs:
            out.write(f"$ CHATROOM={binary} {' '.join(argv)}\n")
            out.flush()
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)
            try:
                text, _ = proc.communicate(timeout=TEST_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                text, _ = proc.communicate()
                out.write(text + f"\n(timed out after {TEST_TIMEOUT} s)\n")
                return False, "timeout"
            out.write(text + "\n")
            if proc.returncode != 0:
                return False, failures(text) or f"exit {proc.returncode}"
    return True, ""


def failures(text):
    """The failing tests' names from pytest's -rfE summary or node's TAP output."""
    names = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
    names += [n for n in re.findall(r"^\s*not ok \d+ - (.+)$", text, re.M)
              if not n.startswith("/") and not n.endswith(".mjs")]
    return ", ".join(dict.fromkeys(names))[:300]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ids", nargs="*", help="only these mutants")
    ap.add_argument("--list", action="store_true", help="check the list and snippets; build nothing")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    ap.add_argument("--keep", action="store_true", help="keep the temporary trees")
    args = ap.parse_args()

    try:
        mutants = load_mutants()
    except (BadList, tomllib.TOMLDecodeError) as e:
        print(f"mutate: {e}")
        return 2
    if args.ids:
        unknown = set(args.ids) - {m["id"] for m in mutants}
        if unknown:
            print(f"mutate: no such mutants: {', '.join(sorted(unknown))}")
            return 2
        mutants = [m for m in mutants if m["id"] in args.ids]

    # One snapshot of the sources for the whole run: chatroom.c may change meanwhile.
    texts = {name: (ROOT / name).read_text("utf-8") for name in SOURCES}
    stale = {m["id"]: p for m in mutants if (p := snippet_problem(m, texts))}
    for mid, problem in stale.items():
        print(f"STALE    {mid}: {problem}")
    if args.list:
        for m in mutants:
            if m["id"] not in stale:
                print(f"ok       {m['id']}: {m['promise']}")
        print(f"{len(mutants)} mutants, {len(stale)} stale")
        return 1 if stale else 0

    LOGS.mkdir(parents=True, exist_ok=True)
    trees = []
    started = time.monotonic()
    try:
        if not args.no_baseline:
            union = {"id": "baseline", "pytest": [], "node": []}
            for m in mutants:
                union["pytest"] += [t for t in m["pytest"] if t not in union["pytest"]]
                union["node"] += [t for t in m["node"] if t not in union["node"]]
            tree = make_tree(texts)
            trees.append(tree)
            binary, out = build(tree)
            if not binary:
                print(f"mutate: the unmutated sources do not build:\n{out}")
                return 2
            print(f"baseline: {len(union['pytest'])} pytest selections and "
                  f"{len(union['node'])} node ones, against the unmutated build ...", flush=True)
            ok, what = run_tests(binary, test_runs(union), LOGS / "baseline.log")
            if not ok:
                print(f"mutate: the baseline fails ({what}); see {LOGS / 'baseline.log'}. "
                      "A test that fails without a mutant shows nothing about one.")
                return 2
            print(f"baseline: passed ({time.monotonic() - started:.0f} s)", flush=True)

        results = []
        for i, m in enumerate(mutants, 1):
            if m["id"] in stale:
                results.append((m, "STALE", stale[m["id"]]))
                continue
            t0 = time.monotonic()
            tree = make_tree(texts, m)
            trees.append(tree)
            binary, out = build(tree)
            if not binary:
                (LOGS / f"{m['id']}.log").write_text(out)
                results.append((m, "NO BUILD", out.strip().splitlines()[-1] if out.strip() else ""))
            else:
                ok, what = run_tests(binary, test_runs(m), LOGS / f"{m['id']}.log")
                results.append((m, "SURVIVED" if ok else "KILLED", what))
            m_, verdict, what = results[-1]
            print(f"[{i}/{len(mutants)}] {verdict:8} {m['id']} ({time.monotonic() - t0:.0f} s)"
                  + (f": {what}" if what else ""), flush=True)
            if not args.keep:
                shutil.rmtree(tree, ignore_errors=True)
                trees.remove(tree)
    finally:
        if args.keep:
            for tree in trees:
                print(f"kept {tree}")
        else:
            for tree in trees:
                shutil.rmtree(tree, ignore_errors=True)

    print()
    width = max([len(m["id"]) for m, _, _ in results] + [6]) + 2
    print(f"{'result':9}{'mutant':{width}}promise")
    for m, verdict, _ in results:
        print(f"{verdict:9}{m['id']:{width}}{m['promise']}")
    counts = {v: sum(1 for _, r, _ in results if r == v)
              for v in ("KILLED", "SURVIVED", "STALE", "NO BUILD")}
    print(f"\n{len(results)} mutants: " + ", ".join(f"{n} {v.lower()}" for v, n in counts.items() if n)
          + f" ({time.monotonic() - started:.0f} s; logs in {LOGS.relative_to(ROOT)}/)")
    return 0 if counts["KILLED"] == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
