"""One room across several servers through Redis (--redis): a real redis-server (Debian's)
on a free loopback port for each test, two or three real chatroom processes, real
clients. What the room promises on one server it promises across servers: one order of
events for everyone, unique nicknames, name_list in join order, history, acks that mean
"in the room's sequence"; and what happens when a server or Redis goes away.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import pytest
import requests
import socketio

from conftest import Chatter, Server, free_port, wait_until
from rawws import Closed, RawWS


class Redis:
    """A redis-server of our own: no persistence, loopback only."""

    def __init__(self, port=None):
        if not shutil.which("redis-server"):
            pytest.fail("redis-server is missing: make test installs Debian's redis-server")
        self.port = port or free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_until(self._up, timeout=10), "redis-server did not start"

    def _up(self):
        try:
            return self.command("PING") == "PONG"
        except OSError:
            return False

    def command(self, *args):
        """One command over RESP, enough for the tests' few questions."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            out = f"*{len(args)}\r\n" + "".join(f"${len(str(a).encode())}\r\n{a}\r\n" for a in args)
            s.sendall(out.encode())
            f = s.makefile("rb")
            return self._read(f)

    def _read(self, f):
        line = f.readline().rstrip(b"\r\n")
        kind, rest = line[:1], line[1:]
        if kind in (b"+", b"-"):
            return rest.decode()
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else f.read(n + 2)[:-2].decode()
        if kind == b"*":
            return [self._read(f) for _ in range(int(rest))]
        raise ValueError(line)

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def redis():
    r = Redis()
    yield r
    r.stop()


def servers(make_server, redis, n, *args):
    return [make_server("--redis", redis.url, *args) for _ in range(n)]


def in_room(server, count, timeout=10):
    """Waits until `server` counts `count` members in the whole room."""
    def counted():
        text = requests.get(server.url + "/metrics", timeout=5).text
        return f"chatroom_room_everyone {count}\n" in text
    assert wait_until(counted, timeout=timeout), requests.get(server.url + "/metrics").text


def events(chatter, start=0):
    """What a chatter saw, as comparable tuples."""
    with chatter.cond:
        return [(m.get("action"), m.get("username"), m.get("msg")) for m in chatter.msgs[start:]]


def test_every_client_on_every_server_sees_one_order(make_server, redis):
    # Three servers, two clients on each (WebSocket and long-polling), everyone sending
    # at once: every client sees every message, and all in the same order.
    trio = servers(make_server, redis, 3)
    people = []
    for s in trio:
        for transports in (["websocket"], ["polling"]):
            people.append(Chatter(s, transports=transports))
            people[-1].nick  # joined
    in_room(trio[0], 6)
    marks = [len(p.msgs) for p in people]
    last = people[-1]
    for p in people:  # everyone has seen the last login before the burst begins
        p.wait(lambda m: m.get("action") == "login" and m.get("username") == last.nick)
    marks = [len(p.msgs) for p in people]

    def burst(p):
        for i in range(20):
            p.say(f"{p.nick} {i}")
    threads = [threading.Thread(target=burst, args=(p,)) for p in people]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p, mark in zip(people, marks):
        p.wait_count(mark + 120, timeout=20)
    seen = [events(p, mark) for p, mark in zip(people, marks)]
    assert all(s == seen[0] for s in seen), "clients saw different orders"
    for p in people:  # each one's own messages in the order it sent them
        own = [m for a, u, m in seen[0] if u == p.nick]
        assert own == [f"{p.nick} {i}" for i in range(20)]
    for p in people:
        p.close()


def test_name_list_is_the_whole_room_in_join_order_and_names_are_unique(make_server, redis):
    # Three names for five people on two servers: the names are still unique (suffixes).
    names = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
    names.write("Ant\nBee\nCat\n")
    names.close()
    a, b = servers(make_server, redis, 2, "--names", names.name)
    people = []
    for i in range(5):  # one after the other, alternating servers
        people.append(Chatter([a, b][i % 2]))
        people[-1].nick
        in_room(a, i + 1)
    last_login = people[-1].wait(lambda m: m.get("action") == "login" and
                                 m.get("username") == people[-1].nick)
    listed = last_login["name_list"]
    assert [n for n, _ in listed] == [p.nick for p in people]
    assert [sid for _, sid in listed] == [p.sid for p in people]
    assert len({p.nick for p in people}) == 5
    assert any("#" in p.nick for p in people)
    os.unlink(names.name)
    for p in people:
        p.close()


def test_history_and_delta_presence_across_servers(make_server, redis):
    a, b = servers(make_server, redis, 2)
    talker = Chatter(a)
    for i in range(3):
        talker.say(f"before {i}")
    talker.wait(lambda m: m.get("msg") == "before 2")
    # a newcomer on the other server gets the history, then deltas of others' comings
    ws = RawWS.engineio(b)
    ws.recv_message()
    ws.send_text('40{"presence":"delta"}')
    assert ws.recv_message().startswith("40")
    login = json.loads(ws.recv_message()[2:])[1]
    assert login["action"] == "login" and len(login["name_list"]) == 2
    history = json.loads(ws.recv_message()[2:])
    assert history[0] == "history" and [m["msg"] for m in history[1]] == [f"before {i}" for i in range(3)]
    other = Chatter(a)
    delta = json.loads(ws.recv_message()[2:])[1]
    assert delta == {"action": "login", "username": other.nick, "sid": other.sid}
    sid = other.sid
    other.close()
    delta = json.loads(ws.recv_message()[2:])[1]
    assert delta == {"action": "logout", "username": other.nick, "sid": sid}
    talker.close()


def test_an_ack_means_the_message_is_in_the_rooms_sequence(make_server, redis):
    # Redis holds every command for a second: the ack must wait for it, and the message
    # reaches nobody before it is in the sequence.
    a, b = servers(make_server, redis, 2)
    sender, reader = Chatter(a), Chatter(b)
    sender.nick, reader.nick
    in_room(a, 2)
    mark = len(reader.msgs)
    acked = threading.Event()
    redis.command("CLIENT", "PAUSE", "1000", "ALL")
    start = time.monotonic()
    sender.say("wait for it", callback=lambda *a: acked.set())
    assert acked.wait(10)
    took = time.monotonic() - start
    assert took > 0.7, f"acknowledged after {took:.2f} s, while Redis was paused"
    reader.wait(lambda m: m.get("msg") == "wait for it", start=mark)
    sender.close()
    reader.close()


def test_a_killed_server_is_logged_out_once_within_15_seconds(make_server, redis):
    # Two survivors notice the dead server; each of their clients sees each of its
    # members leave exactly once.
    a, b = servers(make_server, redis, 2)
    dead = Server("--redis", redis.url)  # (not make_server's: it will not exit cleanly)
    watchers = [Chatter(a), Chatter(b)]
    victims = [Chatter(dead, transports=["websocket"]), Chatter(dead, transports=["polling"])]
    for v in victims:
        v.nick
    in_room(a, 4)
    names = {v.nick for v in victims}
    marks = [len(w.msgs) for w in watchers]
    dead.proc.kill()
    start = time.monotonic()
    for w in watchers:
        for n in names:
            w.wait(lambda m: m.get("action") == "logout" and m.get("username") == n, timeout=15)
    took = time.monotonic() - start
    assert took < 15
    time.sleep(2)  # (not a verdict: a second logout would come within a beat or two)
    for w, mark in zip(watchers, marks):
        logouts = [u for a, u, _ in events(w, mark) if a == "logout"]
        assert sorted(logouts) == sorted(names), logouts
    for c in watchers + victims:
        c.close()


def test_a_restarted_server_leaves_no_ghosts(make_server, redis):
    a = make_server("--redis", redis.url)
    port = free_port()
    b = Server("--redis", redis.url, port=port)  # (killed: not make_server's)
    ghost = Chatter(b)
    ghost.nick
    in_room(a, 1)
    b.proc.kill()
    b.proc.wait()
    b2 = make_server("--redis", redis.url, port=port)
    newcomer = Chatter(b2)
    newcomer.nick
    # within a few beats the old server is reaped: the room is the newcomer alone
    in_room(a, 1, timeout=15)
    login = Chatter(a)
    first = login.wait(lambda m: m.get("action") == "login")
    assert [n for n, _ in first["name_list"]] == [newcomer.nick, login.nick]
    for c in (newcomer, login):
        c.close()


def health(server):
    return requests.get(server.url + "/healthz", timeout=5).status_code


def test_without_redis_nobody_is_in_the_room_and_everyone_comes_back(make_server):
    r = Redis()
    try:
        s = make_server("--redis", r.url)
        sio = socketio.Client(reconnection_delay=0.2, reconnection_delay_max=0.5)
        connects = []
        sio.on("connect", lambda: connects.append(time.monotonic()))
        sio.connect(s.url, transports=["websocket"])
        assert health(s) == 200
        port = r.port
        r.stop()  # its clients are disconnected; it says so
        assert wait_until(lambda: health(s) == 503, timeout=10)
        assert wait_until(lambda: not sio.connected, timeout=10)
        # a newcomer waits for Redis, then is told the room is unavailable
        ws = RawWS.engineio(s)
        ws.recv_message()
        ws.send_text("40")
        refusal = ws.recv_message(timeout=20)
        assert refusal.startswith("44") and "room unavailable" in refusal, refusal
        r = Redis(port)  # back: the disconnected client comes back by itself
        assert wait_until(lambda: health(s) == 200, timeout=15)
        assert wait_until(lambda: sio.connected and len(connects) >= 2, timeout=20)
        sio.disconnect()
    finally:
        r.stop()


def test_a_connect_waits_for_redis_to_come_back(make_server):
    # A CONNECT during a short outage is answered when Redis is back, not refused.
    r = Redis()
    try:
        s = make_server("--redis", r.url)
        port = r.port
        r.stop()
        assert wait_until(lambda: health(s) == 503, timeout=10)
        ws = RawWS.engineio(s)
        ws.recv_message()
        ws.send_text("40")
        time.sleep(1)  # (the outage goes on a while; not a verdict)
        r = Redis(port)
        assert ws.recv_message(timeout=15).startswith('40{"sid"')
        assert ws.recv_message().startswith('42["msg",{"username"')
    finally:
        r.stop()
