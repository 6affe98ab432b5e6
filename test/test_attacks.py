"""Attacks on the server's budgets, each performed as an attacker would, on loopback.

Every test here names what it does to the server and what the server must do about it:
refuse with the protocol's error, or drop the attacker, while its memory stays bounded
and everybody else keeps chatting.
"""
import json
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import requests

from conftest import BINARY, Polling, netns_argv, server_ends, wait_until
from rawws import RawWS
from test_robustness import next_event, rss_kib
from test_socketio import joined


def test_fragment_length_that_wraps_is_refused_before_buffering(server):
    # A 20-byte first fragment, then a continuation that declares 2^64 - 10 bytes: the
    # sum wraps to 10, under maxPayload, if the server adds without checking.
    ws = RawWS.engineio(server)
    ws.recv_message()
    rss_before = rss_kib(server.proc.pid)
    ws.send_frame(0x1, "4" + "x" * 19, fin=False)
    head = bytes([0x00, 0x80 | 127]) + struct.pack(">Q", 2**64 - 10) + b"\0\0\0\0"
    ws.send_raw(head)
    sent = 0
    chunk = b"\0" * 65536
    deadline = time.monotonic() + 5
    try:
        while sent < 64 << 20 and time.monotonic() < deadline:
            ws.sock.settimeout(1)
            ws.sock.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError, socket.timeout):
        pass
    assert ws.expect_close(timeout=3) == 1009
    grown = rss_kib(server.proc.pid) - rss_before
    assert grown < 16 * 1024, f"server RSS grew {grown} KiB while the attacker sent {sent >> 20} MiB"


def reader_at(ws, bytes_per_second, stop, got):
    """Reads ws at about bytes_per_second until stop is set, counting what it reads and
    whether the server closed it."""
    ws.sock.settimeout(0.2)
    chunk = max(1024, bytes_per_second // 16)
    while not stop.is_set():
        try:
            data = ws.sock.recv(chunk)
        except socket.timeout:
            continue
        except OSError:
            got["closed"] = True
            return
        if not data:
            got["closed"] = True
            return
        got["bytes"] += len(data)
        time.sleep(len(data) / bytes_per_second)


def test_one_sender_cannot_get_a_member_reading_256k_a_second_dropped(make_server):
    # 40 messages of 1 MB, and events with 10 attachments of 1 MB, as fast as TCP takes
    # them; the queue limit is 2 MB (a room of 100). Without an inbound budget in bytes
    # the member that reads at 256 KiB/s is dropped for overflow within a second or two.
    # (raw clients that do not answer pings: no heartbeat ends them on a slow machine)
    s = make_server("--max-clients", "100", "--flood-limit", "0", "--ping-interval", "3600000")
    member = joined(s, source="127.0.0.2")
    sender = joined(s)
    member.recv_message()  # the sender's login
    stop, got = threading.Event(), {"bytes": 0, "closed": False}
    reading = threading.Thread(target=reader_at, args=(member, 256 * 1024, stop, got))
    reading.start()

    def flood():
        big = '42["msg",{"msg":"' + "x" * 900_000 + '"}]'  # under maxPayload
        try:
            sender.sock.settimeout(10)
            for _ in range(40):
                sender.send_text(big)
            for _ in range(4):
                sender.send_text('4510-["msg",' + ",".join(
                    '{"_placeholder":true,"num":%d}' % i for i in range(10)) + "]")
                for _ in range(10):
                    sender.send_binary(b"\0" * 900_000)
        except OSError:
            pass  # paused, or dropped: either way it sends no more

    flooding = threading.Thread(target=flood, daemon=True)
    flooding.start()
    time.sleep(8)
    stop.set()
    reading.join()
    assert not got["closed"], "the member was dropped"
    assert "outbound queue overflow" not in s.stdout()
    # what it got is what the sender's budget let through: a burst and 128 KiB/s
    assert got["bytes"] < (1_100_000 + 8 * 131072) * 1.5, got["bytes"]
    assert got["bytes"] > 1_000_000  # but it does get the sender's messages
    sender.close()
    member.close()


def test_join_and_leave_cycles_from_one_address_are_limited(make_server):
    # Each join sends every member a login, each leave a logout: with full name_lists
    # that is the room squared in bytes. One address gets --joins-per-minute of them.
    s = make_server("--joins-per-minute", "20")
    watcher = joined(s, source="127.0.0.2")
    refused = 0
    for _ in range(30):
        ws = RawWS.engineio(s)
        ws.recv_message()
        ws.send_text("40")
        answer = ws.recv_message()
        if answer.startswith("44"):
            assert "too many joins" in answer
            refused += 1
        ws.close()
    assert refused == 10
    logins = 0
    while True:
        try:
            m = watcher.recv_message(timeout=1)
        except socket.timeout:
            break
        logins += '"action":"login"' in m
    assert logins == 20
    assert joined(s, source="127.0.0.3").nick  # another address joins


def test_one_address_holds_its_share_of_sessions(make_server):
    s = make_server("--sessions-per-address", "10")
    held = [Polling(s) for _ in range(10)]
    r = requests.get(s.eio, params={"EIO": 4, "transport": "polling"}, timeout=5)
    assert (r.status_code, r.json()["message"]) == (429, "too many sessions from this address")
    ws = RawWS.engineio(s)
    assert ws.status == 429
    ws.close()
    assert Polling(s, source="127.0.0.2").sid  # another address is let in
    held[0].post("1")
    assert wait_until(lambda: requests.get(s.eio, params={"EIO": 4, "transport": "polling"},
                                           timeout=5).status_code == 200)


IPV6_SHARE = textwrap.dedent("""
    # In a network namespace of its own: loopback with three IPv6 addresses, two in one
    # /64. chatroom counts sessions per /64, so those two share one address's share.
    import json, socket, subprocess, sys, time
    def sh(cmd): subprocess.run(cmd, shell=True, check=True)
    sh("ip link set lo up")
    for a in ("2001:db8:1::1", "2001:db8:1::2", "2001:db8:2::1"):
        sh(f"ip -6 addr add {a}/128 dev lo nodad")
    p = subprocess.Popen([sys.argv[1], "--host", "::", "--port", "5000",
                          "--sessions-per-address", "2"], stdout=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("::1", 5000)).close(); break
        except OSError: time.sleep(0.05)
    def handshake(source):
        with socket.create_connection(("::1", 5000), source_address=(source, 0)) as c:
            c.sendall(b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
            return int(c.recv(100).split()[1])
    codes = [handshake(a) for a in ("2001:db8:1::1", "2001:db8:1::2", "2001:db8:1::1",
                                    "2001:db8:2::1")]
    p.send_signal(2)
    print(json.dumps({"codes": codes, "exit": p.wait(5)}))
""")


def test_ipv6_clients_are_counted_per_64(make_server):
    argv = netns_argv()
    if not argv:
        pytest.skip("no network namespace can be made here (unshare)")
    r = subprocess.run(argv + [sys.executable, "-c", IPV6_SHARE, BINARY],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["codes"] == [200, 200, 429, 200] and out["exit"] == 0, out


def rss_bound_kib(server, normal_mib):
    """What RSS may grow by: the sanitizer build keeps freed memory in quarantine and
    doubles what it allocates, so it gets more room."""
    return (normal_mib * 3 if "asan" in server.argv[0] else normal_mib) * 1024


def deaf(server, source=None):
    """A client that joins and then never reads again: its receive buffer is tiny."""
    ws = RawWS.engineio(server, source=source)
    ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    ws.recv_message()
    ws.send_text("40")
    return ws


def test_newcomers_that_never_read_share_one_history(make_server):
    # 50 messages of 40 kB in the history: each newcomer is sent 2 MB. Two hundred that
    # never read must not cost two hundred copies (that was 400 MB).
    s = make_server("--history", "50", "--flood-limit", "0", "--inbound-rate", "0")
    talker = joined(s, source="127.0.0.2")
    for i in range(50):
        talker.send_text('42["msg",{"msg":"%d %s"}]' % (i, "h" * 40_000))
    for _ in range(50):
        talker.recv_message()
    before = rss_kib(s.proc.pid)
    crowd = [deaf(s, source="127.0.0.3") for _ in range(200)]
    assert s.wait_log(r"join ", count=202, timeout=30)
    time.sleep(0.5)
    grown = rss_kib(s.proc.pid) - before
    assert grown < rss_bound_kib(s, 40), f"RSS grew {grown} KiB"
    for ws in crowd:
        ws.close()


def test_slow_long_pollers_share_their_answers(make_server):
    # 30 polling members, each sent 16 messages of 900 kB before its next GET, which it
    # never reads: each answer is 14 MB, more than the kernel's socket buffers take. Made
    # of shared blobs they cost their bookkeeping only; a private copy each was 10 MB or
    # more apiece.
    s = make_server("--flood-limit", "0", "--inbound-rate", "0", "--history", "0")
    talker = joined(s, source="127.0.0.2", history=False)
    members = []
    for _ in range(30):
        p = Polling(s, source="127.0.0.3")
        p.post("40")
        p.packets()
        members.append(p)
    for i in range(16):
        talker.send_text('42["msg",{"msg":"%d %s"}]' % (i, "p" * 900_000))
    for _ in range(16):
        talker.recv_message()
    time.sleep(0.3)
    before = rss_kib(s.proc.pid)
    raws = []
    for p in members:
        raw = socket.create_connection((s.host, s.port), source_address=("127.0.0.3", 0))
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.sendall(f"GET /socket.io/?EIO=4&transport=polling&sid={p.sid} HTTP/1.1\r\n"
                    f"Host: x\r\n\r\n".encode())
        raws.append(raw)
    time.sleep(2)
    grown = rss_kib(s.proc.pid) - before
    assert grown < rss_bound_kib(s, 50), f"RSS grew {grown} KiB"
    for raw in raws:
        raw.close()


def test_memory_budget_refuses_what_would_pass_it(make_server):
    # 60 clients each send 800 kB of a 900 kB frame and stop: 48 MB that only the budget
    # (32 MiB here) can refuse. Those past it are told to come back later (1013).
    # (no heartbeat or connect timeout ends anyone, however slow the machine makes this)
    s = make_server("--max-memory", "32M", "--inbound-rate", "0", "--ping-interval", "3600000",
                    "--connect-timeout", "3600000")
    bystander = joined(s, source="127.0.0.2")
    before = rss_kib(s.proc.pid)
    halves = []
    for i in range(60):
        ws = RawWS.engineio(s, source=f"127.0.1.{i + 1}")
        ws.recv_message()
        ws.send_raw(RawWS.frame(0x1, "4" + "z" * 899_999)[:800_000])
        halves.append(ws)
    # once the server has read them all (or closed them), and answered the bystander
    # after that, what it refused has its close frame in our sockets already
    assert wait_until(lambda: all(end is None or int(end[4].split(":")[1], 16) == 0
                                  for end in server_ends([ws.sock for ws in halves])), 30)
    bystander.send_text('42["msg",{"msg":"after them"}]')
    assert next_event(bystander)[1]["msg"] == "after them"  # (its pings answered)
    refused = 0
    for ws in halves:
        try:
            refused += ws.expect_close(timeout=0.05) == 1013
        except (AssertionError, OSError):
            pass
    assert 10 <= refused < 60, refused
    grown = rss_kib(s.proc.pid) - before
    assert grown < rss_bound_kib(s, 32 + 16), f"RSS grew {grown} KiB"
    bystander.send_text('42["msg",{"msg":"still here"}]')
    assert next_event(bystander)[1]["msg"] == "still here"
    for ws in halves:
        ws.close()


def test_memory_budget_drops_those_furthest_behind_first(make_server):
    # Queues may be long (--queue-limit 100M), but all together may hold 32 MiB: past
    # that, the members that read least are dropped, and the server stays within it.
    # (raw clients here do not answer pings: no heartbeat ends them, however slow the
    # machine makes the test)
    s = make_server("--max-memory", "32M", "--queue-limit", "100M", "--flood-limit", "0",
                    "--inbound-rate", "0", "--history", "0", "--ping-interval", "3600000")
    reader = joined(s, source="127.0.0.2", history=False)
    sleepers = [deaf(s, source="127.0.0.3") for _ in range(5)]
    talker = joined(s, source="127.0.0.4", history=False)
    before = rss_kib(s.proc.pid)
    stop, got, echoes = threading.Event(), {"bytes": 0, "closed": False}, {"bytes": 0}
    reading = [threading.Thread(target=reader_at, args=(reader, 50 << 20, stop, got)),
               threading.Thread(target=reader_at, args=(talker, 50 << 20, stop, echoes))]
    for t in reading:
        t.start()
    for i in range(80):  # 72 MB in all, at a pace the two readers keep up with
        talker.send_text('42["msg",{"msg":"%d %s"}]' % (i, "m" * 900_000))
        time.sleep(0.05)
    assert s.wait_log(r"server memory budget", count=5, timeout=20)
    stop.set()
    for t in reading:
        t.join()
    assert not got["closed"] and "closed" not in echoes  # those who read are not among them
    grown = rss_kib(s.proc.pid) - before
    assert grown < rss_bound_kib(s, 32 + 24), f"RSS grew {grown} KiB"
    for ws in sleepers:
        ws.close()


def test_a_stream_of_tiny_packets_is_read_at_its_budget(make_server):
    # 7-byte noop frames as fast as TCP takes them: each costs 256 bytes of the budget,
    # so the server reads a few hundred a second and TCP holds back the rest.
    s = make_server()
    bystander = joined(s, source="127.0.0.2")
    attacker = joined(s)
    frame = RawWS.frame(0x1, "6")
    burst = frame * 10000
    pushed = 0
    attacker.sock.settimeout(0.5)
    deadline = time.monotonic() + 4
    try:
        while time.monotonic() < deadline:
            attacker.sock.sendall(burst)
            pushed += len(burst)
    except (socket.timeout, OSError):
        pass
    assert pushed < 16 << 20, f"the server took {pushed >> 20} MiB of noops in 4 s"
    bystander.send_text('42["msg",{"msg":"still quick"}]')
    while "still quick" not in bystander.recv_message(timeout=2):
        pass


def test_a_post_of_a_hundred_thousand_noops_ends_its_session(server):
    p = Polling(server)
    p.post("40")
    p.packets()
    r = p.post("\x1e".join(["6"] * 100_000))
    assert r.status_code in (200, 400)
    assert p.get().status_code == 400  # the session is gone: excess flood
    assert server.wait_log(r"excess flood")
