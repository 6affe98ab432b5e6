"""The chat contract (../shared/chat-contract.md, summed up in README.md), with real
python-socketio clients on every transport."""
import json
import threading
import time

import pytest
import socketio

from conftest import ROOT, Chatter, all_at_once, wait_until
from rawws import Closed, RawWS

TRANSPORTS = [None, ["websocket"], ["polling"]]  # None: polling, then the upgrade
LIST_NAMES = {line.strip() for line in (ROOT / "name.txt").read_text("utf-8").splitlines()
              if line.strip()}


def logins(c):
    return [m for m in c.msgs if m.get("action") == "login"]


def test_join_login_and_name_list(server, chatters):
    a, b, c = (chatters(server, transports=t) for t in TRANSPORTS)
    for x in (a, b, c):
        x.wait_count(1)
        first = x.msgs[0]
        assert first["action"] == "login"  # its own login comes first
        assert first["name_list"][-1] == [first["username"], x.sid]
    c_login = a.wait(lambda m: m.get("username") == c.nick and m["action"] == "login")
    b.wait(lambda m: m.get("username") == c.nick and m["action"] == "login")
    assert c_login["name_list"] == [[a.nick, a.sid], [b.nick, b.sid], [c.nick, c.sid]]
    assert set(c_login) == {"username", "action", "name_list"}
    assert [m["username"] for m in logins(a)] == [a.nick, b.nick, c.nick]
    assert [m["username"] for m in logins(b)] == [b.nick, c.nick]
    assert [m["username"] for m in logins(c)] == [c.nick]
    assert len({a.nick, b.nick, c.nick}) == 3
    assert {a.nick, b.nick, c.nick} <= LIST_NAMES


def test_messages_are_relayed_with_the_senders_name(server, chatters):
    a, b, c = (chatters(server, transports=t) for t in TRANSPORTS)
    c.wait_count(1)
    a.wait(lambda m: m.get("username") == c.nick)
    honest = {"action": "send msg", "username": a.nick, "msg": "hello 😀 你好"}
    a.sio.emit("msg", honest)
    for x in (a, b, c):
        assert x.wait(lambda m: m.get("msg") == "hello 😀 你好") == honest
    liar = {"action": "send msg", "username": a.nick, "msg": "I am b", "extra": [1, 2.5, None]}
    b.sio.emit("msg", liar)
    for x in (a, b, c):
        got = x.wait(lambda m: m.get("msg") == "I am b")
        assert got == dict(liar, username=b.nick)
    # no username at all: one is added
    c.sio.emit("msg", {"action": "send msg", "msg": "anonymous?"})
    assert a.wait(lambda m: m.get("msg") == "anonymous?")["username"] == c.nick


def test_username_cannot_be_smuggled(server, chatters):
    """Duplicate keys and escaped keys: receivers' JSON parsers keep the last duplicate
    and decode escapes, so the server must catch both."""
    a = chatters(server, transports=["websocket"])
    import websocket  # a raw Socket.IO client, for JSON python-socketio would not write
    ws = websocket.create_connection(f"ws://{server.host}:{server.port}/socket.io/?EIO=4&transport=websocket")
    ws.recv()
    ws.send("40")
    ws.recv()
    ws.recv()  # login
    ws.send('42["msg",{"username":"x","msg":"dup","username":"Mallory","user\\u006eame":"Eve"}]')
    got = a.wait(lambda m: m.get("msg") == "dup")
    me = a.wait(lambda m: m.get("action") == "login" and m["username"] != a.nick)["username"]
    assert got == {"username": me, "msg": "dup"}
    ws.close()


def test_data_that_is_not_an_object_is_relayed_as_sent(server, chatters):
    a = chatters(server)
    b = chatters(server, transports=["websocket"])
    a.wait(lambda m: m.get("username") == b.nick)
    for data in ["just text", 42, 1.5, [1, "two", {"username": "kept"}, None], True]:
        b.sio.emit("msg", data)
        assert a.wait(lambda m, d=data: m == d, start=0) == data


def test_numbers_are_relayed_exactly(server, chatters):
    a = chatters(server)
    b = chatters(server, transports=["websocket"])
    a.wait(lambda m: m.get("username") == b.nick)
    data = {"big": 123456789012345678901234567890, "tiny": 1e-300, "pi": 3.141592653589793,
            "neg": -0.0, "msg": "numbers"}
    b.sio.emit("msg", data)
    got = a.wait(lambda m: m.get("msg") == "numbers")
    assert got == dict(data, username=b.nick)
    assert type(got["big"]) is int


def test_ack_when_asked(server, chatters):
    a = chatters(server, transports=["polling"])
    b = chatters(server)
    acked = threading.Event()
    a.say("please ack", callback=lambda *args: acked.set() if args == () else None)
    assert acked.wait(5)
    b.wait(lambda m: m.get("msg") == "please ack")


def test_binary_is_relayed_as_binary(server, chatters):
    a = chatters(server, transports=["polling"])
    b = chatters(server, transports=["websocket"])
    c = chatters(server)
    c.wait_count(1)
    a.wait(lambda m: m.get("username") == c.nick)
    blob = bytes(range(256)) * 10
    a.sio.emit("msg", {"action": "send msg", "username": a.nick, "msg": "file",
                       "file": blob, "more": [b"\x00", b""]})
    for x in (a, b, c):
        got = x.wait(lambda m: m.get("msg") == "file")
        assert got["file"] == blob and got["more"] == [b"\x00", b""]
        assert got["username"] == a.nick


def test_logout_frees_the_name(make_server, tmp_path, chatters):
    names = tmp_path / "names.txt"
    names.write_text("Alpha\nBeta\n", "utf-8")
    s = make_server("--names", str(names))
    a = chatters(s)
    b = chatters(s, transports=["websocket"])
    a.wait(lambda m: m.get("username") == b.nick)
    b_nick, b_sid = b.nick, b.sid
    b.close()
    out = a.wait(lambda m: m.get("action") == "logout")
    assert out == {"action": "logout", "username": b_nick, "name_list": [[a.nick, a.sid]]}
    c = chatters(s, transports=["polling"])
    assert c.nick == b_nick  # the only free name
    assert c.sid != b_sid


def test_when_every_name_is_taken_a_suffix_keeps_names_unique(make_server, tmp_path, chatters):
    names = tmp_path / "names.txt"
    names.write_text("\n  Otter  \n\nHeron\r\n", "utf-8")  # white space and blank lines
    s = make_server("--names", str(names))
    clients = [chatters(s, transports=["websocket"]) for _ in range(6)]
    nicks = [c.nick for c in clients]
    assert len(set(nicks)) == 6
    assert set(nicks[:2]) == {"Otter", "Heron"}
    for n in nicks[2:]:
        base, _, k = n.partition("#")
        assert base in {"Otter", "Heron"} and int(k) >= 2


def test_everyone_sees_one_order(server, chatters):
    clients = [chatters(server, transports=TRANSPORTS[i % 3]) for i in range(5)]
    last = clients[-1].nick
    for c in clients:
        c.wait(lambda m: m.get("username") == last)
    start = [len(c.msgs) for c in clients]

    def talk(c, i):
        for k in range(20):
            c.say(f"{i}:{k}")

    all_at_once(talk, [(c, i) for i, c in enumerate(clients)])
    seqs = []
    for c, s0 in zip(clients, start):
        c.wait_count(s0 + 100, timeout=10)
        seqs.append([m["msg"] for m in c.msgs[s0:]])
    assert all(seq == seqs[0] for seq in seqs)
    for i in range(5):  # each sender's own messages keep their order
        assert [m for m in seqs[0] if m.startswith(f"{i}:")] == [f"{i}:{k}" for k in range(20)]


def test_fifty_clients_connecting_at_once(server):
    clients = [Chatter(server, transports=TRANSPORTS[i % 3], connect=False) for i in range(50)]
    errors = []

    def go(c):
        try:
            c.sio.connect(server.url, transports=c.__dict__.get("_t"), wait_timeout=10)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    for i, c in enumerate(clients):
        c._t = TRANSPORTS[i % 3]
    all_at_once(go, [(c,) for c in clients], timeout=20)
    try:
        assert not errors
        # the last login anyone sees lists all fifty, in join order
        for c in clients:
            c.wait(lambda m: m.get("action") == "login" and len(m["name_list"]) == 50, timeout=10)
        order = [n for n, _ in clients[0].wait(
            lambda m: m.get("action") == "login" and len(m["name_list"]) == 50)["name_list"]]
        assert len(set(order)) == 50
        by_nick = {c.nick: c for c in clients}
        assert set(by_nick) == set(order)
        for c in clients:
            seen = [m["username"] for m in logins(c)]
            mine = order.index(c.nick)
            assert seen == order[mine:]  # its own first, then every later one once, in order
            assert dict(c.msgs[0]["name_list"])[c.nick] == c.sid
    finally:
        for c in clients:
            c.close()


def test_desktop_client_flow(server, chatters):
    """The original desktop client: default transports, its name from the first login,
    then send, see the message come back, disconnect."""
    watcher = chatters(server, transports=["websocket"])
    desktop = socketio.Client(reconnection=False)
    seen = []
    own = {}
    got_back = threading.Event()

    @desktop.on("msg")
    def on_msg(data):
        seen.append(data)
        if "me" not in own and data.get("action") == "login":
            own["me"] = data["username"]
        if data.get("action") == "send msg" and data.get("msg") == "hi from the desktop":
            got_back.set()

    desktop.connect(server.url, wait_timeout=10)
    assert wait_until(lambda: "me" in own)
    me = own["me"]
    assert me == seen[0]["username"]
    desktop.emit("msg", {"action": "send msg", "username": me, "msg": "hi from the desktop"})
    assert got_back.wait(5)
    shown = [m for m in seen if m.get("action") == "send msg"][0]
    assert (shown["username"], shown["msg"]) == (me, "hi from the desktop")
    assert desktop.transport() == "websocket"  # it upgraded
    desktop.disconnect()
    out = watcher.wait(lambda m: m.get("action") == "logout")
    assert out["username"] == me
    assert out["name_list"] == [[watcher.nick, watcher.sid]]
    assert server.wait_log(rf"join +{me} ") and server.wait_log(rf"leave {me} ")


def test_history_for_newcomers(make_server, chatters):
    s = make_server("--history", "3")
    a = chatters(s, transports=["websocket"])
    for i in range(5):
        a.say(f"old {i}")
    a.sio.emit("msg", {"msg": "with a file", "file": b"\x00\x01"})  # binary: not kept
    a.wait(lambda m: m.get("msg") == "with a file")
    b = chatters(s, transports=["polling"])
    assert b.wait(lambda m: True)["username"] == b.nick  # its login first, as the contract says
    assert wait_until(lambda: b.history)
    assert b.history == [[{"action": "send msg", "username": a.nick, "msg": f"old {i}"}
                          for i in (2, 3, 4)]]
    assert not a.history or a.history == [[]]  # a came to an empty room


def test_history_can_be_turned_off(make_server, chatters):
    s = make_server("--history", "0")
    a = chatters(s, transports=["websocket"])
    a.say("before")
    a.wait(lambda m: m.get("msg") == "before")
    b = chatters(s, transports=["websocket"])
    b.nick
    a.say("after")
    b.wait(lambda m: m.get("msg") == "after")
    assert b.history == []


def test_delta_presence(server, chatters):
    """A client that asks for deltas gets the whole name_list in its own login only;
    legacy clients in the same room keep getting whole lists."""
    # (the one who leaves is on WebSocket: python-engineio's polling client sometimes
    # loses its close packet, and then only the heartbeat would tell)
    legacy = chatters(server, transports=["polling"])
    d = chatters(server, transports=["websocket"], auth={"presence": "delta"})
    own = d.wait(lambda m: True)  # the first msg it gets
    assert own["action"] == "login" and own["username"] == d.nick
    assert own["name_list"] == [[legacy.nick, legacy.sid], [d.nick, d.sid]]
    other = chatters(server, transports=["websocket"])
    got = d.wait(lambda m: m.get("username") == other.nick)
    assert got == {"action": "login", "username": other.nick, "sid": other.sid}
    full = legacy.wait(lambda m: m.get("username") == other.nick)
    assert len(full["name_list"]) == 3
    other_nick, other_sid = other.nick, other.sid
    other.close()
    gone = d.wait(lambda m: m.get("action") == "logout")
    assert gone == {"action": "logout", "username": other_nick, "sid": other_sid}
    assert "name_list" in legacy.wait(lambda m: m.get("action") == "logout")
    legacy.say("still one room")
    assert d.wait(lambda m: m.get("msg") == "still one room")["username"] == legacy.nick


def test_history_default_is_the_last_50(server, chatters):
    a = chatters(server, transports=["websocket"])
    for i in range(60):
        a.say(f"old {i}")
    a.wait(lambda m: m.get("msg") == "old 59")
    b = chatters(server, transports=["websocket"])
    assert wait_until(lambda: b.history)
    assert [m["msg"] for m in b.history[0]] == [f"old {i}" for i in range(10, 60)]


def test_name_list_stays_in_join_order_after_someone_leaves(server, chatters):
    a, b, c, d = (chatters(server, transports=["websocket"]) for _ in range(4))
    a.wait(lambda m: m.get("username") == d.nick)
    b_nick = b.nick
    b.close()
    out = a.wait(lambda m: m.get("action") == "logout")
    assert [n for n, _ in out["name_list"]] == [a.nick, c.nick, d.nick]
    e = chatters(server, transports=["polling"])
    own = e.wait(lambda m: True)
    assert own["name_list"] == [[a.nick, a.sid], [c.nick, c.sid], [d.nick, d.sid], [e.nick, e.sid]]
    assert b_nick not in [n for n, _ in own["name_list"]]


def raw_member(server, history=True):
    """A client on a raw WebSocket that has joined; returns (ws, its nickname)."""
    ws = RawWS.engineio(server)
    ws.recv_message()
    ws.send_text("40")
    assert ws.recv_message().startswith("40")
    nick = json.loads(ws.recv_message()[2:])[1]["username"]
    if history:
        ws.recv_message()
    return ws, nick


def test_ack_only_after_the_message_is_queued_for_everyone(make_server, chatters):
    """README: "A client that asks for an acknowledgement gets one once the message is
    queued for everyone": the sender's own copy comes before its ack, everyone gets the
    message, and a message that is refused (a flooder's) gets no ack."""
    s = make_server("--flood-limit", "2")  # a bucket of 4
    others = [chatters(s, transports=t) for t in (["websocket"], ["polling"])]
    sender, nick = raw_member(s)
    for o in others:
        o.wait(lambda m: m.get("username") == nick)
    for k in (1, 2, 3):
        sender.send_text(f'42{k}["msg",{{"msg":"ack {k}"}}]')
    got = [sender.recv_message() for _ in range(6)]
    for k in (1, 2, 3):
        own = next(i for i, g in enumerate(got) if f'"ack {k}"' in g)
        assert got.index(f"43{k}[]") > own, got
    for o in others:
        o.wait(lambda m: m.get("msg") == "ack 3")
    # then a burst past the bucket: the sender is dropped for flooding (its queue with
    # it, so it may miss acks it was due), and what was refused is acknowledged to nobody
    for k in range(4, 24):
        sender.send_text(f'42{k}["msg",{{"msg":"ack {k}"}}]')
    tail = []
    with pytest.raises((Closed, ConnectionResetError)):
        while True:
            tail.append(sender.recv_message(timeout=10))
    acked = {int(t[2:-2]) for t in tail if isinstance(t, str) and t.startswith("43")}
    for o in others:
        o.wait(lambda m: m.get("action") == "logout" and m["username"] == nick)
        relayed = {int(m["msg"][4:]) for m in o.msgs if str(m.get("msg", "")).startswith("ack ")}
        assert acked <= relayed, (acked, relayed)
        assert not relayed >= set(range(4, 24)), "the flooder's messages were all taken"
    assert s.wait_log(r"leave .*excess flood")


def test_logins_logouts_and_messages_in_one_order(make_server, chatters):
    """README: "Everyone sees logins, logouts and messages in one and the same order":
    while one client talks fast, others come and go, on every transport."""
    # (a short heartbeat: a polling visitor whose close packet is lost goes within 4 s)
    s = make_server("--flood-limit", "0", "--ping-interval", "1000", "--ping-timeout", "3000")
    watchers = [chatters(s, transports=t) for t in (["websocket"], ["polling"], None,
                                                     ["polling"], ["websocket"])]
    last = watchers[-1].nick
    for w in watchers:
        w.wait(lambda m: m.get("username") == last)
    talker = chatters(s, transports=["websocket"])
    for w in watchers:
        w.wait(lambda m: m.get("username") == talker.nick)
    visitors = []

    def come_and_go():
        for i in range(6):
            v = Chatter(s, transports=["websocket"] if i % 2 else ["polling"])
            visitors.append(v.nick)  # (once it has its own login)
            v.close()

    coming = threading.Thread(target=come_and_go)
    coming.start()
    for k in range(150):
        talker.say(f"m{k}")
        if k % 10 == 9:
            time.sleep(0.02)
    coming.join(30)
    assert len(visitors) == 6
    # python-engineio's polling client may lose its close packet (see test_delta_presence):
    # then its logout comes with a heartbeat, later; the order is all that counts
    for w in watchers:
        w.wait(lambda m: m.get("msg") == "m149", timeout=20)
        for nick in visitors:
            w.wait(lambda m, n=nick: m.get("action") == "logout" and m["username"] == n,
                   timeout=20)
    seqs = []
    for w in watchers:
        with w.cond:
            msgs = list(w.msgs)
        first = next(i for i, m in enumerate(msgs) if m.get("username") == talker.nick
                     and m.get("action") == "login")
        seqs.append(msgs[first:])
    assert all(seq == seqs[0] for seq in seqs)
    kinds = [m.get("action") for m in seqs[0]]
    assert kinds.count("login") == 7 and kinds.count("logout") == 6
    assert [m["msg"] for m in seqs[0] if m.get("action") == "send msg"] == [f"m{k}" for k in range(150)]
