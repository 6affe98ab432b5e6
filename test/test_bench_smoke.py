"""The benchmark's load generator, for a few seconds against the real server: not to
measure anything (`make bench` does that), but so that it keeps working. Each scenario's
numbers must be whole: everyone joined, every message reached everyone, the server's
/proc readings are there."""
import json
import subprocess
from pathlib import Path

import pytest

LOADGEN = Path(__file__).resolve().parent.parent / "build" / "loadgen"


def loadgen(server, *args):
    if not LOADGEN.exists():
        pytest.fail(f"{LOADGEN} is missing: `make test` builds it")
    out = subprocess.run([str(LOADGEN), "--port", str(server.port),
                          "--server-pid", str(server.proc.pid), *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_fanout_every_message_reaches_everyone(make_server):
    s = make_server("--flood-limit", "0", "--inbound-rate", "0", "--history", "0")
    r = loadgen(s, "--clients", "50", "--senders", "5", "--rate", "50",
                "--seconds", "2", "--warmup", "0.5")
    assert (r["joined"], r["failed"]) == (50, 0)
    assert r["sent"] >= 80  # 50 a second for 2 s, give or take the clock
    assert r["expected"] == r["sent"] * 50
    assert r["received"] == r["expected"]
    assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"] < 1000
    assert r["server_cpu_s"] > 0 and r["server_rss_kib_max"] > 1000
    assert r["loadgen_cpu_s"] > 0


def test_join_storm_with_full_name_lists(make_server):
    s = make_server("--history", "0")
    r = loadgen(s, "--scenario", "join", "--clients", "200")
    assert (r["joined"], r["failed"]) == (200, 0)
    assert 0 < r["join_seconds"] < 30
    assert s.wait_log(r"join ", count=200)


def test_stalled_client_is_dropped_and_the_others_go_on(make_server):
    # A small queue limit, padded messages: the client that stops reading overflows its
    # queue within a second, and the others are told it left.
    s = make_server("--flood-limit", "0", "--inbound-rate", "0", "--history", "0",
                    "--queue-limit", "1048576")
    r = loadgen(s, "--clients", "20", "--senders", "4", "--rate", "100", "--pad", "20000",
                "--stall", "1", "--seconds", "3", "--warmup", "0.5", "--delta")
    assert (r["joined"], r["failed"]) == (20, 0)
    assert r["received"] == r["expected"]  # the 19 others missed nothing
    assert 0 < r["stalled_dropped_after_s"] < 3.5
    assert s.wait_log(r"outbound queue overflow")
