#!/usr/bin/python3
"""Sums up ThreadSanitizer's reports and says whether chatroom.c is in any of them.

    /usr/bin/python3 test/tsan_check.py [--strict] build/tsan

`make tsan` runs build/chatroom-tsan (and build/protocol-server-tsan) with
TSAN_OPTIONS=log_path=build/tsan/report, so that every process writes its reports to
build/tsan/report.PID, and suppressions=test/tsan.supp, so that the races inside civetweb
that were looked at and judged benign (each with its reason there) are not reported.

Each report is read, and reports that are the same race (same kind, same innermost frames
of the conflicting accesses) are counted once. A report involves chatroom.c when a frame
of one of its access stacks (the stacks of the racing reads and writes, of the locks of a
lock-order inversion, of a use after free...: not the stacks where a thread was created
or a block allocated, which name chatroom.c for nearly everything) is in chatroom.c.

Exit status 1 if any report involves chatroom.c (with --strict: if there is any report
at all), 0 otherwise; the others are listed as warnings. The summary goes to stdout and to
DIR/summary.txt.
"""
import argparse
import re
import sys
from collections import OrderedDict
from pathlib import Path

HEAD = re.compile(r"^WARNING: ThreadSanitizer: (.*?)(?: \(pid=\d+\))?$")
FRAME = re.compile(r"^\s+#(\d+) (\S+) (\S+?)(?::(\d+))?(?::\d+)? \(")


def reports(path):
    text = path.read_text(errors="replace")
    for block in re.split(r"^==================\s*$", text, flags=re.M):
        lines = block.strip("\n").splitlines()
        if not lines:
            continue
        m = HEAD.match(lines[0].strip())
        if m:
            yield m.group(1), lines


def parse(lines):
    """(stacks): a list of (header, [(func, file, line)], is_access_stack)."""
    stacks, cur = [], None
    for line in lines[1:]:
        f = FRAME.match(line)
        if f:
            if cur is None:
                cur = ("(stack)", [], True)
                stacks.append(cur)
            cur[1].append((f.group(2), f.group(3), f.group(4)))
            continue
        if line.strip() and not line.startswith(" " * 4):
            header = line.strip()
            is_context = bool(re.match(r"(Thread T\d+ .*created by|Thread T\d+ .*\(running\) created|"
                                       r"Location is|Mutex M\d+ .*created at|SUMMARY:)", header))
            cur = (header, [], not is_context)
            stacks.append(cur)
    return [s for s in stacks if s[1]]


def short(frame):
    func, file, line = frame
    return f"{func} {Path(file).name}:{line}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--strict", action="store_true", help="fail on any report, not only chatroom.c's")
    args = ap.parse_args()
    files = sorted(Path(args.dir).glob("report*"))
    groups = OrderedDict()
    total = 0
    for path in files:
        for kind, lines in reports(path):
            total += 1
            stacks = parse(lines)
            access = [s for s in stacks if s[2]]
            tops = sorted({short(s[1][0]) for s in access[:2]})
            key = (kind, tuple(tops))
            ours = any(Path(fr[1]).name == "chatroom.c" for s in access for fr in s[1])
            top_ours = any(Path(s[1][0][1]).name == "chatroom.c" for s in access[:2])
            g = groups.setdefault(key, {"count": 0, "ours": ours, "top_ours": top_ours,
                                        "example": "\n".join(lines), "file": path.name,
                                        "stacks": access})
            g["count"] += 1
    out = [f"ThreadSanitizer: {total} reports in {len(files)} files of {args.dir}, "
           f"{len(groups)} distinct"]
    bad = 0
    for (kind, tops), g in groups.items():
        verdict = "CHATROOM.C" if g["ours"] else "civetweb only"
        if g["ours"] or args.strict:
            bad += 1
        out.append("")
        out.append(f"[{verdict}] {kind} x{g['count']}: {' / '.join(tops)}"
                   f"{'  (innermost frame in chatroom.c)' if g['top_ours'] else ''}")
        for header, frames, _ in g["stacks"][:4]:
            out.append(f"    {header}")
            for fr in frames[:6]:
                out.append(f"        {short(fr)}")
        out.append(f"    (first seen in {g['file']})")
    if not groups:
        out.append("no reports")
    text = "\n".join(out) + "\n"
    print(text)
    if Path(args.dir).is_dir():
        (Path(args.dir) / "summary.txt").write_text(
            text + "\n\n==== one full report of each ====\n\n" +
            "\n\n".join(g["example"] for g in groups.values()) + "\n")
    if bad:
        print(f"tsan: FAIL: {bad} distinct report(s) {'in all' if args.strict else 'involve chatroom.c'}")
        sys.exit(1)
    print("tsan: PASS: no report involves chatroom.c" + (" (civetweb-only reports above)" if groups else ""))


if __name__ == "__main__":
    main()
