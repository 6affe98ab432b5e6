#!/usr/bin/python3
"""Soak test: one chatroom binary under a steady, mixed load for a number of minutes.

    /usr/bin/python3 test/soak.py --minutes 2 --name normal ./chatroom
    /usr/bin/python3 test/soak.py --minutes 2 --name asan build/chatroom-asan

`make soak SOAK_MINUTES=N` runs it against the ASan+UBSan build and then against ./chatroom
and draws both runs with test/plot_soak.py into test/artifacts/soak.svg.

What runs against the server (all on loopback, tens of clients at most, everything stops
by itself at the end of the run):

  observers     four python-socketio clients that stay the whole run: WebSocket only,
                long-polling only, polling upgraded to WebSocket, and one with delta
                presence ({"presence": "delta"}). They check every message of the steady
                chatters (below): per chatter, sequence numbers must come 0, 1, 2, ... with
                none missing, repeated or out of order; and all of them must see the
                chatters' messages in one and the same order (the contract's "everyone sees
                one order"). An observer that is disconnected fails the run.
  chatters      three python-socketio clients (WebSocket, polling, upgrade) that stay the
                whole run and send, at a steady rate, the contract's message
                {"action": "send msg", "username": NAME, "msg": "soak CHATTER SEQ pad..."};
                they check what they receive exactly as observers do.
  churners      python-socketio clients that join and leave all the time, over WebSocket,
                long-polling and polling-then-upgrade, some with delta presence; each stays
                a moment, maybe says something, and disconnects politely.
  vanishers     raw sockets that join (WebSocket, polling, or a polling session half-way
                through its upgrade) and then vanish without a goodbye: closed (FIN), reset
                (RST), or simply silent until the server's heartbeat gives up on them.
  slow readers  raw WebSocket clients with a 4 KiB receive buffer that join, stop reading,
                and are reset after 20-90 s; nobody else may notice. (On loopback the
                server's socket send buffer grows to megabytes first, so they seldom reach
                --queue-limit; the queue-overflow drop is exercised all the time by the
                vanished long-pollers below, which joined and then stopped polling, and
                whose queues pass --queue-limit before the heartbeat ends them.)
  malformed     raw sockets sending garbage: random bytes, broken HTTP heads, bad Engine.IO
                requests and packets, bad Socket.IO packets, bad WebSocket frames.

The server's log (joins and leaves, with the reason of each leave) goes to
build/soak-NAME.stdout, its stderr to build/soak-NAME.stderr. Every --sample seconds it records the server's RSS (VmRSS), threads (Threads) and open
descriptors (/proc/PID/fd), and from /metrics the bytes queued to clients
(chatroom_queued_bytes) and the bytes clients make it hold (chatroom_memory_bytes), into
build/soak-NAME.csv.

PASS / FAIL. The run fails (exit 1) if any of these holds:

  1. A resource trends upward after warm-up. Warm-up is the first 20% of the run, but at
     least its first minute (and at most its first half): the server's steady state needs
     its reaping timeouts (10 s) and a first round of slow readers (20-90 s), and RSS
     climbs to its plateau meanwhile (malloc's arenas, and ASan's 16 MiB quarantine). The
     samples after it are cut into thirds. A = mean of the first third, B = mean of the
     last third, D = the least-squares slope over all post-warm-up samples times their
     time span (the rise a straight line fitted to them makes over the run). A metric
     trends upward when BOTH B - A > margin AND D > margin, where
         margin = max(absolute, relative x A):
         RSS            max(4 MiB, 10% of A)
         threads        1 (threads are a fixed pool: one lasting extra one is a leak)
         open fds       max(8, 25% of A)
         queued bytes   max(--queue-limit, 50% of A)  (a slow reader alone holds up to
                        --queue-limit until it is dropped)
         memory bytes   max(--queue-limit, 50% of A)
     (Both tests must agree, so that one spike at either end does not fail a run, while a
     real leak, which raises the level and the slope alike, does.)
  2. An observer or chatter lost a steady chatter's message, got one twice or out of
     order, was disconnected, or did not have every message by the end; or two of them
     saw the chatters' messages in different orders.
  3. The server's stderr has anything from a sanitizer ("ERROR: AddressSanitizer",
     "runtime error:", "LeakSanitizer", "ThreadSanitizer"), or the server did not exit 0
     within 10 s of SIGTERM at the end (LeakSanitizer runs then).
Otherwise it exits 0. --no-trend reports the trends without failing on them: `make tsan`
runs a minute of this mix against the ThreadSanitizer build, whose own bookkeeping grows,
and whose reports go to files (TSAN_OPTIONS log_path) that test/tsan_check.py reads.

Server flags: short heartbeats (--ping-interval 5000 --ping-timeout 5000), --connect-timeout
and --header-timeout of 10 s so that vanished and half-open clients are reaped within
seconds (the steady state comes within the warm-up even in a 2-minute run),
--max-payload 100000 with --queue-limit 262144 so that clients that stop reading are dropped
within seconds (the queue must hold one message of --max-payload), and --joins-per-minute
100000 because every client here comes from 127.0.0.1.
"""
import argparse
import csv
import json
import logging
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import socketio

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from rawws import RawWS, Closed  # noqa: E402

for name in ("socketio", "engineio", "socketio.client", "engineio.client", "websocket", "urllib3"):
    logging.getLogger(name).setLevel(logging.CRITICAL)

QUEUE_LIMIT = 262144
SANITIZER = re.compile(r"ERROR: AddressSanitizer|runtime error:|LeakSanitizer|ThreadSanitizer"
                       r"|UndefinedBehaviorSanitizer")
WARMUP = 0.20         # of the run...
WARMUP_MIN_S = 60.0   # ...but at least this long...
WARMUP_MAX = 0.50     # ...and at most this share of it
METRICS = [  # (csv column, label, absolute margin, relative margin)
    ("rss_kib", "RSS (KiB)", 4096, 0.10),
    ("threads", "threads", 1, 0.0),
    ("fds", "open fds", 8, 0.25),
    ("queued_bytes", "queued bytes", QUEUE_LIMIT, 0.50),
    ("memory_bytes", "memory bytes", QUEUE_LIMIT, 0.50),
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.c = {}

    def add(self, key, n=1):
        with self.lock:
            self.c[key] = self.c.get(key, 0) + n

    def snapshot(self):
        with self.lock:
            return dict(self.c)


STATS = Stats()
FAILURES = []
FAIL_LOCK = threading.Lock()


def fail(msg):
    with FAIL_LOCK:
        if len(FAILURES) < 200:
            FAILURES.append(msg)
    log("FAIL:", msg)


# ---- well-behaved clients ------------------------------------------------------------

def in_order_client(sio):
    """python-engineio 4.3 runs each message handler on a thread of its own, so handlers
    may run out of the order the server sent in (conftest.Chatter does the same)."""
    eio = sio.eio
    trigger = eio._trigger_event

    def in_order(event, *args, **kw):
        if event == "message":
            kw["run_async"] = False
        return trigger(event, *args, **kw)

    eio._trigger_event = in_order


SOAK_MSG = re.compile(r"^soak c(\d+) (\d+) ")


class Checker:
    """A client that stays the whole run and checks the steady chatters' messages."""

    def __init__(self, label, url, transports, auth=None, nchatters=3):
        self.label = label
        self.expected = [0] * nchatters
        self.order = []          # (chatter, seq) in arrival order
        self.lost = 0
        self.reordered = 0       # arrived after a later one of the same chatter (or twice)
        self.checked = 0
        self.nick = None
        self.disconnected = False
        self.ending = False
        self.lock = threading.Lock()
        self.sio = socketio.Client(reconnection=False)
        in_order_client(self.sio)
        self.sio.on("msg", self._on_msg)
        self.sio.on("disconnect", self._on_disconnect)
        self.sio.connect(url, transports=transports, auth=auth, wait_timeout=20)
        deadline = time.monotonic() + 20
        while self.nick is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.nick is None:
            raise RuntimeError(f"{label}: no login within 20 s")
        self.sid = self.sio.get_sid("/")  # the one the server's log names

    def _on_msg(self, data):
        if not isinstance(data, dict):
            return
        if self.nick is None:
            if data.get("action") == "login":
                self.nick = data.get("username")
            return
        if data.get("action") != "send msg":
            return
        m = SOAK_MSG.match(str(data.get("msg", "")))
        if not m:
            return
        k, seq = int(m.group(1)), int(m.group(2))
        with self.lock:
            self.checked += 1
            self.order.append((k, seq))
            exp = self.expected[k]
            if seq == exp:
                self.expected[k] = seq + 1
            elif seq > exp:
                self.lost += seq - exp
                fail(f"{self.label}: chatter {k}: got {seq}, expected {exp} ({seq - exp} lost)")
                self.expected[k] = seq + 1
            else:
                self.reordered += 1
                fail(f"{self.label}: chatter {k}: got {seq} after {exp - 1} (reordered or repeated)")

    def _on_disconnect(self):
        if not self.ending:
            self.disconnected = True
            fail(f"{self.label} ({self.nick}) was disconnected during the run")

    def close(self):
        self.ending = True
        try:
            self.sio.disconnect()
        except Exception:
            pass


class Chatter(Checker):
    def __init__(self, index, rate, *a, **kw):
        super().__init__(*a, **kw)
        self.index = index
        self.rate = rate
        self.sent = 0

    def run(self, stop):
        pad = "x" * 1000
        period = 1.0 / self.rate
        nxt = time.monotonic() + random.random() * period
        while not stop.is_set():
            delay = nxt - time.monotonic()
            if delay > 0:
                stop.wait(delay)
                if stop.is_set():
                    break
            nxt += period
            try:
                self.sio.emit("msg", {"action": "send msg", "username": self.nick,
                                      "msg": f"soak c{self.index} {self.sent} {pad}"})
                self.sent += 1
            except Exception as e:
                fail(f"{self.label}: emit failed: {e!r}")
                return


def churner(url, stop, seed):
    rnd = random.Random(seed)
    while not stop.is_set():
        mode = rnd.choice(["websocket", "polling", "upgrade"])
        transports = {"websocket": ["websocket"], "polling": ["polling"], "upgrade": None}[mode]
        auth = {"presence": "delta"} if rnd.random() < 0.3 else None
        sio = socketio.Client(reconnection=False)
        got_login = threading.Event()
        sio.on("msg", lambda d: got_login.set() if isinstance(d, dict) and d.get("action") == "login" else None)
        try:
            sio.connect(url, transports=transports, auth=auth, wait_timeout=10)
            if not got_login.wait(10):
                STATS.add("churn_no_login")
            else:
                STATS.add(f"churn_joined_{mode}")
                if mode == "upgrade":
                    # let the upgrade happen, or sometimes leave in the middle of it
                    stop.wait(rnd.choice([0.0, 0.05, 0.3, 1.0]))
                for _ in range(rnd.randrange(3)):
                    sio.emit("msg", {"action": "send msg", "username": "x", "msg": "churn hello"})
                stop.wait(rnd.uniform(0.2, 3.0))
        except Exception:
            STATS.add("churn_connect_failed")
        finally:
            try:
                sio.disconnect()
            except Exception:
                pass
        stop.wait(rnd.uniform(0.0, 0.5))


# ---- raw sockets -------------------------------------------------------------------

def rst_close(sock):
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def end_socket(sock, rnd):
    """Closes a socket the way a vanished client would: FIN or RST."""
    if rnd.random() < 0.5:
        rst_close(sock)
    else:
        try:
            sock.close()
        except OSError:
            pass


def http(host, port, raw, timeout=5.0, read=True):
    """Sends raw bytes on a new connection; returns (socket, what came back until the
    answer's end, a close, or the timeout)."""
    s = socket.create_connection((host, port), timeout=timeout)
    s.sendall(raw)
    data = b""
    if read:
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
                head, sep, body = data.partition(b"\r\n\r\n")
                if sep:
                    m = re.search(rb"(?i)content-length:\s*(\d+)", head)
                    if m and len(body) >= int(m.group(1)):
                        break
        except (socket.timeout, OSError):
            pass
    return s, data


def eio_handshake(host, port):
    s, data = http(host, port, f"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\n"
                               f"Host: {host}:{port}\r\n\r\n".encode())
    body = data.partition(b"\r\n\r\n")[2].decode("utf-8", "replace")
    sid = json.loads(body[1:].split("\x1e")[0])["sid"]
    return s, sid


def eio_request(sock, host, port, method, sid, body=b""):
    req = (f"{method} /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\n"
           f"Host: {host}:{port}\r\nContent-Type: text/plain;charset=UTF-8\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    sock.sendall(req)


def read_answer(sock, timeout=5.0):
    sock.settimeout(timeout)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            m = re.search(rb"(?i)content-length:\s*(\d+)", head)
            if m and len(body) >= int(m.group(1)):
                return data


def vanisher(host, port, stop, seed):
    """Clients that join and disappear without saying goodbye."""
    rnd = random.Random(seed)
    cases = ["ws_fin_or_rst", "ws_midframe", "polling_silent", "polling_rst_during_get",
             "upgrade_abandoned", "upgrade_rst", "ws_no_join"]
    while not stop.is_set():
        case = rnd.choice(cases)
        try:
            if case.startswith("ws"):
                ws = RawWS(host, port, "/socket.io/?EIO=4&transport=websocket", timeout=5)
                ws.recv_message()  # open
                if case != "ws_no_join":
                    ws.send_text("40")
                    ws.recv_message()  # CONNECT ack
                    stop.wait(rnd.uniform(0, 1.5))
                if case == "ws_midframe":
                    frame = RawWS.frame(0x1, '42["msg",{"msg":"half of it"}]')
                    ws.send_raw(frame[:rnd.randrange(1, len(frame))])
                end_socket(ws.sock, rnd)
            else:
                s, sid = eio_handshake(host, port)
                eio_request(s, host, port, "POST", sid, b"40")
                read_answer(s)
                eio_request(s, host, port, "GET", sid)
                read_answer(s)  # CONNECT ack (and maybe the login)
                if case == "polling_silent":
                    s.close()  # and never come back: the heartbeat must end it
                elif case == "polling_rst_during_get":
                    eio_request(s, host, port, "GET", sid)
                    stop.wait(rnd.uniform(0, 1.0))
                    rst_close(s)
                else:
                    ws = RawWS(host, port, f"/socket.io/?EIO=4&transport=websocket&sid={sid}",
                               timeout=5)
                    ws.send_text("2probe")
                    if rnd.random() < 0.5:
                        try:
                            ws.recv_message()  # 3probe
                        except (Closed, OSError):
                            pass
                    if case == "upgrade_rst":
                        if rnd.random() < 0.5:
                            ws.send_text("5")
                        rst_close(ws.sock)
                        rst_close(s)
                    else:  # abandoned half-way: both connections just close
                        ws.sock.close()
                        s.close()
            STATS.add(f"vanish_{case}")
        except (OSError, Closed, ValueError, KeyError, json.JSONDecodeError) as e:
            STATS.add(f"vanish_error_{case}")
            STATS.add("vanish_error_last:" + type(e).__name__)
        stop.wait(rnd.uniform(0.1, 0.5))


def slow_reader(host, port, stop, seed):
    """A WebSocket client with a tiny receive buffer that joins and stops reading."""
    rnd = random.Random(seed)
    while not stop.is_set():
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(5)
        try:
            s.connect((host, port))
            key = "c29hay1zbG93LXJlYWRlcg=="
            s.sendall((f"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: {host}\r\n"
                       f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                       f"Sec-WebSocket-Version: 13\r\n\r\n").encode())
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    raise Closed("handshake")
                data += chunk
            s.sendall(RawWS.frame(0x1, "40"))
            STATS.add("slow_reader_joined")
            # now never read again; hold it for a while, then reset it. The server drops
            # it first if its queue passes --queue-limit, once the kernel's buffers are
            # full too (on loopback the server's send buffer grows to megabytes): the
            # summary gives the count, chatroom_dropped_clients_total{reason="slow_reader"}.
            stop.wait(rnd.uniform(20, 90))
            STATS.add("slow_reader_reset")
        except (OSError, Closed) as e:
            STATS.add("slow_reader_error_" + type(e).__name__)
        finally:
            rst_close(s)
        stop.wait(rnd.uniform(0.5, 2))


def bad_inputs(host, port):
    """(name, bytes to send) of malformed requests that need no session."""
    H = f"Host: {host}:{port}\r\n"
    rnd = os.urandom
    return [
        ("random bytes", rnd(random.randrange(1, 3000))),
        ("random line", b"GET " + rnd(40) + b" HTTP/1.1\r\n\r\n"),
        ("no version", b"GET /\r\n\r\n"),
        ("bad method", b"FROB / HTTP/1.1\r\n" + H.encode() + b"\r\n"),
        ("http/0.9", b"GET /\n\n"),
        ("http/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        ("long header", b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n"),
        ("many headers", b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n"),
        ("half head", b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x"),
        ("nul in head", b"GET /\x00 HTTP/1.1\r\n\r\n"),
        ("bad content-length", b"POST /socket.io/?EIO=4&transport=polling&sid=x HTTP/1.1\r\n"
                               b"Content-Length: -5\r\n\r\nhello"),
        ("huge content-length", b"POST /socket.io/?EIO=4&transport=polling&sid=x HTTP/1.1\r\n"
                                b"Content-Length: 99999999999999999999\r\n\r\nhello"),
        ("bad chunked", b"POST /socket.io/?EIO=4&transport=polling&sid=x HTTP/1.1\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"),
        ("eio version 9", f"GET /socket.io/?EIO=9&transport=polling HTTP/1.1\r\n{H}\r\n".encode()),
        ("eio bad transport", f"GET /socket.io/?EIO=4&transport=carrier-pigeon HTTP/1.1\r\n{H}\r\n".encode()),
        ("eio unknown sid", f"GET /socket.io/?EIO=4&transport=polling&sid=AAAAAAAAAAAAAAAAAAAA HTTP/1.1\r\n{H}\r\n".encode()),
        ("eio bad sid chars", f"GET /socket.io/?EIO=4&transport=polling&sid=%00%ff%2e%2e HTTP/1.1\r\n{H}\r\n".encode()),
        ("eio put", f"PUT /socket.io/?EIO=4&transport=polling HTTP/1.1\r\n{H}Content-Length: 0\r\n\r\n".encode()),
        ("ws bad version", f"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\n{H}Upgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: x\r\nSec-WebSocket-Version: 99\r\n\r\n".encode()),
        ("ws no key", f"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\n{H}Upgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()),
        ("metrics junk query", f"GET /metrics?{'&' * 500} HTTP/1.1\r\n{H}\r\n".encode()),
        ("pipelined garbage", f"GET / HTTP/1.1\r\n{H}\r\n".encode() + rnd(500)),
    ]


BAD_EIO_BODIES = [b"x", b"4", b"9hello", b"4\xff\xfe", b"\x1e\x1e\x1e", b"4" + b"a" * 5000 + b"\x1e8",
                  b"b" + b"!!!notbase64", b"6", b"1", b"2probe", b"40/nonexistent,", b'42["msg"',
                  b'42{"a":1}', b"4Z", b'451-["msg",{"_placeholder":true,"num":5}]',
                  b'42["msg",' + b"[" * 200 + b"]" * 200 + b"]", b"41", b"43", b"44", b"40garbage"]

BAD_SIO_TEXT = ['42["msg"', "42{", "4Z", "4", '45-["msg"]', '451-["msg",{"_placeholder":true,"num":5}]',
                '42["msg",' + "[" * 100 + "]" * 100 + "]", "41/unknown,", "40/nope,", "49", "4" + "9" * 40,
                '42123456789012345678901234567890["msg",1]', '42["msg",{"msg":"\\ud800"}]', "x", "6", "3probe"]


def bad_ws_frames():
    f = RawWS.frame
    return [
        ("unmasked", f(0x1, "42[\"msg\",1]", mask=False)),
        ("rsv bits", f(0x1, "40", rsv=3)),
        ("opcode 3", f(0x3, "40")),
        ("continuation first", f(0x0, "40")),
        ("long ping", f(0x9, b"p" * 200)),
        ("fragmented ping", f(0x9, b"p", fin=False)),
        ("close code 999", f(0x8, struct.pack(">H", 999))),
        ("close 1-byte", f(0x8, b"\x03")),
        ("invalid utf-8", f(0x1, b"42[\"msg\",\"\xc3\x28\"]")),
        ("huge length", f(0x1, b"", length=1 << 62)),
        ("over max payload", f(0x1, b"", length=2_000_000)),
        ("text then text in fragment", f(0x1, "4", fin=False) + f(0x1, "0")),
        ("binary without attachment", f(0x2, b"\x04abc")),
        ("fragmented utf-8 split wrong", f(0x1, b"42[\"msg\",\"\xe2\x82", fin=False) + f(0x0, b"\xffx\"]")),
    ]


def malformed(host, port, stop, seed):
    rnd = random.Random(seed)
    while not stop.is_set():
        kind = rnd.choice(["http", "http", "eio_post", "sio_ws", "ws_frame", "sio_polling"])
        try:
            if kind == "http":
                name, raw = rnd.choice(bad_inputs(host, port))
                s, _ = http(host, port, raw, timeout=2.0, read=rnd.random() < 0.7)
                end_socket(s, rnd)
            elif kind in ("eio_post", "sio_polling"):
                s, sid = eio_handshake(host, port)
                if kind == "sio_polling":
                    eio_request(s, host, port, "POST", sid, b"40")
                    read_answer(s)
                name = rnd.randrange(len(BAD_EIO_BODIES))
                eio_request(s, host, port, "POST", sid, BAD_EIO_BODIES[name])
                try:
                    read_answer(s, timeout=2)
                except OSError:
                    pass
                end_socket(s, rnd)
            elif kind == "sio_ws":
                ws = RawWS(host, port, "/socket.io/?EIO=4&transport=websocket", timeout=3)
                ws.recv_message()
                if rnd.random() < 0.7:
                    ws.send_text("40")
                    ws.recv_message()
                name = rnd.randrange(len(BAD_SIO_TEXT))
                ws.send_text(BAD_SIO_TEXT[name])
                try:
                    ws.expect_close(timeout=2)
                except (AssertionError, OSError):
                    pass
                end_socket(ws.sock, rnd)
            else:
                ws = RawWS(host, port, "/socket.io/?EIO=4&transport=websocket", timeout=3)
                ws.recv_message()
                if rnd.random() < 0.5:
                    ws.send_text("40")
                    ws.recv_message()
                name, raw = rnd.choice(bad_ws_frames())
                ws.send_raw(raw)
                try:
                    ws.expect_close(timeout=2)
                except (AssertionError, OSError):
                    pass
                end_socket(ws.sock, rnd)
            STATS.add(f"malformed_{kind}")
        except (OSError, Closed, ValueError, KeyError, json.JSONDecodeError, IndexError):
            STATS.add(f"malformed_error_{kind}")
        stop.wait(rnd.uniform(0.05, 0.3))


# ---- the server and its samples --------------------------------------------------------

def read_proc(pid):
    """(VmRSS KiB, Threads, open fds, CPU seconds) of a process."""
    rss = threads = None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return rss, threads, fds, cpu


def read_metrics(port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        out[name] = float(value)
    return out


def warmup_end(duration):
    """Seconds of warm-up in a run of `duration` seconds (see the header)."""
    return min(max(duration * WARMUP, WARMUP_MIN_S), duration * WARMUP_MAX)


def trend(rows, key, abs_margin, rel_margin, t_key="t"):
    """(verdict, A, B, D, margin) for one metric, per the rule in this file's header."""
    n = len(rows)
    post = [r for r in rows if r[t_key] >= warmup_end(rows[-1][t_key])] if n else []
    if len(post) < 6:
        return ("too few samples", None, None, None, None)
    xs = [r[t_key] for r in post]
    ys = [float(r[key]) for r in post]
    third = len(post) // 3
    a = sum(ys[:third]) / third
    b = sum(ys[-third:]) / third
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    d = slope * (xs[-1] - xs[0])
    margin = max(abs_margin, rel_margin * a)
    up = (b - a > margin) and (d > margin)
    return ("UP" if up else "flat", a, b, d, margin)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("binary")
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--name", default=None, help="names build/soak-NAME.csv (default: the binary's)")
    ap.add_argument("--sample", type=float, default=None, help="seconds between samples (default: run/100, 2..10)")
    ap.add_argument("--chat-rate", type=float, default=4.0, help="messages a second per steady chatter")
    ap.add_argument("--churners", type=int, default=5)
    ap.add_argument("--vanishers", type=int, default=2)
    ap.add_argument("--slow-readers", type=int, default=2)
    ap.add_argument("--malformed", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "build"))
    ap.add_argument("--no-trend", action="store_true",
                    help="report the trends but do not fail on them (ThreadSanitizer's own memory grows)")
    args = ap.parse_args()

    name = args.name or Path(args.binary).name
    duration = args.minutes * 60
    sample_every = args.sample or min(10.0, max(2.0, duration / 100))
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    csv_path = outdir / f"soak-{name}.csv"
    err_path = outdir / f"soak-{name}.stderr"
    out_path = outdir / f"soak-{name}.stdout"

    host, port, mport = "127.0.0.1", free_port(), free_port()
    argv = [os.path.abspath(args.binary), "--host", host, "--port", str(port),
            "--metrics-address", f"{host}:{mport}",
            "--ping-interval", "5000", "--ping-timeout", "5000",
            "--connect-timeout", "10000", "--header-timeout", "10000",
            "--max-payload", "100000", "--queue-limit", str(QUEUE_LIMIT),
            "--joins-per-minute", "100000"]
    env = dict(os.environ,
               ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:quarantine_size_mb=16",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    log(f"soak {name}: {' '.join(argv)}; {args.minutes:g} min, a sample every {sample_every:g} s")
    with open(err_path, "wb") as err, open(out_path, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
    deadline = time.monotonic() + 30
    while True:
        try:
            read_metrics(mport)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                print(open(err_path).read())
                sys.exit(f"soak: {args.binary} did not start")
            time.sleep(0.1)

    url = f"http://{host}:{port}"
    stop_load = threading.Event()
    stop_chat = threading.Event()
    rows = []
    last_metrics = {}
    threads = []
    checkers = []
    try:
        observers = [Checker("observer websocket", url, ["websocket"]),
                     Checker("observer polling", url, ["polling"]),
                     Checker("observer upgrade", url, None),
                     Checker("observer delta", url, None, auth={"presence": "delta"})]
        chatters = [Chatter(0, args.chat_rate, "chatter 0 websocket", url, ["websocket"]),
                    Chatter(1, args.chat_rate, "chatter 1 polling", url, ["polling"]),
                    Chatter(2, args.chat_rate, "chatter 2 upgrade", url, None)]
        checkers = observers + chatters
        t0 = time.monotonic()
        for c in chatters:
            threads.append(threading.Thread(target=c.run, args=(stop_chat,), daemon=True))
        for i in range(args.churners):
            threads.append(threading.Thread(target=churner, args=(url, stop_load, 100 + i), daemon=True))
        for i in range(args.vanishers):
            threads.append(threading.Thread(target=vanisher, args=(host, port, stop_load, 200 + i), daemon=True))
        for i in range(args.slow_readers):
            threads.append(threading.Thread(target=slow_reader, args=(host, port, stop_load, 300 + i), daemon=True))
        for i in range(args.malformed):
            threads.append(threading.Thread(target=malformed, args=(host, port, stop_load, 400 + i), daemon=True))
        for t in threads:
            t.start()

        with open(csv_path, "w", newline="") as f:
            w = csv.writer(f)
            cols = ["t", "rss_kib", "threads", "fds", "queued_bytes", "memory_bytes", "clients_websocket",
                    "clients_polling", "room_members", "connections_total", "messages_total",
                    "dropped_total", "checked", "cpu_s"]
            w.writerow(cols)
            next_sample = t0
            last_report = t0
            while True:
                now = time.monotonic()
                if now - t0 >= duration:
                    break
                if now < next_sample:
                    time.sleep(min(next_sample - now, 0.5))
                    continue
                next_sample += sample_every
                if proc.poll() is not None:
                    fail(f"the server exited with {proc.returncode} during the run")
                    break
                try:
                    rss, nthreads, fds, cpu = read_proc(proc.pid)
                    m = read_metrics(mport)
                except (OSError, ValueError) as e:
                    fail(f"sampling failed: {e!r}")
                    continue
                row = {"t": round(now - t0, 2), "rss_kib": rss, "threads": nthreads, "fds": fds,
                       "queued_bytes": int(m.get("chatroom_queued_bytes", 0)),
                       "memory_bytes": int(m.get("chatroom_memory_bytes", 0)),
                       "clients_websocket": int(m.get('chatroom_clients{transport="websocket"}', 0)),
                       "clients_polling": int(m.get('chatroom_clients{transport="polling"}', 0)),
                       "room_members": int(m.get("chatroom_room_members", 0)),
                       "connections_total": int(m.get("chatroom_connections_total", 0)),
                       "messages_total": int(m.get("chatroom_messages_total", 0)),
                       "dropped_total": int(sum(v for k, v in m.items()
                                                if k.startswith("chatroom_dropped_clients_total"))),
                       "checked": sum(c.checked for c in checkers), "cpu_s": round(cpu, 2)}
                last_metrics.clear()
                last_metrics.update(m)
                rows.append(row)
                w.writerow([row[c] for c in cols])
                f.flush()
                if now - last_report >= 60 or len(rows) == 1:
                    last_report = now
                    log(f"  t={row['t']:.0f}s rss={rss} KiB threads={nthreads} fds={fds} "
                        f"queued={row['queued_bytes']} mem={row['memory_bytes']} members={row['room_members']} "
                        f"sessions={row['connections_total']} checked={row['checked']}")
    except Exception as e:
        fail(f"the soak itself failed: {e!r}")
    finally:
        stop_load.set()
        stop_chat.set()
        for t in threads:
            t.join(timeout=60)
        # every message sent must reach every checker
        sent = [c.sent for c in checkers if isinstance(c, Chatter)]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(
                c.expected != sent and not c.disconnected for c in checkers):
            time.sleep(0.2)
        for c in checkers:
            if c.expected != sent and not c.disconnected:
                missing = sum(s - e for s, e in zip(sent, c.expected))
                c.lost += max(0, missing)
                fail(f"{c.label}: {missing} messages never arrived (had {c.expected}, sent {sent})")
        orders = [(c.label, c.order) for c in checkers if not c.disconnected]
        disagree = 0
        for label, order in orders[1:]:
            if order != orders[0][1]:
                disagree += 1
                fail(f"{label} saw the chatters' messages in another order than {orders[0][0]}")
        for c in checkers:
            c.close()
        time.sleep(0.5)
        t_stop = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
            fail("the server did not exit within 10 s of SIGTERM")
        took = time.monotonic() - t_stop
        if code != 0:
            fail(f"the server exited with {code}")

    err_text = open(err_path, errors="replace").read()
    log_text = open(out_path, errors="replace").read()
    for c in checkers:
        if c.disconnected:  # what the server said about it (its join and leave lines)
            for line in log_text.splitlines():
                if f"(sid {c.sid})" in line:
                    print(f"  server log for {c.label}: {line}")
    if SANITIZER.search(err_text):
        fail(f"the sanitizer reported (see {err_path}): {SANITIZER.search(err_text).group(0)}")

    print()
    print(f"== soak {name}: {len(rows)} samples over {args.minutes:g} min ({csv_path}); warm-up "
          f"{warmup_end(rows[-1]['t']) if rows else 0:.0f} s")
    verdicts = {}
    for key, label, absm, relm in METRICS:
        v = trend(rows, key, absm, relm)
        verdicts[key] = v
        first, last = (rows[0][key], rows[-1][key]) if rows else (None, None)
        if v[1] is None:
            print(f"  {label:14} {v[0]}")
            if not args.no_trend:
                fail(f"{label}: too few samples to judge")
            continue
        print(f"  {label:14} start {first:>10} end {last:>10} | post-warm-up A={v[1]:.0f} B={v[2]:.0f} "
              f"B-A={v[2] - v[1]:+.0f} fit rise={v[3]:+.0f} margin={v[4]:.0f} -> {v[0]}")
        if v[0] == "UP" and not args.no_trend:
            fail(f"{label} trends upward after warm-up (A={v[1]:.0f}, B={v[2]:.0f}, fitted rise {v[3]:+.0f}, "
                 f"margin {v[4]:.0f})")
    checked = sum(c.checked for c in checkers)
    lost = sum(c.lost for c in checkers)
    reordered = sum(c.reordered for c in checkers)
    print(f"  steady messages sent: {sum(c.sent for c in checkers if isinstance(c, Chatter))}; "
          f"checked deliveries: {checked} over {len(checkers)} live clients; lost: {lost}; "
          f"reordered/repeated: {reordered}; order disagreements: {disagree}; "
          f"disconnected: {sum(c.disconnected for c in checkers)}")
    for c in checkers:
        print(f"    {c.label:22} checked {c.checked:7} lost {c.lost} reordered {c.reordered}"
              f"{' DISCONNECTED' if c.disconnected else ''}")
    print(f"  server: exit {code} {took:.1f} s after SIGTERM; sanitizer output: "
          f"{'YES' if SANITIZER.search(err_text) else 'none'}")
    drops = {k.split('"')[1]: int(v) for k, v in last_metrics.items()
             if k.startswith("chatroom_dropped_clients_total")}
    print("  server dropped (last sample):", ", ".join(f"{k}={v}" for k, v in drops.items()),
          f"; CPU {rows[-1]['cpu_s'] if rows else 0} s")
    print("  load:", ", ".join(f"{k}={v}" for k, v in sorted(STATS.snapshot().items())))
    summary = {"name": name, "minutes": args.minutes, "samples": len(rows),
               "warmup_s": round(warmup_end(rows[-1]["t"]), 1) if rows else None,
               "first": rows[0] if rows else None, "last": rows[-1] if rows else None,
               "trend": {k: v for k, v in verdicts.items()},
               "checked": checked, "lost": lost, "reordered": reordered, "disagree": disagree,
               "sent": sum(c.sent for c in checkers if isinstance(c, Chatter)),
               "exit": code, "stop_seconds": round(took, 2), "load": STATS.snapshot(), "dropped": drops,
               "failures": FAILURES}
    (outdir / f"soak-{name}.json").write_text(json.dumps(summary, indent=1))
    if FAILURES:
        print(f"== soak {name}: FAIL ({len(FAILURES)} problems)")
        for msg in FAILURES[:30]:
            print("   ", msg)
        sys.exit(1)
    print(f"== soak {name}: PASS")


if __name__ == "__main__":
    main()
