#!/usr/bin/python3
"""Draws the samples of test/soak.py runs as one SVG, by hand (no plotting library).

    /usr/bin/python3 test/plot_soak.py [-o test/artifacts/soak.svg] [NAME=CSV ...]

Default input: build/soak-asan.csv and build/soak-normal.csv (what `make soak` writes).
One panel per metric (RSS, threads, open fds, queued bytes, memory bytes), one line per
build, time in minutes across. The dashed vertical line in each build's colour is the end
of its warm-up (20% of its run, at least a minute: the samples the trend rule ignores); the two short
flat bars are the means of the first and last thirds of the post-warm-up samples (A and
B in soak.py's rule), and the verdict soak.py wrote (build/soak-NAME.json) is in the
legend.
"""
import argparse
import csv
import json
import math
from html import escape
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 0.20
PANELS = [  # (column, title, scale, unit)
    ("rss_kib", "resident memory (VmRSS)", 1 / 1024, "MiB"),
    ("threads", "threads", 1, ""),
    ("fds", "open file descriptors", 1, ""),
    ("queued_bytes", "bytes queued to clients (chatroom_queued_bytes)", 1 / 1024, "KiB"),
    ("memory_bytes", "bytes clients make it hold (chatroom_memory_bytes)", 1 / 1024, "KiB"),
]
COLOURS = ["#c0392b", "#2471a3", "#1e8449", "#7d3c98"]
W, PANEL_H, LEFT, RIGHT, GAP = 900, 170, 80, 30, 50


def nice_step(span, ticks=5):
    if span <= 0:
        return 1
    raw = span / ticks
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def fmt(v):
    if abs(v) >= 100 or v == int(v):
        return f"{v:,.0f}"
    return f"{v:.2f}".rstrip("0")


def load(path):
    with open(path) as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="*", help="NAME=CSV (default: asan and normal from build/)")
    ap.add_argument("-o", "--output", default=str(ROOT / "test/artifacts/soak.svg"))
    args = ap.parse_args()
    specs = args.runs or [f"{n}={ROOT / 'build' / f'soak-{n}.csv'}" for n in ("asan", "normal")]
    runs = []
    for spec in specs:
        name, _, path = spec.partition("=")
        if not Path(path).exists():
            print(f"plot_soak: no {path}, skipped")
            continue
        rows = load(path)
        if not rows:
            continue
        summary = {}
        js = Path(path).with_suffix(".json")
        if js.exists():
            summary = json.loads(js.read_text())
        runs.append((name, rows, summary))
    if not runs:
        raise SystemExit("plot_soak: nothing to draw")

    t_max = max(r[-1]["t"] for _, r, _ in runs) / 60 or 1
    plot_w = W - LEFT - RIGHT
    TOP = 90 + 16 * len(runs)
    height = TOP + len(PANELS) * (PANEL_H + GAP) + 20
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" '
           f'viewBox="0 0 {W} {height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{W}" height="{height}" fill="white"/>']
    out.append(f'<text x="{LEFT}" y="22" font-size="14" font-weight="bold">chatroom soak test '
               f'(test/soak.py): server resources under churn, slow readers and garbage</text>')
    # legend: one line per run
    for i, (name, rows, s) in enumerate(runs):
        c = COLOURS[i % len(COLOURS)]
        y = 44 + 16 * i
        line = f"{name}: {rows[-1]['t'] / 60:.1f} min, {len(rows)} samples"
        if s:
            line += (f"; {'PASS' if not s.get('failures') else 'FAIL'}; {s.get('checked', 0):,} steady "
                     f"messages checked at live clients, {s.get('lost', 0)} lost, "
                     f"{s.get('reordered', 0)} reordered")
        out.append(f'<line x1="{LEFT}" y1="{y - 4}" x2="{LEFT + 24}" y2="{y - 4}" stroke="{c}" stroke-width="2"/>')
        out.append(f'<text x="{LEFT + 30}" y="{y}">{escape(line)}</text>')
    out.append(f'<text x="{LEFT}" y="{48 + 16 * len(runs)}" fill="#555">dashed: end of warm-up (20% of the run, at least 1 min); '
               f'bars: means of the first and last thirds after warm-up (the trend rule of soak.py)</text>')

    for p, (col, label, scale, unit) in enumerate(PANELS):
        y0 = TOP + p * (PANEL_H + GAP)
        values = [r[col] * scale for _, rows, _ in runs for r in rows]
        lo, hi = min(values), max(values)
        lo = 0 if lo >= 0 else lo
        if hi <= lo:
            hi = lo + 1
        step = nice_step(hi - lo)
        hi = math.ceil(hi / step) * step

        def sx(t):
            return LEFT + plot_w * (t / 60) / t_max

        def sy(v):
            return y0 + PANEL_H - PANEL_H * (v - lo) / (hi - lo)

        verdicts = []
        for name, rows, s in runs:
            v = (s.get("trend") or {}).get(col)
            if v:
                verdicts.append(f"{name}: {v[0]}")
        head = label + (f" ({unit})" if unit else "") + ("   [" + "; ".join(verdicts) + "]" if verdicts else "")
        out.append(f'<text x="{LEFT}" y="{y0 - 8}" font-weight="bold">{escape(head)}</text>')
        out.append(f'<rect x="{LEFT}" y="{y0}" width="{plot_w}" height="{PANEL_H}" fill="none" stroke="#999"/>')
        v = lo
        while v <= hi + 1e-9:
            y = sy(v)
            out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + plot_w}" y2="{y:.1f}" stroke="#eee"/>')
            out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{fmt(v)}</text>')
            v += step
        tstep = nice_step(t_max, 8)
        t = 0.0
        while t <= t_max + 1e-9:
            x = sx(t * 60)
            out.append(f'<line x1="{x:.1f}" y1="{y0 + PANEL_H}" x2="{x:.1f}" y2="{y0 + PANEL_H + 4}" stroke="#999"/>')
            out.append(f'<text x="{x:.1f}" y="{y0 + PANEL_H + 16}" text-anchor="middle">{fmt(t)}</text>')
            t += tstep
        if p == len(PANELS) - 1:
            out.append(f'<text x="{LEFT + plot_w / 2}" y="{y0 + PANEL_H + 32}" text-anchor="middle">minutes</text>')
        for i, (name, rows, s) in enumerate(runs):
            c = COLOURS[i % len(COLOURS)]
            pts = " ".join(f"{sx(r['t']):.1f},{sy(r[col] * scale):.1f}" for r in rows)
            out.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="1.3"/>')
            end = rows[-1]["t"]
            warm = s.get("warmup_s") or min(max(end * WARMUP, 60.0), end * 0.5)
            wx = sx(warm)
            out.append(f'<line x1="{wx:.1f}" y1="{y0}" x2="{wx:.1f}" y2="{y0 + PANEL_H}" stroke="{c}" '
                       f'stroke-dasharray="4,3" stroke-opacity="0.6"/>')
            post = [r for r in rows if r["t"] >= warm]
            third = len(post) // 3
            if third:
                for part in (post[:third], post[-third:]):
                    m = sum(r[col] for r in part) / len(part) * scale
                    out.append(f'<line x1="{sx(part[0]["t"]):.1f}" y1="{sy(m):.1f}" x2="{sx(part[-1]["t"]):.1f}" '
                               f'y2="{sy(m):.1f}" stroke="{c}" stroke-width="4" stroke-opacity="0.35"/>')
    out.append("</svg>")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(out) + "\n")
    print(f"plot_soak: wrote {args.output}")


if __name__ == "__main__":
    main()
