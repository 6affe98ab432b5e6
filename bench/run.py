#!/usr/bin/env python3
"""chatroom's benchmark: chatroom and Node's socket.io, side by side, through the same scenarios.

Each scenario starts a fresh server on a free loopback port, points bench/loadgen at it
(the load generator reads the server's CPU time and memory from /proc), stops the server,
and does the same with the other one. At the end one table compares them.

    make bench                      # everything, about ten minutes
    python3 bench/run.py --only fanout-100x100,join-1000
    python3 bench/run.py --quick    # shorter runs, for trying things out
    python3 bench/run.py --chatroom /tmp/old/chatroom --servers chatroom   # an older build

Both servers run without chat history and without flood or inbound rate limits (Node's has
none), and with the same heartbeat (25 s / 20 s). The clients come from many loopback
addresses (50 from each), so chatroom's per-address limits stay at their defaults. The JSON
of every run goes to build/bench.json.
"""
import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOADGEN = os.path.join(ROOT, "build", "loadgen")
ATTACK = os.path.join(ROOT, "build", "attack")


class Scenario:
    def __init__(self, key, title, clients, loadgen_args, seconds=10, delta=False, compare=None,
                 chatroom_args=(), servers=("chatroom", "node"), tool=LOADGEN, defaults=False,
                 pair=False):
        self.key, self.title, self.clients = key, title, clients
        self.loadgen_args, self.seconds, self.delta = loadgen_args, seconds, delta
        self.compare = compare  # for a stall run: the scenario it is compared with
        self.chatroom_args = list(chatroom_args)
        self.servers = servers
        self.tool = tool  # bench/loadgen, or bench/attack for the attack scenarios
        # chatroom with its default flags, as someone who just runs it has them
        self.defaults = defaults or tool == ATTACK
        # two servers of a kind joined through one Redis, the clients split between them
        self.pair = pair


def fanout(clients, rate, delta, seconds=10, pad=0, stall=0, key=None, title=None, **kw):
    key = key or f"fanout-{clients}x{rate}"
    what = f"{clients} clients, {rate} msg/s" + (f", {pad} B padding" if pad else "")
    if stall:
        what += f", {stall} of them not reading"
    args = ["--scenario", "fanout", "--senders", "10", "--rate", str(rate), "--warmup", "2",
            "--pad", str(pad), "--stall", str(stall)]
    return Scenario(key, title or what, clients, args, seconds, delta, **kw)


def attack(mode, conns, addresses, seconds=30):
    """bench/attack: conns connections from addresses loopback addresses hold the server
    (mode says how) for 30 s, while a newcomer joins every half second and is timed."""
    what = {"half-head": "half a request head each",
            "silent-session": "a polling handshake each, then silence",
            "post-stall": "a POST head each, then no body"}[mode]
    return Scenario(f"attack-{mode}-{conns}", f"{conns} connections from {addresses} addresses, "
                    f"{what}; a newcomer joins", conns,
                    ["--mode", mode, "--conns", str(conns), "--addresses", str(addresses)],
                    seconds, tool=ATTACK)


# The stall pair: a 2 MB queue bound (the default for a room of 100) and 32 kB messages,
# so that the client that stops reading reaches its bound (and fills the kernel's socket
# buffers, a few MB more) within the run.
STALL = dict(clients=1000, rate=10, delta=True, pad=32000, seconds=30,
             chatroom_args=["--queue-limit", "2000000"])

SCENARIOS = [
    fanout(100, 100, delta=False),
    fanout(1000, 10, delta=True),
    fanout(100, 1000, delta=False),
    fanout(1000, 100, delta=True),
    # saturated: more than Node's one thread can deliver (500000 deliveries a second)
    fanout(100, 5000, delta=False, key="saturate-100", title="100 clients, 5000 msg/s (saturated)"),
    fanout(1000, 500, delta=True, key="saturate-1000", title="1000 clients, 500 msg/s (saturated)"),
    Scenario("join-1000", "join storm, 1000 clients with the full name_list", 1000,
             ["--scenario", "join"]),
    Scenario("hold-10000", "10000 delta clients held 60 s, answering pings (default flags)",
             10000, ["--scenario", "hold", "--ramp", "500"], seconds=60, delta=True,
             defaults=True),
    # more long-polling clients than the old model had threads (one per waiting GET)
    Scenario("polling-2000", "2000 long-polling delta clients, 10 msg/s (default flags)", 2000,
             ["--scenario", "fanout", "--transport", "polling", "--senders", "10", "--rate", "10",
              "--warmup", "2"], seconds=20, delta=True, defaults=True),
    # two servers and Redis, the clients split between them (CPU: both servers and Redis)
    fanout(200, 100, delta=True, key="pair-200x100", pair=True,
           title="2 servers + Redis, 200 clients, 100 msg/s"),
    fanout(200, 1000, delta=True, key="pair-200x1000", pair=True,
           title="2 servers + Redis, 200 clients, 1000 msg/s"),
    fanout(key="stall-base", **STALL),
    fanout(key="stall-1", stall=1, compare="stall-base", **STALL),
] + [attack(mode, conns, addresses) for conns, addresses in ((1500, 300), (5000, 1000))
     for mode in ("half-head", "silent-session", "post-stall")]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start listening")


def settle(pid, timeout=30):
    """Waits until the server has started all its threads and its memory stops growing:
    civetweb starts its workers (one per place in the room) after it starts listening."""
    def sample():
        fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
        return int(fields["Threads"]), int(fields["VmRSS"].split()[0])
    last = sample()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = sample()
        if now[0] == last[0] and abs(now[1] - last[1]) <= last[1] // 100:
            return
        last = now


CHATROOM = os.path.join(ROOT, "chatroom")  # --chatroom: another build, for before and after


def known_flags(binary):
    """The flags a build lists in its --help: an older one (a before/after run) may lack
    some, which are then left out."""
    text = subprocess.run([binary, "--help"], capture_output=True, text=True).stdout
    return {word.rstrip(",") for word in text.split() if word.startswith("--")}


def start_chatroom(port, scenario, redis=None):
    cmd = [CHATROOM, "--host", "127.0.0.1", "--port", str(port), "--quiet"]
    if redis:
        cmd += ["--redis", redis]
    if scenario.defaults:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Room just big enough, as someone running this many clients would configure it.
    extra = [("--max-clients", str(max(scenario.clients, 100))), ("--flood-limit", "0"),
             ("--inbound-rate", "0"), ("--history", "0")]
    flags = known_flags(CHATROOM)
    cmd += [x for flag, value in extra if flag in flags for x in (flag, value)]
    return subprocess.Popen(cmd + scenario.chatroom_args, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def start_node(port, scenario, redis=None):
    cmd = ["node", os.path.join(ROOT, "bench", "node-server.js"), str(port)]
    env = dict(os.environ, REDIS_URL=redis) if redis else None
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def start_redis(port):
    return subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_deployment(start, scenario):
    """The server (or, for a pair, Redis and two servers): [(port, proc)], Redis last."""
    if not scenario.pair:
        port = free_port()
        return [(port, start(port, scenario))]
    redis_port = free_port()
    redis = start_redis(redis_port)
    wait_listening(redis_port, redis)
    started = []
    for _ in range(2):
        port = free_port()
        started.append((port, start(port, scenario, f"redis://127.0.0.1:{redis_port}")))
    return started + [(redis_port, redis)]


SERVERS = [("chatroom", start_chatroom), ("node", start_node)]


def run_one(name, start, scenario, quick):
    deployment = start_deployment(start, scenario)
    port, proc = deployment[0]
    pids = []
    for p, pr in deployment:
        pids += ["--server-pid", str(pr.pid)]
    try:
        for p, pr in deployment:
            wait_listening(p, pr)
            settle(pr.pid)  # idle RSS is measured from here
        seconds = min(scenario.seconds, 5 if scenario.key.startswith("fanout") else 10) \
            if quick else scenario.seconds
        if scenario.tool == ATTACK:
            cmd = [ATTACK, "--port", str(port), "--seconds", str(seconds)] + scenario.loadgen_args
        else:
            cmd = [LOADGEN, "--port", str(port), "--clients", str(scenario.clients),
                   "--seconds", str(seconds)] + pids + scenario.loadgen_args
            if scenario.pair:
                cmd += ["--port2", str(deployment[1][0])]
        if scenario.delta:
            cmd.append("--delta")
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"loadgen failed: {out.stderr.strip()}")
        result = json.loads(out.stdout)
        result["server_alive"] = all(pr.poll() is None for _, pr in deployment)
        return result
    finally:
        for _, pr in deployment:
            pr.send_signal(signal.SIGTERM)
            try:
                pr.wait(10)
            except subprocess.TimeoutExpired:
                pr.kill()
                pr.wait()


# ---- the table ----------------------------------------------------------------------

def per_msg_us(r):
    """Server CPU per message delivered, both counted over the measured seconds."""
    n = r["received_in_window"]
    return 1e6 * r["server_cpu_s"] / n if n else None


def rows_for(scenario, r, results):
    """(metric, value, lower_is_better) rows for one server's result."""
    if "mode" in r:  # bench/attack
        n = r["newcomers"]
        return [("attackers held at the end", r["held_at_end"], None),
                ("newcomers who joined", f'{n - r["newcomers_failed"]}/{n}', None),
                ("newcomer join p50 ms", r["newcomer_p50_ms"], True),
                ("newcomer join max ms", r["newcomer_max_ms"], True),
                ("newcomers over 250 ms", r["newcomers_over_250ms"], True)]
    kind = r["scenario"]
    rows = []
    if kind == "fanout":
        got = f'{r["received"]}/{r["expected"]}'
        rows += [("delivered", got, None),
                 ("messages missing at the end", r["expected"] - r["received"], True),
                 ("delivered per second", r["received_in_window"] / r["measured_seconds"], None),
                 ("latency p50 ms", r["p50_ms"], True),
                 ("latency p99 ms", r["p99_ms"], True),
                 ("latency max ms", r["max_ms"], True),
                 ("server CPU s", r["server_cpu_s"], True),
                 ("server CPU us/msg", per_msg_us(r), True),
                 ("server RSS max MiB", r["server_rss_kib_max"] / 1024, True),
                 ("loadgen CPU %", 100 * r["loadgen_cpu_s"] / r["measured_seconds"], None)]
        if r["stalled"]:
            base = results.get(scenario.compare, {}).get(r["_server"])
            if base:
                rows.append(("p99 change vs no stall ms", r["p99_ms"] - base["p99_ms"], True))
            dropped = r["stalled_dropped_after_s"]
            rows.append(("stalled client dropped after s", dropped if dropped >= 0 else "no", None))
    elif kind == "join":
        rows += [("joined", f'{r["joined"]}/{r["clients"]}', None),
                 ("time to join all s", r["join_seconds"], True),
                 ("server CPU s", r["server_cpu_join_s"], True),
                 ("server RSS MiB", r["server_rss_kib_joined"] / 1024, True),
                 ("loadgen CPU s", r["loadgen_cpu_join_s"], None)]
    elif kind == "hold":
        per_client = (r["server_rss_kib_end"] - r["server_rss_kib_start"]) / max(r["clients"], 1)
        rows += [("joined", f'{r["joined"]}/{r["clients"]}', None),
                 ("time to join all s", r["join_seconds"], True),
                 ("alive at end", r["alive_at_end"], None),
                 ("pings answered", r["pings_answered"], None),
                 ("server CPU while held s", r["server_cpu_s"], True),
                 ("server RSS idle MiB", r["server_rss_kib_start"] / 1024, True),
                 ("server RSS at end MiB", r["server_rss_kib_end"] / 1024, True),
                 ("RSS at end / clients KiB", r["server_rss_kib_end"] / r["clients"], True),
                 ("RSS added per client KiB", per_client, True)]
    return rows


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def print_table(results, scenarios):
    lines = ["| scenario | metric | chatroom | node | chatroom/node |",
             "|---|---|---:|---:|---:|"]
    for sc in scenarios:
        got = results.get(sc.key, {})
        if "chatroom" not in got and "node" not in got:
            continue
        c_rows = rows_for(sc, got["chatroom"], results) if "chatroom" in got else []
        n_rows = rows_for(sc, got["node"], results) if "node" in got else []
        n_map = {m: v for m, v, _ in n_rows}
        title = f"{sc.key}: {sc.title}"
        for i, (metric, cv, lower) in enumerate(c_rows or [(m, None, lb) for m, _, lb in n_rows]):
            nv = n_map.get(metric)
            ratio = "-"
            if lower is not None and isinstance(cv, (int, float)) and isinstance(nv, (int, float)) \
                    and nv > 0 and cv >= 0 and "change" not in metric:
                ratio = f"{cv / nv:.3f}"
            lines.append(f"| {title if i == 0 else ''} | {metric} | {fmt(cv)} | {fmt(nv)} | {ratio} |")
    print("\n".join(lines))


def machine():
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    with open(os.path.join(ROOT, "bench", "node_modules", "socket.io", "package.json")) as f:
        sio = json.load(f)["version"]
    return (f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} x {cpu}, Linux {platform.release()}, "
            f"Node.js {node} with socket.io {sio}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated scenario keys: " +
                    ", ".join(s.key for s in SCENARIOS))
    ap.add_argument("--servers", default="chatroom,node")
    ap.add_argument("--quick", action="store_true", help="shorter runs")
    ap.add_argument("--chatroom", help="the chatroom binary to run (default: ./chatroom)")
    args = ap.parse_args()
    if args.chatroom:
        global CHATROOM
        CHATROOM = os.path.abspath(args.chatroom)
    chosen = SCENARIOS
    if args.only:
        keys = args.only.split(",")
        unknown = set(keys) - {s.key for s in SCENARIOS}
        if unknown:
            ap.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
        chosen = [s for s in SCENARIOS if s.key in keys or
                  any(s.key == t.compare for t in SCENARIOS if t.key in keys)]
    servers = [(n, f) for n, f in SERVERS if n in args.servers.split(",")]

    print(f"# chatroom vs Node socket.io: {machine()}", flush=True)
    results = {}
    for sc in chosen:
        for name, start in servers:
            if name not in sc.servers:
                continue
            print(f"  {sc.key:15} {name:9}", end=" ", flush=True)
            t0 = time.monotonic()
            try:
                r = run_one(name, start, sc, args.quick)
            except Exception as e:  # one failed run must not lose the others
                print(f"FAILED: {e}", flush=True)
                continue
            r["_server"] = name
            results.setdefault(sc.key, {})[name] = r
            print(f"{time.monotonic() - t0:5.1f}s", flush=True)
    os.makedirs(os.path.join(ROOT, "build"), exist_ok=True)
    with open(os.path.join(ROOT, "build", "bench.json"), "w") as f:
        json.dump(results, f, indent=1)
    print()
    print_table(results, chosen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
