"""The protocol test server (test/protocol-server.c: make protocol-server), checked the way
the official Engine.IO and Socket.IO test suites check theirs, for Engine.IO 3 and 4:
handshakes, every 400, heartbeats and timeouts on both transports, payload framing and
binary over polling, the upgrade and its edge cases, namespaces, acks text and binary."""
import concurrent.futures
import json
import os
import time

import pytest
import requests

from conftest import ROOT, Server, close_overtaking_get, get_on_a_new_connection, http_answer, parked_get
from rawws import RawWS

PROTOCOL_SERVER = os.environ.get("PROTOCOL_SERVER") or str(ROOT / "build" / "protocol-server")
PING_INTERVAL, PING_TIMEOUT = 300, 200  # what the official suites expect of the server


@pytest.fixture(scope="module")
def ps():
    s = Server(binary=PROTOCOL_SERVER)
    yield s
    s.assert_clean_exit()


@pytest.fixture(scope="module")
def ps_calm():
    """The protocol server with a heartbeat of seconds, for tests of many steps that must
    not race its 300 ms pings on a loaded machine."""
    s = Server("--ping-interval", "10000", "--ping-timeout", "10000", binary=PROTOCOL_SERVER)
    yield s
    s.assert_clean_exit()


# The heartbeat tests: pings a second apart, and pongs may take two (the official 300 and
# 200 ms leave a client on a loaded machine no room to answer in time).
BEAT_INTERVAL, BEAT_TIMEOUT = 1000, 2000


@pytest.fixture(scope="module")
def ps_beat():
    s = Server("--ping-interval", str(BEAT_INTERVAL), "--ping-timeout", str(BEAT_TIMEOUT),
               binary=PROTOCOL_SERVER)
    yield s
    s.assert_clean_exit()


def url(s, path, **q):
    return f"{s.url}{path}?" + "&".join(f"{k}={v}" for k, v in q.items())


def v3_packets(body):
    """Splits a protocol 3 text payload "<len>:<packet>..." (lengths in UTF-16 units)."""
    out = []
    while body:
        n, _, rest = body.partition(":")
        n = int(n)
        units, i = 0, 0
        while units < n:
            units += 2 if ord(rest[i]) > 0xFFFF else 1
            i += 1
        out.append(rest[:i])
        body = rest[i:]
    return out


def v3_frame(*packets):
    return "".join(f"{len(p.encode('utf-16-le')) // 2}:{p}" for p in packets)


class Session:
    """A long-polling session on the protocol server, either protocol."""

    def __init__(self, s, eio, path="/engine.io/", **extra):
        self.s, self.eio, self.path = s, eio, path
        self.http = requests.Session()
        r = self.http.get(url(s, path, EIO=eio, transport="polling", **extra), timeout=5)
        assert r.status_code == 200, r.text
        self.first = self.split(r.text)
        self.handshake = json.loads(self.first[0][1:])
        self.sid = self.handshake["sid"]

    def split(self, body):
        return body.split("\x1e") if self.eio == 4 else v3_packets(body)

    def frame(self, *packets):
        return "\x1e".join(packets) if self.eio == 4 else v3_frame(*packets)

    def q(self, **extra):
        return url(self.s, self.path, EIO=self.eio, transport="polling", sid=self.sid, **extra)

    def get(self, **extra):
        return self.http.get(self.q(**extra), timeout=5)

    def post(self, *packets, raw=None, headers=None):
        body = raw if raw is not None else self.frame(*packets).encode()
        return self.http.post(self.q(), data=body, timeout=5, headers=headers)

    def packets(self):
        r = self.get()
        assert r.status_code == 200, r.text
        return self.split(r.text)


EIO = pytest.mark.parametrize("eio", [3, 4])


@EIO
@pytest.mark.parametrize("path", ["/engine.io/", "/socket.io/"])
def test_handshake(ps, eio, path):
    sess = Session(ps, eio, path)
    hs = sess.handshake
    assert set(hs) == {"sid", "upgrades", "pingInterval", "pingTimeout", "maxPayload"}
    assert hs["upgrades"] == ["websocket"]
    assert (hs["pingInterval"], hs["pingTimeout"], hs["maxPayload"]) == (PING_INTERVAL, PING_TIMEOUT,
                                                                         1000000)
    ws = RawWS(ps.host, ps.port, f"{path}?EIO={eio}&transport=websocket")
    assert json.loads(ws.recv_message()[1:])["upgrades"] == []
    ws.close()


@EIO
@pytest.mark.parametrize("query,code", [
    ("transport=polling", 5), ("EIO=abc&transport=polling", 5), ("EIO={eio}", 0),
    ("EIO={eio}&transport=abc", 0), ("EIO={eio}&transport=polling&sid=nope", 1),
    ("EIO={eio}&transport=websocket", 3),
])
def test_every_400(ps, eio, query, code):
    r = requests.get(f"{ps.url}/engine.io/?" + query.format(eio=eio), timeout=5)
    assert r.status_code == 400 and r.json()["code"] == code


@EIO
def test_bad_handshake_methods(ps, eio):
    for method in ("POST", "PUT"):
        r = requests.request(method, url(ps, "/engine.io/", EIO=eio, transport="polling"), timeout=5)
        assert r.status_code == 400 and r.json() == {"code": 2, "message": "Bad handshake method"}


@EIO
@pytest.mark.parametrize("query", ["transport=websocket", "EIO=abc&transport=websocket",
                                   "EIO={eio}", "EIO={eio}&transport=abc"])
def test_websocket_refusals(ps, eio, query):
    ws = RawWS(ps.host, ps.port, "/engine.io/?" + query.format(eio=eio))
    assert ws.status == 400
    ws.close()


@EIO
def test_echo_over_polling_with_batching_and_binary(ps, eio):
    sess = Session(ps, eio, **({"b64": 1} if eio == 3 else {}))  # binary as base64 text
    binary = "bAQIDBA==" if eio == 4 else "b4AQIDBA=="
    r = sess.post("4hello", "4€ and 😀", binary)
    assert (r.status_code, r.text) == (200, "ok")
    assert sess.packets() == ["4hello", "4€ and 😀", binary]


def test_protocol_3_framing_counts_utf16_units(ps):
    sess = Session(ps, 3)
    sess.post("4😀")
    r = sess.get()
    assert r.text == "3:4😀"  # one character outside the BMP counts two


def test_protocol_3_binary_payloads(ps):
    """Without b64=1, protocol 3 sends and takes XHR2 binary payloads."""
    sess = Session(ps, 3)
    body = bytes([0, 6, 0xFF]) + b"4hello" + bytes([1, 5, 0xFF, 4, 1, 2, 3, 4])
    r = sess.post(raw=body, headers={"Content-Type": "application/octet-stream"})
    assert r.text == "ok"
    r = sess.get()
    assert r.headers["Content-Type"] == "application/octet-stream"
    assert r.content == body
    # with b64=1 the same comes back as text
    sess64 = Session(ps, 3, b64=1)
    sess64.post(raw=body, headers={"Content-Type": "application/octet-stream"})
    r = sess64.get(b64=1)
    assert r.headers["Content-Type"].startswith("text/plain")
    assert r.text == "6:4hello10:b4AQIDBA=="


def test_protocol_4_refuses_binary_bodies(ps):
    sess = Session(ps, 4)
    r = sess.post(raw=b"\x00\x01", headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 400
    assert sess.get().status_code == 400


@EIO
def test_echo_over_websocket(ps, eio):
    ws = RawWS(ps.host, ps.port, f"/engine.io/?EIO={eio}&transport=websocket")
    ws.recv_message()
    ws.send_text("4hello")
    assert ws.recv_message() == "4hello"
    if eio == 4:
        ws.send_binary(b"\x01\x02\x03\x04")
        assert ws.recv_message() == b"\x01\x02\x03\x04"
    else:  # protocol 3 puts the packet type before binary data
        ws.send_binary(b"\x04\x01\x02\x03\x04")
        assert ws.recv_message() == b"\x04\x01\x02\x03\x04"
    ws.close()


def gone_at(sess, timeout=15.0):
    """Long-polls a session that sends no heartbeat (a GET is none) until the server ends
    it; returns when that was seen (time.monotonic())."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        r = sess.get()
        if r.status_code == 400 or "1" in sess.split(r.text):
            return time.monotonic()
    raise AssertionError(f"the session lived on for {timeout} s without a heartbeat")


def test_heartbeat_protocol_3_polling(ps_beat):
    sess = Session(ps_beat, 3)
    for _ in range(3):
        last_ping = time.monotonic()
        assert sess.post("2").status_code == 200
        assert sess.get().text == "1:3"
    # no ping in time: gone pingInterval + pingTimeout after the last one, not before
    assert gone_at(sess) - last_ping > (BEAT_INTERVAL + BEAT_TIMEOUT) / 1000 - 0.1
    assert sess.post("2").status_code == 400


def test_heartbeat_protocol_3_websocket(ps_beat):
    ws = RawWS(ps_beat.host, ps_beat.port, "/engine.io/?EIO=3&transport=websocket")
    ws.recv_message()
    for _ in range(3):
        ws.send_text("2probe-free")
        assert ws.recv_message() == "3probe-free"
        time.sleep(0.2)  # the client's pace
    start = time.monotonic()
    ws.expect_close(timeout=15)
    assert time.monotonic() - start < (BEAT_INTERVAL + BEAT_TIMEOUT) / 1000 + 3.0


def test_heartbeat_protocol_4_both_transports(ps_beat):
    sess = Session(ps_beat, 4)
    for _ in range(3):
        assert sess.packets() == ["2"]
        sess.post("3")
    ws = RawWS(ps_beat.host, ps_beat.port, "/engine.io/?EIO=4&transport=websocket")
    ws.recv_message()
    for _ in range(3):
        assert ws.recv_message(timeout=5) == "2"
        ws.send_text("3")
    ws.expect_close(timeout=15)  # stop answering: closed after pingTimeout
    gone_at(sess)  # the polling one too
    assert sess.get().status_code == 400


@EIO
def test_client_close_answers_its_poll_with_noop_whichever_arrives_first(ps, eio):
    # A client sends its close packet in a POST while its GET is on the way on another
    # connection (the official suites do exactly that): the GET gets noop, then 400.
    parked = Session(ps, eio)
    waiting = concurrent.futures.ThreadPoolExecutor(1).submit(parked.get)
    time.sleep(0.2)  # not a bound: the GET may be parked or not yet; both must pass
    assert parked.post("1").status_code == 200
    assert (waiting.result().status_code, parked.split(waiting.result().text)) == (200, ["6"])
    assert parked.get().status_code == 400
    # the close ahead of the GET: both connections opened first, the POST written first,
    # the GET right behind it. The GET was on its way before the close was answered, so
    # it gets what it would have got had it come first; one sent after the answer, on a
    # kept-alive connection or a new one, gets 400, as from Node.
    for fresh_after in (False, True):
        late = Session(ps, eio)
        q = f"{ps_path(late)}&sid={late.sid}"
        post, (status, text) = close_overtaking_get(ps, q, late.frame("1").encode())
        assert post[0] == 200
        assert (status, late.split(text)) == (200, ["6"])
        if fresh_after:
            assert get_on_a_new_connection(ps, q)[0] == 400
        else:
            assert late.get().status_code == 400
    # sent after the answer, nothing on its way: 400 at once, on a new connection too
    closed = Session(ps, eio)
    assert closed.post("1").status_code == 200
    assert get_on_a_new_connection(ps, f"{ps_path(closed)}&sid={closed.sid}")[0] == 400
    # a session the server ended gives nothing to a late GET
    ended = Session(ps, eio)
    assert ended.post(raw=b"garbage").status_code == 400
    assert ended.get().status_code == 400


def ps_path(sess):
    return f"{sess.path}?EIO={sess.eio}&transport=polling"


@EIO
def test_upgrade_and_its_edge_cases(ps_calm, eio):
    ps = ps_calm
    sess = Session(ps, eio)
    waiting = parked_get(ps, sess.sid, eio, path="/engine.io/")
    ws = RawWS(ps.host, ps.port, f"/engine.io/?EIO={eio}&transport=websocket&sid={sess.sid}")
    ws.send_text("2probe")
    assert ws.recv_message() == "3probe"
    status, body = http_answer(waiting)
    assert (status, sess.split(body)) == (200, ["6"])  # the waiting GET is released
    assert sess.split(sess.get().text) == ["6"]       # a GET during the upgrade: noop
    second = RawWS(ps.host, ps.port, f"/engine.io/?EIO={eio}&transport=websocket&sid={sess.sid}")
    assert (second.status, second.expect_close()) == (101, 1005)  # a second probe: closed
    second.close()
    ws.send_text("5")
    ws.send_text("4after")
    assert ws.recv_message() == "4after"
    assert sess.get().status_code == 400              # a GET after the upgrade
    third = RawWS(ps.host, ps.port, f"/engine.io/?EIO={eio}&transport=websocket&sid={sess.sid}")
    assert (third.status, third.expect_close()) == (101, 1005)  # on an upgraded sid: closed
    third.close()
    ws.send_text("4still")
    assert ws.recv_message() == "4still"
    ws.close()


def test_probe_that_never_upgrades_is_closed(make_server):
    s = make_server()
    from conftest import Polling
    p = Polling(s)
    ws = RawWS.engineio(s, f"EIO=4&transport=websocket&sid={p.sid}")
    ws.send_text("2probe")
    assert ws.recv_message() == "3probe"
    ws.send_text("4not an upgrade")  # anything but 5 ends the probe; polling goes on
    ws.expect_close()
    assert p.post("40").status_code == 200


# ---- Socket.IO ----

def sio(ps, eio=4):
    ws = RawWS(ps.host, ps.port, f"/socket.io/?EIO={eio}&transport=websocket")
    ws.binary = eio
    ws.recv_message()
    return ws


def next_packet(ws):
    while True:
        m = ws.recv_message()
        if m not in ("2", "3"):
            return m


def test_connect_main_and_custom_with_auth(ps):
    ws = sio(ps)
    ws.send_text("40")
    assert set(json.loads(next_packet(ws)[2:])) == {"sid"}
    assert next_packet(ws) == '42["auth",{}]'
    ws.send_text('40/custom,{"token":"abc"}')
    answer = next_packet(ws)
    assert answer.startswith('40/custom,{"sid":"')
    assert next_packet(ws) == '42/custom,["auth",{"token":"abc"}]'
    ws.send_text("40/random")
    assert next_packet(ws) == '44/random,{"message":"Invalid namespace"}'
    ws.close()


def test_protocol_4_clients_are_in_main_at_once(ps):
    ws = sio(ps, 3)
    assert next_packet(ws) == "40"
    assert next_packet(ws) == '42["auth",{}]'
    ws.send_text("40/custom")
    assert next_packet(ws) == "40/custom,"
    assert next_packet(ws) == '42/custom,["auth",{}]'
    ws.send_text("40/random")
    assert next_packet(ws) == '44/random,"Invalid namespace"'
    ws.close()


def test_message_back_and_acks(ps):
    ws = sio(ps)
    ws.send_text("40")
    next_packet(ws), next_packet(ws)
    ws.send_text('42["message",1,"2",{"3":[true]}]')
    assert next_packet(ws) == '42["message-back",1,"2",{"3":[true]}]'
    ws.send_text('42456["message-with-ack",1,"2",{"3":[false]}]')
    assert next_packet(ws) == '43456[1,"2",{"3":[false]}]'
    ws.send_text('452-["message",{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]')
    ws.send_binary(b"\x01\x02\x03")
    ws.send_binary(b"\x04\x05\x06")
    assert next_packet(ws) == '452-["message-back",{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]'
    assert next_packet(ws) == b"\x01\x02\x03" and next_packet(ws) == b"\x04\x05\x06"
    ws.send_text('452-789["message-with-ack",{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]')
    ws.send_binary(b"\x01\x02\x03")
    ws.send_binary(b"\x04\x05\x06")
    assert next_packet(ws) == '462-789[{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]'
    assert next_packet(ws) == b"\x01\x02\x03" and next_packet(ws) == b"\x04\x05\x06"
    ws.close()


def test_disconnect_from_custom_keeps_main(ps):
    ws = sio(ps)
    ws.send_text("40")
    next_packet(ws), next_packet(ws)
    ws.send_text("40/custom,")
    next_packet(ws), next_packet(ws)
    ws.send_text("41/custom,")
    ws.send_text('42["message","to main"]')
    assert next_packet(ws) == '42["message-back","to main"]'
    ws.send_text('42/custom,["message","to custom"]')  # not joined any more: closed
    ws.expect_close()


@pytest.mark.parametrize("packet", ["4abc", "42{}", '42abc["message-with-ack",1]', "4"])
def test_invalid_socketio_packets_close(ps, packet):
    ws = sio(ps)
    ws.send_text("40")
    next_packet(ws), next_packet(ws)
    ws.send_text(packet)
    ws.expect_close()


def test_socketio_over_polling_protocol_3_with_binary(ps):
    sess = Session(ps, 3, "/socket.io/", b64=1)
    got = sess.first[1:]
    while len(got) < 2:
        got += sess.split(sess.get(b64=1).text)
    assert got[:2] == ["40", '42["auth",{}]']
    sess.post('451-["message",{"_placeholder":true,"num":0}]', "b4AQID")
    got = []
    while len(got) < 2:
        got += sess.split(sess.get(b64=1).text)
    assert got == ['451-["message-back",{"_placeholder":true,"num":0}]', "b4AQID"]
