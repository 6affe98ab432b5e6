"""Socket.IO protocol 5 on top of Engine.IO 4, driven by hand over a raw WebSocket:
CONNECT with and without auth, unknown namespaces, events, acks, binary, DISCONNECT,
and malformed packets, each of which closes its own session and nothing else."""
import json
import time

import pytest

from conftest import tries
from rawws import RawWS, Closed

LOGIN = '42["msg",{"username":'


def joined(server, auth="", source=None, history=True):
    """A raw client that has joined the room; returns it with its nickname. history:
    whether the server sends newcomers the last messages (not with --history 0)."""
    ws = RawWS.engineio(server, source=source)
    assert ws.recv_message()[0] == "0"
    ws.send_text("40" + auth)
    answer = ws.recv_message()
    assert answer.startswith('40{"sid":"'), answer
    login = ws.recv_message()
    assert login.startswith(LOGIN)
    if history:
        assert ws.recv_message().startswith('42["history",')  # the last messages
    ws.sid = json.loads(answer[2:])["sid"]
    ws.nick = json.loads(login[2:])[1]["username"]
    return ws


def events(ws, n):
    return [ws.recv_message() for _ in range(n)]


def test_connect_without_and_with_auth(server):
    a = joined(server)
    b = joined(server, '{"token":"abc","presence":"full"}')
    assert len(a.sid) == 20 and len(b.sid) == 20 and a.sid != b.sid
    assert a.recv_message().startswith(LOGIN)  # b's login
    a.close()
    b.close()


def test_unknown_namespace_is_refused_and_the_session_lives(server):
    ws = RawWS.engineio(server)
    ws.recv_message()
    ws.send_text('40/admin,{"token":"x"}')
    assert ws.recv_message() == '44/admin,{"message":"Invalid namespace"}'
    ws.send_text("40")
    assert ws.recv_message().startswith('40{"sid":"')
    ws.close()


def test_event_with_ack(server):
    a = joined(server)
    a.send_text('4212["msg",{"msg":"ack me"}]')
    relayed, ack = events(a, 2)
    assert json.loads(relayed[2:]) == ["msg", {"msg": "ack me", "username": a.nick}]
    assert ack == "4312[]"
    a.close()


def test_binary_event_with_ack(server):
    a = joined(server)
    a.send_text('451-7["msg",{"msg":"pic","data":{"_placeholder":true,"num":0}}]')
    a.send_binary(b"\x89PNG")
    head, attachment, ack = events(a, 3)
    assert head.startswith("451-[")
    assert json.loads(head[4:])[1]["username"] == a.nick
    assert attachment == b"\x89PNG"
    assert ack == "437[]"
    a.close()


def test_disconnect_leaves_the_room_and_can_rejoin(server):
    a = joined(server)
    b = joined(server)
    assert a.recv_message().startswith(LOGIN)
    b.send_text("41")
    logout = json.loads(a.recv_message()[2:])[1]
    assert logout == {"action": "logout", "username": b.nick, "name_list": [[a.nick, a.sid]]}
    b.send_text("40")  # the Engine.IO session is still open
    assert b.recv_message().startswith('40{"sid":"')
    assert b.recv_message().startswith(LOGIN)
    assert b.recv_message().startswith('42["history",')
    a.close()
    b.close()


def test_other_events_are_ignored(server):
    a = joined(server)
    a.send_text('42["typing",true]')
    a.send_text('42["msg",{"msg":"marker"}]')
    assert '"marker"' in a.recv_message()  # nothing came before it
    a.close()


@pytest.mark.parametrize("packet", ['42/other,["msg",{}]', "40", '41/other,'])
def test_out_of_order_packets_close_the_session(server, packet):
    """A packet for a namespace not joined, or a second CONNECT: Node closes."""
    good = joined(server)
    bad = joined(server)
    assert good.recv_message().startswith(LOGIN)
    bad.send_text(packet)
    bad.expect_close()
    assert '"logout"' in good.recv_message()


def test_nothing_before_connect(server):
    ws = RawWS.engineio(server)
    ws.recv_message()
    ws.send_text('42["msg",{"msg":"too early"}]')
    ws.expect_close()


MALFORMED = [
    "4",                                   # an empty Socket.IO packet
    "49",                                  # unknown type
    "42{}",                                # EVENT data not an array
    "42[]",                                # no event name
    "42[null]",                            # event name neither a string nor a number
    '42["connect"]',                       # a reserved name
    '42["msg",',                           # broken JSON
    '42["msg","\\x"]',                     # bad escape
    '42["msg",tru]',                       # bad literal
    "42" + "[" * 100 + "]" * 100,          # too deep
    "40[1]",                               # CONNECT payload not an object
    "41{}",                                # DISCONNECT with a payload
    "44{}",                                # CONNECT_ERROR is the server's (Node closes too)
    '45-["msg"]',                          # binary without a count
    '450-["msg"]',                         # binary with zero attachments
    '451-["msg",{"_placeholder":true,"num":1}]',  # a placeholder with no attachment
    '451-["msg",{"_placeholder":true,"num":0.5}]',  # not whole: python-socketio would crash
    '4' + '2["msg","' + 'a' * 10 + '"]' + '\x00',  # trailing garbage
]


@pytest.mark.parametrize("packet", MALFORMED)
def test_malformed_packet_closes_only_that_session(server, packet):
    good = joined(server)
    bad = joined(server)
    assert good.recv_message().startswith(LOGIN)
    bad.send_text(packet)
    assert bad.expect_close() is not None
    logout = json.loads(good.recv_message()[2:])[1]
    assert logout["action"] == "logout" and logout["username"] == bad.nick
    good.send_text('42["msg",{"msg":"still fine"}]')
    assert '"still fine"' in good.recv_message()
    good.close()


def test_text_while_attachments_are_due_closes(server):
    ws = joined(server)
    ws.send_text('451-["msg",{"_placeholder":true,"num":0}]')
    ws.send_text('42["msg",{}]')
    ws.expect_close()


def test_binary_without_a_packet_closes(server):
    ws = joined(server)
    ws.send_binary(b"stray")
    ws.expect_close()


def test_a_session_that_never_joins_is_closed(make_server):
    s = make_server("--connect-timeout", "500", "--ping-interval", "200", "--ping-timeout", "1000")
    start = time.monotonic()  # before the session opens: its timeout counts from then
    ws = RawWS.engineio(s)
    ws.recv_message()
    with pytest.raises(Closed):
        while time.monotonic() - start < 10:  # answer pings, but never CONNECT
            if ws.recv_message(timeout=3) == "2":
                ws.send_text("3")
    assert 0.5 <= time.monotonic() - start < 3.0  # (seconds to spare for a loaded machine)


def test_connect_timeout_is_exact_even_between_heartbeats(make_server):
    # pings are 5 s apart: the connect timeout must not wait for one
    s = make_server("--connect-timeout", "600", "--ping-interval", "5000")
    start = time.monotonic()  # before the session opens: its timeout counts from then
    ws = RawWS.engineio(s)
    ws.recv_message()
    with pytest.raises(Closed):
        ws.recv_message(timeout=4.5)
    assert 0.6 <= time.monotonic() - start < 4.0  # the next ping would be at 5 s


def test_default_connect_timeout_is_45_seconds(make_server):
    # README: "--connect-timeout MS | 45000": a session that never joins is closed then,
    # not at a heartbeat after it (pings here are 10 s apart, so the one at 50 s is late).
    s = make_server("--ping-interval", "10000")
    start = time.monotonic()
    ws = RawWS.engineio(s)
    ws.recv_message()
    with pytest.raises(Closed):
        while time.monotonic() - start < 49.0:
            if ws.recv_message(timeout=max(0.01, 49.0 - (time.monotonic() - start))) == "2":
                ws.send_text("3")
    assert 45.0 <= time.monotonic() - start < 49.0


def test_leaving_the_room_keeps_the_engineio_session(make_server):
    # As in Node: after 41 the transport stays; the connect timeout was checked once,
    # when it came, and the client was in the room then.
    s = make_server("--connect-timeout", "300", "--ping-interval", "200", "--ping-timeout", "400")
    ws = joined(s)
    # two pings answered: the server's clock is past 400 ms, its connect check done
    for _ in range(2):
        while ws.recv_message(timeout=5) != "2":
            pass
        ws.send_text("3")
    ws.send_text("41")
    deadline = time.monotonic() + 1.5  # several heartbeats
    while time.monotonic() < deadline:
        m = ws.recv_message(timeout=2)
        if m == "2":
            ws.send_text("3")
    ws.send_text("40")
    for _ in tries(10, "the CONNECT answer"):
        if (m := ws.recv_message()).startswith("40"):
            break
        if m == "2":
            ws.send_text("3")
    assert m.startswith('40{"sid":"')
    ws.close()


def test_frames_sent_right_behind_the_upgrade_request_are_read(server):
    # A client may send its first frames without waiting for the 101.
    ws = RawWS.engineio(server, early=RawWS.frame(0x1, "40"))
    assert ws.recv_message()[0] == "0"
    assert ws.recv_message().startswith('40{"sid":"')
    assert ws.recv_message().startswith(LOGIN)
    ws.close()


# Packets socket.io-parser 4.2 (Node's server) accepts: the session must live on, and
# the room still answers. Each one closed the session before chatroom followed its rules.
ACCEPTED_BY_NODE = {
    "numeric-event-name": '42[7,"x"]',
    "event-without-data": "42",
    "ack-without-id": '43["x"]',
    "ack-for-nothing": "4399[]",
}


@pytest.mark.parametrize("name", list(ACCEPTED_BY_NODE))
def test_packets_node_accepts_keep_the_session(server, name):
    a = joined(server)
    a.send_text(ACCEPTED_BY_NODE[name])
    a.send_text('42["msg",{"msg":"still here"}]')
    assert json.loads(a.recv_message()[2:])[1]["msg"] == "still here"
    a.close()


def test_long_ack_id_comes_back_as_sent(server):
    a = joined(server)
    a.send_text('42123456789012345678901234["msg",{"msg":"big id"}]')
    relayed, ack = events(a, 2)
    assert json.loads(relayed[2:])[1]["msg"] == "big id"
    assert ack == "43123456789012345678901234[]"
    a.close()


def test_object_that_is_not_a_placeholder_is_data(server):
    a = joined(server)
    b = joined(server)
    a.recv_message()  # b's login
    a.send_text('451-["msg",{"blob":{"_placeholder":true,"num":0},'
                '"meta":{"_placeholder":false,"num":5}}]')
    a.send_binary(b"\x01\x02")
    head = b.recv_message()
    assert head.startswith("451-") and '"_placeholder":false' in head
    assert b.recv_message() == b"\x01\x02"
    a.close()
    b.close()


def test_too_many_attachments_close_the_session_as_in_node(server):
    watcher = joined(server)
    a = joined(server)
    watcher.recv_message()
    a.send_text('4511-["msg",{}]')  # socket.io-parser allows at most 10
    assert a.expect_close() is not None
    assert '"logout"' in watcher.recv_message()


def test_binary_as_base64_text_from_an_engineio_3_client(server):
    # socket.io-client 1.x (Engine.IO 3) without binary support sends an attachment as a
    # text frame "b4" + base64; Node relays it as binary, and so do we.
    old = RawWS.engineio(server, query="EIO=3&transport=websocket")
    assert old.recv_message()[0] == "0"          # open
    assert old.recv_message() == "40"            # protocol 4: in "/" at once
    assert old.recv_message().startswith(LOGIN)
    old.recv_message()                            # history
    new = joined(server)
    old.recv_message()                            # new's login
    old.send_text('451-["msg",{"file":{"_placeholder":true,"num":0}}]')
    old.send_text("b4AQL6")
    head = new.recv_message()
    assert head.startswith('451-["msg",{"file":{"_placeholder":true,"num":0}')
    assert new.recv_message() == b"\x01\x02\xfa"
    # and protocol 4 clients may do the same with "b" + base64
    new.send_text('451-["msg",{"file":{"_placeholder":true,"num":0}}]')
    new.send_text("bAQID")
    assert new.recv_message().startswith("451-")
    assert new.recv_message() == b"\x01\x02\x03"
    old.close()
    new.close()
