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

    def __init__(self, port=None, *args):
        if not shutil.which("redis-server"):
            pytest.fail("redis-server is missing: make test installs Debian's redis-server")
        self.port = port or free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--protected-mode", "no", *args],
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


def test_a_redis_that_does_not_answer_counts_as_lost(make_server, redis):
    # Redis holds every client for 8 s: within REDIS_STALL_MS (5 s) the server gives up on
    # it (503, its client cut, and back by itself once Redis answers again).
    s = make_server("--redis", redis.url)
    sio = socketio.Client(reconnection_delay=0.2, reconnection_delay_max=0.5)
    connects = []
    sio.on("connect", lambda: connects.append(time.monotonic()))
    sio.connect(s.url, transports=["websocket"])
    redis.command("CLIENT", "PAUSE", "8000", "ALL")
    start = time.monotonic()
    assert wait_until(lambda: not sio.connected, timeout=10)
    assert time.monotonic() - start < 8
    assert health(s) == 503
    assert wait_until(lambda: sio.connected and len(connects) >= 2, timeout=30)
    assert health(s) == 200
    sio.disconnect()


def test_a_subscriber_that_falls_behind_is_dropped_and_comes_back(make_server):
    # Redis drops a subscriber whose output buffer passes its limit (here 4 MB): the
    # server stopped while the room talks falls that far behind once the kernel's socket
    # buffers (a few MB on loopback) are full. When it runs again it finds its
    # subscription gone: its clients are cut and come back.
    r = Redis(None, "--client-output-buffer-limit", "pubsub 4mb 2mb 1")
    try:
        a = make_server("--redis", r.url, "--inbound-rate", "0")
        b = make_server("--redis", r.url)
        talker = Chatter(a)
        talker.nick
        sio = socketio.Client(reconnection_delay=0.2, reconnection_delay_max=0.5)
        connects = []
        sio.on("connect", lambda: connects.append(time.monotonic()))
        sio.connect(b.url, transports=["websocket"])
        in_room(a, 2)
        b.proc.send_signal(signal.SIGSTOP)
        try:
            for i in range(40):
                talker.say(f"{i} " + "x" * 500_000)
            talker.wait(lambda m: m.get("msg", "").startswith("39 "), timeout=30)
        finally:
            b.proc.send_signal(signal.SIGCONT)
        assert b.wait_log(r"lost; our clients are disconnected", timeout=10)
        assert wait_until(lambda: sio.connected and len(connects) >= 2, timeout=30)
        in_room(a, 2, timeout=15)
        sio.disconnect()
        talker.close()
    finally:
        r.stop()


def test_a_recovered_member_still_leaves_the_whole_room(make_server, redis):
    # Recovery is per server: a member that comes back to the same server within the
    # window keeps its place, and the place is still one Redis knows about. When it then
    # leaves for good, every server hears its logout, and the room counts one fewer.
    a, b = servers(make_server, redis, 2, "--recovery-window", "5")
    watcher = Chatter(b)
    watcher.nick
    ws = RawWS.engineio(a)
    assert ws.recv_message()[0] == "0"
    ws.send_text('40{"recovery":true}')
    answer = json.loads(ws.recv_message()[2:])
    login = json.loads(ws.recv_message()[2:])
    nick, offset = login[1]["username"], login[-1]
    in_room(a, 2)
    ws.sock.shutdown(socket.SHUT_RDWR)  # gone without a word: the window opens
    ws.close()

    back = RawWS.engineio(a)
    assert back.recv_message()[0] == "0"
    back.send_text('40' + json.dumps({"pid": answer["pid"], "offset": offset}))
    assert json.loads(back.recv_message()[2:])["sid"] == answer["sid"]  # recovered
    in_room(b, 2)
    back.send_text("41")  # and now it leaves for good
    watcher.wait(lambda m: m.get("action") == "logout" and m.get("username") == nick)
    in_room(a, 1)
    in_room(b, 1)
    assert redis.command("HLEN", "chatroom:nick") == 1
    watcher.close()
    back.close()


def test_a_malformed_event_on_the_channel_costs_a_reconnect_not_a_crash(make_server, redis):
    # Anything published on the room's channel is read as the room's event. One that does
    # not parse (a login without its sid, here, numbered as the next event) is treated as
    # a gap: the server starts over from Redis, its clients come back.
    s = make_server("--redis", redis.url)
    sio = socketio.Client(reconnection_delay=0.2, reconnection_delay_max=0.5)
    connects = []
    sio.on("connect", lambda: connects.append(time.monotonic()))
    sio.connect(s.url, transports=["websocket"])
    seq = int(redis.command("GET", "chatroom:seq"))
    redis.command("PUBLISH", "chatroom:events", f"L {seq + 1}")
    assert s.wait_log(r"lost; our clients are disconnected", timeout=10)
    assert wait_until(lambda: sio.connected and len(connects) >= 2, timeout=30)
    assert s.proc.poll() is None
    sio.disconnect()


class FreezingProxy:
    """A TCP proxy to Redis whose n-th connection can stop passing Redis's bytes on while
    staying open: a half-open connection, as a dead NAT entry or a frozen peer leaves."""

    def __init__(self, redis_port):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.redis_port = redis_port
        self.frozen = set()
        self.count = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.redis_port))
            except OSError:  # Redis stopped at the test's end
                client.close()
                continue
            n, self.count = self.count, self.count + 1
            threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, n), daemon=True).start()

    def _pump(self, src, dst, n):
        try:
            while data := src.recv(65536):
                if n not in self.frozen:
                    dst.sendall(data)
        except OSError:
            pass

    def close(self):
        self.listener.close()


def test_a_channel_that_goes_quiet_counts_as_lost(make_server, redis):
    # The subscriber connection stays open but brings nothing (its bytes stop at the
    # proxy), while commands go through: the heartbeat sees the room's number move on
    # without us, and within REDIS_STALL_MS (5 s) the server starts over.
    proxy = FreezingProxy(redis.port)
    s = make_server("--redis", f"redis://127.0.0.1:{proxy.port}")
    other = make_server("--redis", redis.url)
    sio = socketio.Client(reconnection_delay=0.2, reconnection_delay_max=0.5)
    connects = []
    sio.on("connect", lambda: connects.append(time.monotonic()))
    sio.connect(s.url, transports=["websocket"])
    talker = Chatter(other)
    talker.nick
    proxy.frozen.add(0)  # the first connection is the subscriber
    start = time.monotonic()
    talker.say("anyone there?")
    assert s.wait_log(r"lost; our clients are disconnected", timeout=15)
    assert time.monotonic() - start < 12
    proxy.frozen.clear()  # connections made from now on pass everything
    assert wait_until(lambda: sio.connected and len(connects) >= 2, timeout=30)
    sio.disconnect()
    talker.close()
    proxy.close()


def redis_sent_bytes(redis):
    info = redis.command("INFO", "stats")
    return int(info.split("total_net_output_bytes:")[1].split()[0])


def test_a_login_reads_only_the_history_a_newcomer_can_get(make_server, redis):
    # History lives in Redis, 50 messages however long. A login's reply carries only the
    # newest that fit in what one server keeps for a newcomer (a quarter of the queue
    # limit, 500 kB here), not all of them: 50 long messages must not make every login
    # a 5 MB read.
    s = make_server("--redis", redis.url, "--inbound-rate", "0", "--queue-limit", "2000000")
    talker = Chatter(s)
    talker.nick
    for i in range(50):  # one at a time: the talker's own echoes stay within its 2 MB queue
        talker.say(f"{i} " + "x" * 100_000)
        talker.wait(lambda m: m.get("msg", "").startswith(f"{i} "), timeout=30)
    before = redis_sent_bytes(redis)
    newcomer = Chatter(s)
    newcomer.nick
    assert wait_until(lambda: newcomer.history, timeout=10)
    history = newcomer.history[0]
    assert 3 <= len(history) <= 5 and history[-1]["msg"].startswith("49 ")
    assert redis_sent_bytes(redis) - before < 1_000_000
    newcomer.close()
    talker.close()
