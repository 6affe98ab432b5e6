"""Engine.IO protocol 4 at /socket.io/, driven by hand: handshake, long-polling,
WebSocket, the upgrade between them, heartbeats, and every error answer."""
import json
import socket
import time

import pytest
import requests

from conftest import (Polling, close_overtaking_get, get_on_a_new_connection, http_answer, parked_get,
                      server_has_read, tries, wait_until)
from rawws import Closed, RawWS
from test_socketio import joined

LOGIN = '42["msg",{"username":'
HISTORY = '42["history",'


def body_error(r):
    return r.status_code, r.json()


def test_polling_handshake(server):
    r = requests.get(server.eio, params={"EIO": "4", "transport": "polling"}, timeout=5)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain")
    assert r.text[0] == "0"
    hs = json.loads(r.text[1:])
    assert set(hs) == {"sid", "upgrades", "pingInterval", "pingTimeout", "maxPayload"}
    assert len(hs["sid"]) == 20
    assert hs["upgrades"] == ["websocket"]
    assert (hs["pingInterval"], hs["pingTimeout"], hs["maxPayload"]) == (25000, 20000, 1000000)


def test_handshake_follows_flags(make_server):
    s = make_server("--ping-interval", "1234", "--ping-timeout", "567", "--max-payload", "4321")
    hs = Polling(s).handshake
    assert (hs["pingInterval"], hs["pingTimeout"], hs["maxPayload"]) == (1234, 567, 4321)


def test_websocket_handshake(server):
    ws = RawWS.engineio(server)
    assert ws.status == 101
    first = ws.recv_message()
    assert first[0] == "0"
    hs = json.loads(first[1:])
    assert hs["upgrades"] == [] and len(hs["sid"]) == 20
    ws.close()


def test_polling_batches_packets_both_ways(server):
    p = Polling(server)
    r = p.post('40\x1e42["msg",{"msg":"one"}]\x1e42["msg",{"msg":"two"}]')
    assert (r.status_code, r.text) == (200, "ok")
    packets = []
    for _ in tries(30, "five packets"):
        if len(packets) >= 5:
            break
        packets += p.packets()
    assert packets[0].startswith('40{"sid":"')
    assert packets[1].startswith(LOGIN)
    assert packets[2].startswith(HISTORY)
    assert '"msg":"one"' in packets[3] and '"msg":"two"' in packets[4]


def test_binary_over_polling_is_base64(server):
    p = Polling(server)
    p.post("40")
    assert len(p.packets()) == 3  # CONNECT answer, login, history
    r = p.post('451-["msg",{"file":{"_placeholder":true,"num":0}}]\x1ebAQIDBA==')
    assert r.status_code == 200
    packets = p.packets()
    assert packets[0].startswith('451-["msg",{"file":{"_placeholder":true,"num":0}')
    assert packets[1] == "bAQIDBA=="


def test_websocket_session(server):
    ws = RawWS.engineio(server)
    ws.recv_message()  # open
    ws.send_text("40")
    assert ws.recv_message().startswith('40{"sid":"')
    assert ws.recv_message().startswith(LOGIN)
    assert ws.recv_message().startswith(HISTORY)
    ws.send_text('42["msg",{"msg":"hi"}]')
    assert '"msg":"hi"' in ws.recv_message()
    ws.send_text('451-["msg",{"_placeholder":true,"num":0}]')
    ws.send_binary(b"\x00\x01\xff")
    assert ws.recv_message().startswith("451-")
    assert ws.recv_message() == b"\x00\x01\xff"
    ws.close()


def test_upgrade_from_polling(server):
    p = Polling(server)
    p.post("40")
    assert len(p.packets()) == 3
    waiting = parked_get(server, p.sid)
    ws = RawWS.engineio(server, f"EIO=4&transport=websocket&sid={p.sid}")
    assert ws.status == 101
    ws.send_text("2probe")
    assert ws.recv_message() == "3probe"
    assert http_answer(waiting) == (200, "6")  # the waiting GET is released with noop
    ws.send_text("5")
    ws.send_text('42["msg",{"msg":"over ws"}]')
    assert '"msg":"over ws"' in ws.recv_message()
    # polling is over for this sid
    assert body_error(p.get()) == (400, {"code": 3, "message": "Bad request"})
    assert body_error(p.post("40")) == (400, {"code": 3, "message": "Bad request"})
    # and a second WebSocket on the upgraded sid is closed at once, as Node does it: the
    # handshake completes, then a close frame without a code
    again = RawWS.engineio(server, f"EIO=4&transport=websocket&sid={p.sid}")
    assert again.status == 101
    assert again.expect_close() == 1005
    again.close()
    ws.send_text('42["msg",{"msg":"still here"}]')
    assert '"msg":"still here"' in ws.recv_message()
    ws.close()


def test_get_during_upgrade_gets_noop(server):
    p = Polling(server)
    p.post("40")
    p.packets()
    ws = RawWS.engineio(server, f"EIO=4&transport=websocket&sid={p.sid}")
    ws.send_text("2probe")
    assert ws.recv_message() == "3probe"
    start = time.monotonic()
    assert p.get().text == "6"
    assert time.monotonic() - start < 5.0  # at once, not after the 25 s ping interval
    ws.close()


def polling_member(server):
    """A long-polling client that has joined: its session, and the packets it has read up
    to its own login."""
    p = Polling(server)
    p.post("40")
    got = []
    for _ in tries(30, "its login"):
        if any(x.startswith(LOGIN) for x in got):
            break
        got += p.packets()
    return p, got


def test_nothing_lost_or_reordered_across_upgrade(server, chatters):
    """Messages broadcast while a client upgrades reach it exactly once, in order,
    partly by polling and partly by WebSocket."""
    talker = chatters(server, transports=["websocket"])
    p, got = polling_member(server)
    for i in range(20):
        talker.say(f"before {i}")
    ws = RawWS.engineio(server, f"EIO=4&transport=websocket&sid={p.sid}")
    ws.send_text("2probe")
    assert ws.recv_message() == "3probe"
    for i in range(20):
        talker.say(f"during {i}")
    time.sleep(0.2)
    # one last poll, as a client pausing its polling makes; the rest waits for the WebSocket
    got += [x for x in p.get().text.split("\x1e") if x != "6"]
    ws.send_text("5")
    for i in range(20):
        talker.say(f"after {i}")
    for _ in tries(30, "sixty messages"):
        if sum(1 for x in got if '"send msg"' in x) >= 60:
            break
        got.append(ws.recv_message())
    texts = [json.loads(x[2:])[1]["msg"] for x in got if '"send msg"' in x]
    expected = [f"{w} {i}" for w in ("before", "during", "after") for i in range(20)]
    assert texts == expected
    ws.close()


# Heartbeat timing. Lower bounds are exact (the server may not ping or give up early, and
# a slow machine only makes things later); upper bounds leave seconds for a loaded machine.
def test_heartbeat_over_polling(make_server):
    s = make_server("--ping-interval", "1000", "--ping-timeout", "600")
    p = Polling(s)
    for _ in range(3):
        start = time.monotonic()  # just after the last pong: the next ping is 1 s away
        assert p.packets(timeout=10) == ["2"]
        assert 0.7 < time.monotonic() - start < 4.0
        assert p.post("3").status_code == 200
    # no pong: the session is gone pingTimeout after the next ping
    start = time.monotonic()
    while True:
        r = p.get(timeout=10)
        if r.status_code != 200 or r.text == "1":
            break
        assert r.text == "2" and time.monotonic() - start < 10
    assert time.monotonic() - start > 1.0 + 0.6 - 0.3
    assert body_error(p.get()) == (400, {"code": 1, "message": "Session ID unknown"})


def test_heartbeat_over_websocket(make_server):
    s = make_server("--ping-interval", "300", "--ping-timeout", "600")
    ws = RawWS.engineio(s)
    ws.recv_message()
    for _ in range(3):
        assert ws.recv_message(timeout=5) == "2"
        ws.send_text("3")
    assert ws.recv_message(timeout=5) == "2"
    start = time.monotonic()
    assert ws.expect_close(timeout=10) is not None
    assert 0.6 - 0.15 < time.monotonic() - start < 0.6 + 3.0


def test_a_pong_that_takes_most_of_the_ping_timeout_is_in_time(make_server):
    # A client on a slow link answers each ping after a second; pingTimeout is 2 s, so
    # it stays (a server that gave up early would drop it).
    s = make_server("--ping-interval", "300", "--ping-timeout", "2000")
    ws = joined(s)
    for _ in range(3):
        assert ws.recv_message(timeout=5) == "2"
        time.sleep(1.0)  # the slow client, on purpose: half of pingTimeout
        ws.send_text("3")
    ws.send_text('42["msg",{"msg":"still here"}]')
    while (m := ws.recv_message(timeout=5)) == "2":
        ws.send_text("3")
    assert '"still here"' in m
    ws.close()


def test_other_packets_buy_one_more_ping_timeout_once(make_server):
    # As in Node: while a pong is awaited, the first other packet from the client moves
    # the deadline to pingTimeout after it; later ones do not. With pingTimeout 3 s: a
    # message 2 s after the ping, the pong 4 s after it (each a second from a deadline).
    s = make_server("--ping-interval", "300", "--ping-timeout", "3000")
    ws = joined(s)
    assert ws.recv_message(timeout=5) == "2"
    pinged = time.monotonic()
    time.sleep(2.0)  # the client is busy: it sends a message instead of its pong
    ws.send_text('42["msg",{"msg":"busy"}]')
    assert '"busy"' in ws.recv_message(timeout=5)
    time.sleep(max(0.0, pinged + 4.0 - time.monotonic()))  # past the first deadline (3 s)
    ws.send_text("3")                                      # within the new one (5 s)
    ws.send_text('42["msg",{"msg":"alive"}]')
    assert '"alive"' in ws.recv_message(timeout=5)
    # now it never answers, and keeps talking: one more pingTimeout, and it is gone
    assert ws.recv_message(timeout=5) == "2"
    pinged = time.monotonic()
    with pytest.raises(Closed):
        while time.monotonic() - pinged < 10.0:  # 0.4 + 3 s, and room for a slow machine
            ws.send_text('42["msg",{"msg":"talking"}]')
            try:
                while True:
                    ws.recv_message(timeout=0.4)
            except socket.timeout:
                pass
    assert time.monotonic() - pinged > 3.0 - 0.1  # (the server counts in whole ms)


def test_client_ping_is_refused_in_protocol_4(server):
    ws = RawWS.engineio(server)
    ws.recv_message()
    ws.send_text("2")  # in v4 only the server pings
    ws.expect_close()


@pytest.mark.parametrize("query,code,message", [
    ("EIO=4", 0, "Transport unknown"),
    ("EIO=4&transport=carrier-pigeon", 0, "Transport unknown"),
    ("transport=polling", 5, "Unsupported protocol version"),
    ("EIO=abc&transport=polling", 5, "Unsupported protocol version"),
    ("EIO=5&transport=polling", 5, "Unsupported protocol version"),
    ("EIO=4&transport=polling&sid=doesnotexist", 1, "Session ID unknown"),
    ("EIO=4&transport=polling&sid=" + "x" * 64, 1, "Session ID unknown"),  # not a handshake
    ("EIO=4&transport=polling&sid=" + "x" * 21, 1, "Session ID unknown"),
    ("EIO=4&transport=websocket", 3, "Bad request"),  # websocket without an upgrade
])
def test_bad_requests(server, query, code, message):
    r = requests.get(f"{server.eio}?{query}", timeout=5)
    assert r.status_code == 400
    assert r.headers["Content-Type"] == "application/json"
    assert r.json() == {"code": code, "message": message}


def test_handshake_must_be_get(server):
    for method in ("POST", "PUT", "DELETE"):
        r = requests.request(method, server.eio, params={"EIO": 4, "transport": "polling"},
                             timeout=5)
        assert body_error(r) == (400, {"code": 2, "message": "Bad handshake method"})


def test_other_methods_on_a_session(server):
    p = Polling(server)
    for method in ("PUT", "DELETE", "PATCH"):
        r = requests.request(method, server.eio, params=p.params(), timeout=5)
        assert body_error(r) == (400, {"code": 3, "message": "Bad request"})


def test_closed_sid_is_unknown(server):
    p = Polling(server)
    assert p.post("1").status_code == 200
    assert body_error(p.get()) == (400, {"code": 1, "message": "Session ID unknown"})


def test_wrong_transport_for_sid(server):
    p = Polling(server)
    r = requests.get(server.eio, params={"EIO": 4, "transport": "websocket", "sid": p.sid},
                     timeout=5)
    assert body_error(r) == (400, {"code": 3, "message": "Bad request"})
    r = requests.get(server.eio, params={"EIO": 3, "transport": "polling", "sid": p.sid},
                     timeout=5)
    assert body_error(r) == (400, {"code": 3, "message": "Bad request"})


def test_second_concurrent_get_closes_the_session(server):
    p = Polling(server)
    first = parked_get(server, p.sid)
    second = requests.get(server.eio, params=p.params(), timeout=5)
    assert body_error(second) == (400, {"code": 3, "message": "Bad request"})
    assert http_answer(first) == (200, "1")  # the waiting one gets a close packet
    assert p.get().status_code == 400


def test_second_concurrent_post_closes_the_session(server):
    p = Polling(server)
    slow = socket.create_connection((server.host, server.port))
    slow.sendall((f"POST /socket.io/?EIO=4&transport=polling&sid={p.sid} HTTP/1.1\r\n"
                  f"Host: x\r\nContent-Length: 100\r\n\r\n42").encode())
    assert wait_until(lambda: server_has_read(slow))
    r = requests.post(server.eio, params=p.params(), data=b"40", timeout=5)
    assert body_error(r) == (400, {"code": 3, "message": "Bad request"})
    assert p.get().status_code == 400
    slow.close()


def test_body_over_max_payload_is_refused(make_server):
    s = make_server("--max-payload", "1000")
    p = Polling(s)
    r = p.post("4" + "x" * 1000)
    assert r.status_code == 413  # as Node's engine.io answers
    r = p.post('40')
    assert r.status_code == 200  # the session lives on
    for _ in tries(30, "its login"):
        if any(x.startswith(LOGIN) for x in p.packets()):
            break
    exactly = '42["msg",{"msg":"%s"}]'
    exactly %= "y" * (1000 - len(exactly) + 2)
    assert len(exactly.encode()) == 1000
    assert p.post(exactly).status_code == 200  # a body of maxPayload bytes is fine
    assert any('"yyy' in x for x in p.packets())


def test_invalid_packet_closes_the_session(server):
    p = Polling(server)
    assert body_error(p.post("abc")) == (400, {"code": 3, "message": "Bad request"})
    assert p.get().status_code == 400


def test_invalid_utf8_closes_the_session(server):
    p = Polling(server)
    assert p.post(b'42["msg","\xff\xfe"]').status_code == 400
    assert p.get().status_code == 400


def test_close_packet_releases_waiting_get_with_noop(server):
    p = Polling(server)
    parked = parked_get(server, p.sid)
    assert p.post("1").status_code == 200
    assert http_answer(parked) == (200, "6")
    assert p.get().status_code == 400


def test_cancelled_long_poll_closes_the_session(server):
    p = Polling(server)
    raw = parked_get(server, p.sid)
    raw.close()
    assert wait_until(lambda: p.get().status_code == 400, timeout=10)


def test_websocket_invalid_packet_closes(server):
    ws = RawWS.engineio(server)
    ws.recv_message()
    ws.send_text("abc")
    ws.expect_close()


def test_websocket_close_packet(server):
    ws = RawWS.engineio(server)
    ws.recv_message()
    ws.send_text("1")
    ws.expect_close()


def test_a_long_poll_carries_at_most_16_packets(server):
    # python-engineio refuses a payload of more; the rest waits for the next GET
    talker = joined(server)
    p, got = polling_member(server)
    for i in range(40):
        talker.send_text(f'42["msg",{{"msg":"m{i}"}}]')
    for i in range(40):  # the talker's own copies: the poller's are queued by now
        while '"m%d"' % i not in (m := talker.recv_message()):
            assert m.startswith(LOGIN) or m == "2", m
    sizes, texts = [], []
    for _ in tries(30, "forty messages"):
        if len(texts) >= 40:
            break
        packets = p.packets()
        sizes.append(len(packets))
        texts += [json.loads(x[2:])[1]["msg"] for x in packets if '"msg":"m' in x]
    assert texts == [f"m{i}" for i in range(40)]
    assert max(sizes) == 16, sizes


def test_a_get_on_its_way_when_the_client_closes_gets_noop(server):
    # The chat server, as the protocol server (test_protocol.py): the close packet's POST a
    # hair ahead of the GET, on two connections opened first. The GET was on its way
    # before the close was answered: noop. Sent after the answer, on a kept-alive
    # connection or a new one: 400, as from Node.
    for fresh_after in (False, True):
        p = Polling(server)
        q = f"/socket.io/?EIO=4&transport=polling&sid={p.sid}"
        post, get = close_overtaking_get(server, q, b"1")
        assert post[0] == 200
        assert get == (200, "6")
        if fresh_after:
            assert get_on_a_new_connection(server, q)[0] == 400
        else:
            assert p.get().status_code == 400
    # nothing on its way: the GET after the answer is 400, even the first one
    for fresh in (False, True):
        p = Polling(server)
        assert p.post("1").status_code == 200
        if fresh:
            q = f"/socket.io/?EIO=4&transport=polling&sid={p.sid}"
            assert get_on_a_new_connection(server, q)[0] == 400
        else:
            assert p.get().status_code == 400
