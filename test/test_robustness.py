"""No client can hurt the others: clients that vanish, stop reading, or send garbage at
every layer; a full room. The server must answer each with the protocol's error or a
clean disconnect, and everyone else must keep chatting."""
import json
import os
import socket
import subprocess
import textwrap
import time

import pytest
import requests
import socketio

from conftest import Polling, line_reader, tries, wait_until
from rawws import RawWS
from test_socketio import joined, LOGIN

# A fast heartbeat, with a pong deadline the python clients that watch keep on a loaded
# machine (a 300 ms one dropped them there).
FAST = ("--ping-interval", "400", "--ping-timeout", "2000")
WINDOW = 0.4 + 2.0 + 1.6  # pingInterval + pingTimeout + room for a loaded machine


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])


def logouts_of(chatter, nick):
    return [m for m in chatter.msgs if m.get("action") == "logout" and m["username"] == nick]


def test_client_that_stops_answering_pings_is_logged_out_once(make_server, chatters):
    s = make_server(*FAST)
    watcher = chatters(s, transports=["websocket"])
    mute = joined(s)  # a raw client that never answers a ping
    watcher.wait(lambda m: m.get("username") == mute.nick)
    start = time.monotonic()
    watcher.wait(lambda m: m.get("action") == "logout", timeout=3)
    assert time.monotonic() - start < WINDOW
    time.sleep(0.5)
    assert len(logouts_of(watcher, mute.nick)) == 1
    mute.close()


def test_long_poller_that_stops_polling_is_logged_out_once(make_server, chatters):
    s = make_server(*FAST)
    watcher = chatters(s, transports=["websocket"])
    p = Polling(s)
    p.post("40")
    login = [x for x in p.packets() if x.startswith(LOGIN)][0]
    nick = json.loads(login[2:])[1]["username"]
    start = time.monotonic()
    watcher.wait(lambda m: m.get("action") == "logout" and m["username"] == nick, timeout=3)
    assert time.monotonic() - start < WINDOW
    time.sleep(0.5)
    assert len(logouts_of(watcher, nick)) == 1


CLIENT = textwrap.dedent("""
    import socketio, sys, time
    c = socketio.Client(reconnection=False)
    c.on("msg", lambda d: print(d.get("username"), flush=True) if d.get("action") == "login" else None)
    c.connect(sys.argv[1], transports=None if sys.argv[2] == "default" else [sys.argv[2]])
    time.sleep(60)
""")


@pytest.mark.parametrize("transport", ["default", "websocket", "polling"])
def test_killed_client_is_logged_out_once(make_server, chatters, transport):
    s = make_server(*FAST)
    watcher = chatters(s, transports=["websocket"])
    proc = subprocess.Popen(["/usr/bin/python3", "-c", CLIENT, s.url, transport],
                            stdout=subprocess.PIPE, text=True)
    nick = line_reader(proc.stdout)().strip()
    watcher.wait(lambda m: m.get("username") == nick)
    time.sleep(0.3)  # let a default client finish its upgrade
    start = time.monotonic()
    proc.kill()
    proc.wait()
    watcher.wait(lambda m: m.get("action") == "logout" and m["username"] == nick, timeout=3)
    assert time.monotonic() - start < WINDOW
    time.sleep(0.5)
    assert len(logouts_of(watcher, nick)) == 1


def test_client_that_stops_reading_is_dropped_and_hurts_nobody(make_server, chatters):
    # (a long pingTimeout: python clients starved of CPU on a loaded machine may pong late;
    # the stalled client goes for its queue long before)
    s = make_server("--queue-limit", "524288", "--max-payload", "65536", "--flood-limit", "0",
                    "--inbound-rate", "0", "--ping-timeout", "60000")
    rx = [chatters(s, transports=["websocket"]), chatters(s, transports=["polling"])]
    # the stalled client: a raw WebSocket with a tiny receive buffer that never reads
    stalled = RawWS.engineio(s)
    stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.recv_message()
    stalled.send_text("40")
    sender = chatters(s, transports=["websocket"])
    for c in rx:
        c.wait(lambda m: m.get("username") == sender.nick)
    rss_before = rss_kib(s.proc.pid)
    # 10 MB: more than the kernel's socket buffers and the queue limit together can hold
    # for a client that never reads. Sent at about 500 messages a second, and never more
    # than 100 messages (200 kB) ahead of the slowest reader, so that a reader starved of
    # CPU on a loaded machine is not the one that falls 512 kB behind.
    def last_i(c):
        with c.cond:
            return next((m["i"] for m in reversed(c.msgs[-5:]) if "i" in m), -1)

    count = 5000
    for i in range(count):
        sender.sio.emit("msg", {"action": "send msg", "msg": "load", "i": i, "pad": "x" * 2000})
        if i % 50 == 49:
            time.sleep(0.1)
            # the sender reads its own messages too: it must not be the one left behind
            assert wait_until(lambda: all(last_i(c) >= i - 100 for c in rx + [sender]),
                              timeout=60), [last_i(c) for c in rx + [sender]]
    for c in rx:
        c.wait(lambda m: m.get("i") == count - 1, timeout=30)
        got = [m["i"] for m in c.msgs if m.get("msg") == "load"]
        assert got == list(range(count))
    # the stalled one went, and everybody was told
    out = rx[0].wait(lambda m: m.get("action") == "logout", timeout=10)
    assert out["username"] != sender.nick and len(out["name_list"]) == 3
    assert s.wait_log(r"leave .*outbound queue overflow")
    assert s.stdout().count("outbound queue overflow") == 1
    grown = rss_kib(s.proc.pid) - rss_before
    print(f"server RSS grew {grown} KiB")
    assert grown < (160 if "asan" in s.argv[0] else 8) * 1024  # ASan keeps freed memory
    stalled.close()


def test_while_one_client_stalls_the_others_get_messages_promptly(make_server, chatters):
    s = make_server("--flood-limit", "0")  # the stalled client lasts the whole test
    stalled = RawWS.engineio(s)
    stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.recv_message()
    stalled.send_text("40")
    a = chatters(s, transports=["websocket"])
    b = chatters(s, transports=["polling"])
    a.wait(lambda m: m.get("username") == b.nick)
    worst = 0.0
    for i in range(200):
        sent = time.monotonic()
        a.sio.emit("msg", {"action": "send msg", "msg": f"ping {i}", "pad": "y" * 4000})
        b.wait(lambda m: m.get("msg") == f"ping {i}", start=len(b.msgs) - 5)
        worst = max(worst, time.monotonic() - sent)
    # a stall that held others up would be seconds (the stalled client is never dropped
    # here); this bound leaves room for a loaded machine and the sanitizer build
    assert worst < 2.0, f"slowest message took {worst * 1000:.0f} ms"
    stalled.close()


def test_flooding_client_is_disconnected(make_server, chatters):
    s = make_server("--flood-limit", "10")
    steady = chatters(s, transports=["websocket"])
    flooder = chatters(s, transports=["websocket"])
    steady.wait(lambda m: m.get("username") == flooder.nick)
    for i in range(30):  # its bucket holds 20
        try:
            flooder.sio.emit("msg", {"msg": f"spam {i}"})
        except Exception:  # noqa: BLE001 - it may be gone before the loop ends
            break
    out = steady.wait(lambda m: m.get("action") == "logout", timeout=5)
    assert out["username"] == flooder.nick
    assert s.wait_log(r"leave .*excess flood")
    assert len([m for m in steady.msgs if str(m.get("msg", "")).startswith("spam")]) == 20
    for i in range(25):  # ten a second is fine for ever
        steady.say(f"steady {i}")
        time.sleep(0.1)
    steady.wait(lambda m: m.get("msg") == "steady 24")
    assert steady.sio.connected


def test_room_full_is_refused_in_words(make_server, chatters):
    s = make_server("--max-clients", "2")
    chatters(s)
    chatters(s, transports=["websocket"])
    refused = socketio.Client(reconnection=False)
    why = []
    refused.on("connect_error", lambda data: why.append(data))
    with pytest.raises(socketio.exceptions.ConnectionError):
        refused.connect(s.url, transports=["websocket"], wait_timeout=5)
    assert wait_until(lambda: why)
    assert why[0] == {"message": "room is full"}


def settled_session(server):
    """A polling session that joined the room and left it again: it keeps its place in
    the session table, as a client that joined once."""
    p = Polling(server)
    p.post("40")
    assert any(x.startswith("40") for x in p.packets())
    p.post("41")
    return p


def test_sessions_beyond_capacity_get_503(make_server):
    s = make_server("--max-clients", "1")  # 1 place, plus 16 sessions of slack
    held = [settled_session(s) for _ in range(17)]
    r = requests.get(s.eio, params={"EIO": 4, "transport": "polling"}, timeout=5)
    assert (r.status_code, r.json()) == (503, {"code": 3, "message": "server full"})
    ws = RawWS.engineio(s)
    assert ws.status == 503
    ws.close()
    held[0].post("1")  # one leaves: room again
    assert Polling(s).sid


def test_unjoined_sessions_make_way_for_newcomers(make_server):
    s = make_server("--max-clients", "1")
    idle = [Polling(s) for _ in range(17)]  # handshakes that never join
    assert chatters_like_join(s)  # the oldest of them makes way
    r = idle[0].get()
    assert r.status_code == 400 and r.json()["message"] == "Session ID unknown"
    assert idle[1].post("6").status_code == 200  # the others are still there


def chatters_like_join(server):
    p = Polling(server)
    p.post("40")
    return any(x.startswith('42["msg"') for x in p.packets())  # its login


DEEP = '42["msg",' + "[" * 10000 + "]" * 10000 + "]"


def next_message(ws, timeout=5.0):
    """The next message other than a ping (which is answered)."""
    while (m := ws.recv_message(timeout)) == "2":
        ws.send_text("3")
    return m


def deep_json_drops_the_sender_only(server):
    good = joined(server)
    bad = joined(server)
    next_message(good)
    bad.send_text(DEEP)  # parsed on the wire thread
    bad.expect_close()
    assert '"logout"' in next_message(good)
    p = Polling(server)  # parsed on a civetweb worker, with its smaller stack
    p.post("40")
    p.post(DEEP)  # "ok" from Engine.IO, as Node; Socket.IO then closes the session
    assert wait_until(lambda: p.get().status_code == 400, 10)
    assert '"login"' in next_message(good) and '"logout"' in next_message(good)
    p = Polling(server)
    p.post('40{"a":' + "[" * 10000 + "]" * 10000 + "}")  # in a CONNECT's auth too
    assert wait_until(lambda: p.get().status_code == 400, 10)
    good.send_text('42["msg",{"msg":"alive"}]')
    assert '"alive"' in next_message(good)


def test_deeply_nested_json_drops_the_sender_only(server):
    deep_json_drops_the_sender_only(server)


BAD_FRAMES = {  # name: (frame, the close code it earns)
    "unmasked": (lambda: RawWS.frame(0x1, "40", mask=False), 1002),
    "rsv-bit": (lambda: RawWS.frame(0x1, "40", rsv=4), 1002),  # no extension agreed
    "reserved-opcode": (lambda: RawWS.frame(0x3, "40"), 1002),
    "continuation-of-nothing": (lambda: RawWS.frame(0x0, "40"), 1002),
    "long-control": (lambda: RawWS.frame(0x9, "x" * 126), 1002),
    "fragmented-control": (lambda: RawWS.frame(0x9, "ping", fin=False), 1002),
    "text-not-utf8": (lambda: RawWS.frame(0x1, b"4\xff\xfe"), 1007),
    "declares-2GB": (lambda: RawWS.frame(0x2, b"", length=2_000_000_000), 1009),
    "one-byte-close": (lambda: RawWS.frame(0x8, b"\x03"), 1002),
}


@pytest.mark.parametrize("name", list(BAD_FRAMES))
def test_bad_frames_get_the_right_close_code(server, name):
    make_frame, code = BAD_FRAMES[name]
    other = joined(server)
    ws = RawWS.engineio(server)
    ws.recv_message()
    ws.send_raw(make_frame())
    assert ws.expect_close() == code
    other.send_text('42["msg",{"msg":"alive"}]')
    assert '"alive"' in other.recv_message()


def padded(size):
    """A Socket.IO msg event of exactly `size` bytes."""
    text = '42["msg",{"msg":"%s"}]'
    text %= "p" * (size - len(text) + 2)
    assert len(text) == size
    return text


def test_websocket_message_over_max_payload_is_closed_with_1009(make_server):
    # README: --max-payload is the largest WebSocket message. One of that size is relayed;
    # one byte more, whole or in fragments, closes the connection (1009) and nobody gets it.
    s = make_server("--max-payload", "1000")
    watcher = joined(s)
    for size, fragments in ((5000, 1), (1001, 1), (1200, 2)):
        sender = joined(s)
        assert watcher.recv_message().startswith(LOGIN)
        sender.send_text(padded(1000))
        assert '"ppp' in watcher.recv_message()
        big = padded(size)
        if fragments == 1:
            sender.send_text(big)
        else:
            sender.send_frame(0x1, big[:600], fin=False)
            sender.send_frame(0x0, big[600:], fin=True)
        assert sender.expect_close() == 1009, size
        logout = json.loads(watcher.recv_message()[2:])[1]  # and not the message
        assert logout["action"] == "logout" and logout["username"] == sender.nick


def test_default_flood_limit(server, chatters):
    # README: "--flood-limit N | 100": bursts of 200 are fine, a runaway script is not.
    steady = chatters(server, transports=["websocket"])
    flooder = joined(server)
    steady.wait(lambda m: m.get("username") == flooder.nick)
    flooder.send_raw(b"".join(RawWS.frame(0x1, f'42["msg",{{"msg":"f{i}"}}]') for i in range(1000)))
    steady.wait(lambda m: m.get("action") == "logout" and m["username"] == flooder.nick, timeout=10)
    assert server.wait_log(r"leave .*excess flood")
    relayed = [m for m in steady.msgs if str(m.get("msg", "")).startswith("f")]
    assert 200 <= len(relayed) < 1000, len(relayed)
    assert [m["msg"] for m in relayed] == [f"f{i}" for i in range(len(relayed))]


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1007, 1011, 1012, 1013, 1014, 3000, 4999])
def test_close_codes_a_peer_may_send_are_echoed(server, code):
    ws = joined(server)
    ws.send_frame(0x8, code.to_bytes(2, "big") + b"bye")
    assert ws.expect_close() == code


@pytest.mark.parametrize("code", [999, 1004, 1005, 1006, 1015, 2000, 5000])
def test_close_codes_a_peer_may_not_send_are_protocol_errors(server, code):
    ws = joined(server)
    ws.send_frame(0x8, code.to_bytes(2, "big"))
    assert ws.expect_close() == 1002


def test_websocket_control_frames_and_fragments(server):
    ws = joined(server)
    ws.send_frame(0x9, b"are you there")
    fin, op, payload = ws.recv_frame()
    assert (op, payload) == (0xA, b"are you there")
    msg = '42["msg",{"msg":"in three parts"}]'
    ws.send_frame(0x1, msg[:5], fin=False)
    ws.send_frame(0x9, b"between")             # control frames may come between fragments
    ws.send_frame(0x0, msg[5:12], fin=False)
    ws.send_frame(0x0, msg[12:], fin=True)
    assert ws.recv_frame()[1] == 0xA
    assert '"in three parts"' in ws.recv_message()
    ws.send_frame(0x8, b"\x03\xe8bye")
    assert ws.expect_close() == 1000


def next_event(ws, timeout=5.0):
    """The next Socket.IO event, answering the server's pings on the way."""
    for _ in tries(timeout, "a Socket.IO event"):
        m = ws.recv_message(timeout)
        if m == "2":
            ws.send_text("3")
        elif m.startswith("42"):
            return json.loads(m[2:])


def test_half_sent_frame_and_header_do_not_hang_anything(make_server):
    s = make_server(*FAST)
    a = joined(s)
    half = joined(s)
    a.recv_message()
    half.send_raw(RawWS.frame(0x1, "42" + "z" * 98)[:20])  # then silence
    slow = socket.create_connection((s.host, s.port))
    slow.sendall(b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\n")  # no end
    start = time.monotonic()
    said = 0
    logged_out = None
    while time.monotonic() - start < WINDOW + 0.5:
        a.send_text(f'42["msg",{{"msg":"{said}"}}]')
        event = next_event(a)
        while event[1].get("action") == "logout":
            logged_out = event[1]["username"]
            event = next_event(a)
        assert event[1]["msg"] == str(said)
        said += 1
        time.sleep(0.05)
    assert logged_out == half.nick  # its heartbeat ran out mid-frame
    assert half.expect_close() is not None
    slow.close()


GARBAGE = [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\n" + b"X-A: " + b"a" * 40000 + b"\r\n\r\n",
    b"POST /socket.io/?EIO=4&transport=polling&sid=x HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
    b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 8\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(200),  # a TLS hello
    os.urandom(4096),
]


def test_garbage_on_the_wire_while_others_chat(server, chatters):
    a = chatters(server, transports=["websocket"])
    b = chatters(server, transports=["polling"])
    a.wait(lambda m: m.get("username") == b.nick)
    for i, junk in enumerate(GARBAGE):
        with socket.create_connection((server.host, server.port)) as raw:
            raw.sendall(junk)
            raw.settimeout(3)
            try:
                answer = raw.recv(4096)
            except (socket.timeout, ConnectionResetError):
                answer = b""
            if answer:
                status = int(answer.split(b" ")[1])
                assert 400 <= status < 600, answer[:200]
        a.say(f"after garbage {i}")
        b.wait(lambda m: m.get("msg") == f"after garbage {i}")
