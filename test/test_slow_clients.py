"""Clients that are slow on purpose: no connection holds a thread while it waits.

Each test holds a few hundred connections from many loopback addresses in one of the
ways an attacker would (half a request head, a silent keep-alive connection after a
handshake, a POST head and no body), then checks that a newcomer still joins at once and
that the server's threads did not multiply. A room of 20 keeps the old model's worker
pool small (20 places plus a margin), so that these would have locked it out for seconds.
bench/attack.c runs the same attacks at full size, against Node too.
"""
import selectors
import socket
import time

from conftest import Polling, server_has_read, wait_until

ROOM = ("--max-clients", "20")
HOLD = 300  # connections, from 60 addresses


def sources(n):
    return [f"127.0.{2 + i // 5}.{1 + i % 5}" for i in range(n)]  # 5 per address


def hold(server, payload, n=HOLD):
    held = []
    for src in sources(n):
        s = socket.create_connection((server.host, server.port), source_address=(src, 0))
        if payload:
            s.sendall(payload)
        held.append(s)
    return held


def threads(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("Threads:")).split()[1])


def newcomer_joins(server, within=5.0):
    # (locked out, a newcomer would wait for the 60 s header timeout; the bound leaves
    # room for a loaded machine and the sanitizer build)
    """A polling handshake and a CONNECT to the room, timed."""
    start = time.monotonic()
    p = Polling(server, source="127.0.200.1")
    p.post("40")
    assert any(x.startswith('42["msg"') for x in p.packets())
    took = time.monotonic() - start
    assert took < within, f"a newcomer took {took:.2f} s to join"
    return took


HALF_HEAD = b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\n"


def test_half_heads_hold_no_thread(make_server):
    s = make_server(*ROOM)
    before = threads(s.proc.pid)
    held = hold(s, HALF_HEAD)
    assert wait_until(lambda: server_has_read(*held), timeout=30)
    newcomer_joins(s)
    assert threads(s.proc.pid) == before
    for c in held:
        c.close()


def test_silent_keep_alive_sessions_hold_no_thread_and_no_place(make_server):
    # Each makes a polling handshake, then stays silent on the kept-alive connection: an
    # unjoined session and an idle connection each, 300 of them for a room of 20.
    s = make_server(*ROOM)
    before = threads(s.proc.pid)
    held = []
    for src in sources(HOLD):
        c = socket.create_connection((s.host, s.port), source_address=(src, 0))
        c.sendall(b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\n\r\n")
        assert c.recv(4096).startswith(b"HTTP/1.1 200")
        held.append(c)
    newcomer_joins(s)
    assert threads(s.proc.pid) == before
    for c in held:
        c.close()


def test_post_bodies_that_never_come_hold_no_thread(make_server):
    # A POST head that promises 100 kB, then nothing: the request can be judged (a
    # handshake must be a GET) only once its body is in, and a worker must not wait.
    s = make_server(*ROOM)
    before = threads(s.proc.pid)
    held = hold(s, b"POST /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\n"
                   b"Content-Length: 100000\r\n\r\n")
    assert wait_until(lambda: server_has_read(*held), timeout=30)
    newcomer_joins(s)
    assert threads(s.proc.pid) == before
    for c in held:
        c.close()


def closed_after(conn, timeout):
    """Seconds until the server closes conn (what it sends first is returned too)."""
    start = time.monotonic()
    conn.settimeout(timeout)
    got = b""
    try:
        while True:
            chunk = conn.recv(4096)
            if not chunk:
                break
            got += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return time.monotonic() - start, got


def test_a_head_must_arrive_within_the_header_timeout(make_server):
    s = make_server("--header-timeout", "1000")
    c = hold(s, HALF_HEAD, 1)[0]
    took, got = closed_after(c, 5)
    assert 0.9 < took < 5, took
    assert got.startswith(b"HTTP/1.1 408")


def test_a_body_must_keep_arriving(make_server):
    s = make_server("--header-timeout", "1000")
    p = Polling(s)
    c = hold(s, (f"POST /socket.io/?EIO=4&transport=polling&sid={p.sid} HTTP/1.1\r\n"
                 f"Host: x\r\nContent-Length: 10\r\n\r\n40").encode(), 1)[0]
    took, got = closed_after(c, 5)
    assert 0.9 < took < 5, took
    assert got.startswith(b"HTTP/1.1 408")


def test_a_burst_of_connections_does_not_expire_in_one(make_server):
    # 100 half heads sent at once: their header timeouts are stretched by up to a quarter
    # at random, so they end over about 250 ms rather than together (a burst of clients
    # that come straight back would queue their handshakes ahead of everyone else's).
    s = make_server("--header-timeout", "1000")
    held = hold(s, HALF_HEAD, 100)
    assert wait_until(lambda: server_has_read(*held), timeout=10)
    sel = selectors.DefaultSelector()
    for c in held:
        sel.register(c, selectors.EVENT_READ)
    ended = []
    deadline = time.monotonic() + 10
    while len(ended) < len(held) and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=1):
            ended.append(time.monotonic())
            sel.unregister(key.fileobj)
    assert len(ended) == len(held)
    assert max(ended) - min(ended) > 0.1, max(ended) - min(ended)  # uniform: about 0.25 s
    for c in held:
        c.close()


def test_an_idle_keep_alive_connection_is_closed_after_5_seconds(server):
    c = socket.create_connection((server.host, server.port))
    c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    c.settimeout(5)
    head = c.recv(65536)
    assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" not in head.split(b"\r\n\r\n")[0]
    took, _ = closed_after(c, 10)
    assert 4 < took < 8, took


def test_a_few_hundred_bytes_per_waiting_connection(make_server):
    s = make_server(*ROOM)
    time.sleep(0.3)
    before = rss_kib(s.proc.pid)
    held = []
    for src in (f"127.0.9.{i}" for i in range(1, 11)):  # 100 from each of 10 addresses
        for _ in range(100):
            c = socket.create_connection((s.host, s.port), source_address=(src, 0))
            c.sendall(HALF_HEAD)
            held.append(c)
    assert wait_until(lambda: server_has_read(*held), timeout=30)
    per = (rss_kib(s.proc.pid) - before) * 1024 / 1000
    limit = 4096 if "asan" in s.argv[0] else 1024
    print(f"{per:.0f} bytes a waiting connection")
    assert per < limit, f"{per:.0f} bytes a waiting connection"
    for c in held:
        c.close()


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])
