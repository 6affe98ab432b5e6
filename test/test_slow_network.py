"""Real clients on a slow network: 40 ms each way, 200 kB/s, every stream cut into
13-byte pieces. Frames and requests arrive in fragments, heartbeats cross the latency,
and the upgrade from polling to WebSocket happens over it."""
import time

import pytest

from conftest import all_at_once
from slowlink import SlowLink

TRANSPORTS = [None, ["websocket"], ["polling"]]


class Via:
    """Points a Chatter at the proxy instead of the server."""

    def __init__(self, link):
        self.url = link.url


@pytest.fixture
def link(make_server):
    # pings every 0.8 s; a pong may take 5 s (the link, and a loaded machine running the
    # proxy and the clients in Python, slow it down)
    s = make_server("--ping-interval", "800", "--ping-timeout", "5000")
    proxy = SlowLink(s.port)
    yield proxy
    proxy.close()


def test_chat_over_a_slow_network(link, chatters):
    clients = [chatters(Via(link), transports=TRANSPORTS[i % 3]) for i in range(6)]
    last = clients[-1].nick
    for c in clients:
        c.wait(lambda m: m.get("username") == last, timeout=10)
    start = [len(c.msgs) for c in clients]

    def talk(c, i):
        for k in range(10):
            c.say(f"{i}:{k} " + "é" * 50)
            if i == 0 and k == 5:
                c.sio.emit("msg", {"msg": "binary", "blob": bytes(range(256)) * 8})

    all_at_once(talk, [(c, i) for i, c in enumerate(clients)])
    seqs = []
    for c, s0 in zip(clients, start):
        c.wait_count(s0 + 61, timeout=30)
        seqs.append([m["msg"] for m in c.msgs[s0:]])
        blob = [m for m in c.msgs if m.get("msg") == "binary"][0]["blob"]
        assert blob == bytes(range(256)) * 8
    assert all(s == seqs[0] for s in seqs)
    time.sleep(6.5)  # several heartbeats over the slow link, and a timeout: nobody times out
    assert all(c.sio.connected for c in clients)
    assert [c.sio.transport() for c in clients[:3]] == ["websocket", "websocket", "polling"]
    assert not [m for c in clients for m in c.msgs if m.get("action") == "logout"]
