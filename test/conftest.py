"""Shared helpers for chatroom's tests.

Every test starts the real binary (./chatroom, or the build named by $CHATROOM, such as
the ASan+UBSan one) on a free loopback port and talks to it over real sockets: with
python-socketio's client, with raw HTTP, and with a raw WebSocket client of our own for
input no polite client would send. When a test ends, its servers are stopped with
SIGTERM; each must exit 0, promptly, with nothing from a sanitizer on stderr.
"""
import os
import queue
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests
import requests.adapters
import socketio

ROOT = Path(__file__).resolve().parent.parent
BINARY = os.environ.get("CHATROOM") or str(ROOT / "chatroom")
SANITIZER = re.compile(rb"AddressSanitizer|LeakSanitizer|UndefinedBehaviorSanitizer|runtime error:")


def have_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def netns_argv():
    """The command that runs a program in a network namespace of its own: unshare -n as
    root, unshare -rn (a user namespace too) otherwise; None if neither works here."""
    for argv in (["unshare", "-n"], ["unshare", "-rn"]):
        try:
            if subprocess.run(argv + ["true"], capture_output=True, timeout=10).returncode == 0:
                return argv
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_at_once(fn, calls, timeout=None):
    """Runs fn(*args) for every args in calls, each on its own thread, all at once, and
    waits for them all (at most `timeout` seconds each)."""
    threads = [threading.Thread(target=fn, args=args) for args in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)


def wait_until(predicate, timeout=5.0, interval=0.01):
    """Polls predicate until it returns something true; returns that, or None on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def line_reader(stream):
    """A child's output (a text stream), line by line: next_line(timeout) is its next line
    ("" once it has ended), and fails the test if none comes in time rather than hang it."""
    lines = queue.Queue()

    def pump():
        for line in stream:
            lines.put(line)
        lines.put("")

    threading.Thread(target=pump, daemon=True).start()

    def next_line(timeout=20.0):
        try:
            return lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line from the child within {timeout} s") from None
    return next_line


def tries(seconds, what):
    """For loops that wait for something to come, one step at a time:
        for _ in tries(10, "its login"): ...; if done: break
    runs the body again and again, and fails the test once `seconds` have passed, so
    that a server that never sends it makes a failure, not a test that hangs."""
    end = time.monotonic() + seconds
    while True:
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {seconds} s")
        yield


def proc_net_address(field):
    """(address, port) of an "ADDR:PORT" field of /proc/net/tcp or tcp6: the address in
    32-bit words of host byte order, in hex."""
    addr, port = field.rsplit(":", 1)
    raw = b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, len(addr), 8))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, raw), int(port, 16)


def server_ends(socks):
    """The server's ends of clients' connected sockets, as /proc/net/tcp lists them: for
    each socket, the fields of its line (split), or None if the server's end is gone."""
    def key(a):  # IPv4 in IPv6 (::ffff:127.0.0.1) as IPv4
        return (a[0].removeprefix("::ffff:"), a[1])

    want = {(key(sock.getsockname()[:2]), key(sock.getpeername()[:2])): i
            for i, sock in enumerate(socks)}
    found = [None] * len(socks)
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            i = want.get((key(proc_net_address(f[2])), key(proc_net_address(f[1]))))
            if i is not None:
                found[i] = f
    return found


def server_has_read(*socks):
    """True once the server has read everything each of `socks` (clients' connected
    sockets) sent it: its ends of those connections hold no unread bytes. Tests wait for
    this, not for a while, before they act on the assumption that a request has arrived."""
    return all(f is not None and int(f[4].split(":")[1], 16) == 0 for f in server_ends(socks))


EPOLLIN, EPOLLRDHUP = 0x1, 0x2000


def hang_up_watched(server):
    """The descriptors of connections the server's wire thread watches for a hang-up only:
    long-poll GETs that wait for packets (chatroom.c, conn_park). Read from the epoll set
    in /proc/PID/fdinfo, as {descriptor: the inode of its socket}."""
    proc = f"/proc/{server.proc.pid}"
    found = {}
    try:
        for n in os.listdir(f"{proc}/fdinfo"):
            for fd, events in re.findall(r"^tfd:\s+(\d+)\s+events:\s+([0-9a-f]+)",
                                         open(f"{proc}/fdinfo/{n}").read(), re.M):
                if int(events, 16) & (EPOLLIN | EPOLLRDHUP) == EPOLLRDHUP:
                    found[int(fd)] = os.readlink(f"{proc}/fd/{fd}")
    except OSError:  # a descriptor closed while we looked
        pass
    return found


def parked(server, sock):
    """True once the long-poll GET sent on `sock` waits in the server for packets (while
    a request is still on its way, it is being read or is with a worker)."""
    end = server_ends([sock])[0]
    return end is not None and f"socket:[{end[9]}]" in hang_up_watched(server).values()


def raw_request(server, request, source=None):
    """Sends an HTTP request (bytes) on a connection of its own and waits until the server
    has read it; returns the socket. http_answer(sock) reads what comes back."""
    sock = socket.create_connection((server.host, server.port),
                                    source_address=(source, 0) if source else None)
    sock.sendall(request)
    assert wait_until(lambda: server_has_read(sock), timeout=10), "the server did not read it"
    return sock


def parked_get(server, sid, eio=4, path="/socket.io/"):
    """A long-poll GET of session `sid` on a connection of its own, once the server holds
    it waiting for packets (not merely once it has arrived: until a worker has looked at
    it, the server does not know it is there). http_answer(sock) reads its answer."""
    sock = raw_request(server, f"GET {path}?EIO={eio}&transport=polling&sid={sid} "
                               f"HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert wait_until(lambda: parked(server, sock), timeout=10), "the GET was not parked"
    return sock


def close_overtaking_get(server, query, close_body):
    """A long-polling client's close packet POSTed a hair ahead of its GET (the race the
    official suites run): both connections opened first, the POST written first, the GET
    right behind it. `query` is the path and query string with the sid; returns the two
    answers, (status, body) each."""
    post, get = (socket.create_connection((server.host, server.port)) for _ in range(2))
    with post, get:
        post.sendall(f"POST {query} HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
                     f"Content-Length: {len(close_body)}\r\n\r\n".encode() + close_body)
        get.sendall(f"GET {query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        return http_answer(post), http_answer(get)


def get_on_a_new_connection(server, query):
    """(status, body) of a GET of `query` sent on a connection of its own."""
    with socket.create_connection((server.host, server.port)) as sock:
        sock.sendall(f"GET {query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        return http_answer(sock)


def http_answer(sock, timeout=10.0):
    """(status, body) of one answer read from sock; the body as text."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), b"0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split(b" ")[1]), body.decode("utf-8", "replace")


class Server:
    """One chatroom process."""

    def __init__(self, *args, host="127.0.0.1", port=None, binary=BINARY, cwd=None, env=None,
                 env_replace=None, prefix=(), add_address=True):
        """prefix: arguments between the binary and ours (qemu runs the real binary);
        env_replace: the whole environment instead of ours plus `env`; add_address=False:
        no --host and --port of ours, the caller's args say where it listens (host and
        port still say where to reach it)."""
        self.host = host
        self.port = port or free_port()
        address = ["--host", host, "--port", str(self.port)] if add_address else []
        self.argv = [binary, *prefix, *address, *args]
        self._out = tempfile.TemporaryFile()
        self._err = tempfile.TemporaryFile()
        full_env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:quarantine_size_mb=16",
                        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
        full_env.update(env or {})
        if env_replace is not None:
            full_env = env_replace
        self.proc = subprocess.Popen(self.argv, stdout=self._out, stderr=self._err,
                                     cwd=cwd, env=full_env)
        if not wait_until(self._accepting, timeout=30):
            self.proc.kill()
            raise RuntimeError(f"chatroom did not start: {self.stderr()}")

    def _accepting(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"chatroom exited with {self.proc.returncode}: {self.stderr()}")
        try:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            with socket.socket(family) as s:
                s.settimeout(0.2)
                s.connect((self.host, self.port))
            return True
        except OSError:
            return False

    @property
    def url(self):
        return f"http://{self.host}:{self.port}"

    @property
    def eio(self):
        return f"{self.url}/socket.io/"

    def stdout(self):
        self._out.seek(0)
        return self._out.read().decode("utf-8", "replace")

    def stderr(self):
        self._err.seek(0)
        return self._err.read().decode("utf-8", "replace")

    def wait_log(self, pattern, timeout=5.0, count=1):
        """Waits until `pattern` (a regex) matches `count` times in the server's output."""
        rx = re.compile(pattern)
        return wait_until(lambda: len(rx.findall(self.stdout())) >= count, timeout)

    def stop(self, sig=signal.SIGTERM, timeout=10.0):
        """Stops the server; returns (exit code, seconds it took)."""
        if self.proc.poll() is None:
            start = time.monotonic()
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None, timeout
            return self.proc.returncode, time.monotonic() - start
        return self.proc.returncode, 0.0

    def assert_clean_exit(self):
        code, took = self.stop()
        self._err.seek(0)
        err = self._err.read()
        assert not SANITIZER.search(err), err.decode("utf-8", "replace")
        assert code == 0, f"exit {code} after {took:.1f}s; stderr: {err[-2000:]!r}"
        # README promises a second; this bound only catches a server that hangs at the end
        # of every test, with room for a loaded machine and the sanitizer build.
        # (test_signal_disconnects_everyone_and_exits_0_quickly holds the promise itself.)
        assert took < 5.0, f"took {took:.2f}s to stop"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Remembers each phase's outcome on the test item, for fixtures to look at."""
    outcome = yield
    setattr(item, "rep_" + outcome.get_result().when, outcome.get_result())


@pytest.fixture
def make_server(request):
    """A factory of servers; every server it made must stop cleanly at the end. When the
    test failed, their output is shown with it."""
    servers = []

    def make(*args, **kw):
        s = Server(*args, **kw)
        servers.append(s)
        return s

    yield make
    failed = getattr(request.node, "rep_call", None) and request.node.rep_call.failed
    for s in servers:
        if failed:
            print(f"--- output of {' '.join(s.argv)}:\n{s.stdout()[-5000:]}{s.stderr()[-2000:]}")
        s.assert_clean_exit()


@pytest.fixture
def server(make_server):
    return make_server()


class Chatter:
    """A chat client as the original desktop client was: python-socketio's Client,
    taking its nickname from the first login it sees."""

    def __init__(self, server, transports=None, auth=None, connect=True, **client_args):
        self.server = server
        self.msgs = []
        self.times = []  # wall-clock arrival time of each msg
        self.history = []
        self.cond = threading.Condition()
        self.sio = socketio.Client(reconnection=False, **client_args)
        self._handle_in_order()
        self.sio.on("msg", self._on_msg)
        self.sio.on("history", self._on_history)
        if connect:
            self.sio.connect(server.url, transports=transports, auth=auth, wait_timeout=10)

    def _handle_in_order(self):
        """python-engineio 4.3 runs every message handler in a thread of its own, so
        handlers may run out of the order the server sent in. Tests check that order,
        so here handlers run on the reading thread, one after another."""
        eio = self.sio.eio
        trigger = eio._trigger_event

        def in_order(event, *args, **kw):
            if event == "message":
                kw["run_async"] = False
            return trigger(event, *args, **kw)

        eio._trigger_event = in_order

    def _on_msg(self, *args):
        with self.cond:
            self.msgs.append(args[0] if len(args) == 1 else list(args))
            self.times.append(time.time())
            self.cond.notify_all()

    def _on_history(self, data):
        with self.cond:
            self.history.append(data)
            self.cond.notify_all()

    def wait(self, predicate, timeout=5.0, start=0):
        """The first msg from index `start` on for which predicate holds."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for m in self.msgs[start:]:
                    if predicate(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching msg within {timeout}s; got {self.msgs[-5:]}")
                self.cond.wait(left)

    def wait_count(self, n, timeout=5.0):
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.msgs) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(self.msgs)} msgs, wanted {n}")
                self.cond.wait(left)
            return list(self.msgs)

    @property
    def nick(self):
        first = self.wait(lambda m: True)
        assert first.get("action") == "login", first
        return first["username"]

    @property
    def sid(self):
        return self.sio.get_sid("/")

    def say(self, text, callback=None):
        self.sio.emit("msg", {"action": "send msg", "username": self.nick, "msg": text},
                      callback=callback)

    def texts(self):
        with self.cond:
            return [m.get("msg") for m in self.msgs if m.get("action") == "send msg"]

    def close(self):
        if self.sio.connected:
            self.sio.disconnect()


@pytest.fixture
def chatters():
    """A factory of Chatters, all disconnected at the end."""
    made = []

    def make(server, **kw):
        c = Chatter(server, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


# ---- raw Engine.IO over HTTP ---------------------------------------------------------

class SourceAddress(requests.adapters.HTTPAdapter):
    """Makes a requests.Session connect from a given local address (any 127.x.y.z on
    loopback), as a client on another host would."""

    def __init__(self, source, **kw):
        self.source = source
        super().__init__(**kw)

    def init_poolmanager(self, *args, **kw):
        kw["source_address"] = (self.source, 0)
        super().init_poolmanager(*args, **kw)


class Polling:
    """A hand-driven Engine.IO long-polling session (protocol 4 unless told)."""

    def __init__(self, server, eio=4, handshake=True, source=None):
        self.server = server
        self.eio = eio
        self.http = requests.Session()
        if source:
            self.http.mount("http://", SourceAddress(source))
        self.sid = None
        if handshake:
            r = self.http.get(server.eio, params={"EIO": eio, "transport": "polling"}, timeout=5)
            assert r.status_code == 200, r.text
            self.open_body = r.text
            import json
            payload = r.text.split("\x1e")[0] if eio == 4 else r.text[r.text.index(":") + 1:]
            self.handshake = json.loads(payload[1:])
            self.sid = self.handshake["sid"]

    def params(self, **extra):
        p = {"EIO": self.eio, "transport": "polling"}
        if self.sid:
            p["sid"] = self.sid
        p.update(extra)
        return p

    def get(self, timeout=5, **extra):
        return self.http.get(self.server.eio, params=self.params(**extra), timeout=timeout)

    def post(self, body, timeout=5, headers=None, **extra):
        if isinstance(body, str):
            body = body.encode()
        return self.http.post(self.server.eio, params=self.params(**extra), data=body,
                              timeout=timeout, headers=headers)

    def packets(self, timeout=5):
        """GETs once and splits the payload into packets."""
        r = self.get(timeout=timeout)
        assert r.status_code == 200, (r.status_code, r.text)
        return r.text.split("\x1e")
