"""HTTP around the protocols: CORS (none by default, as Node), --path, other paths, and
the share of connections one client address may hold."""
import socket

import requests

from conftest import wait_until
from rawws import RawWS

HANDSHAKE = {"EIO": 4, "transport": "polling"}


def test_no_cors_headers_by_default(server):
    r = requests.get(server.eio, params=HANDSHAKE, headers={"Origin": "https://a.example"}, timeout=5)
    assert r.status_code == 200
    assert not [h for h in r.headers if h.lower().startswith("access-control")]
    r = requests.options(server.eio, params=HANDSHAKE, timeout=5,
                         headers={"Origin": "https://a.example", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 400  # Node answers a preflight it does not expect the same way


def cors_headers(r):
    return {k.lower(): v for k, v in r.headers.items() if k.lower().startswith("access-control")}


def test_cors_allowlist(make_server):
    s = make_server("--cors-origin", "https://a.example", "--cors-origin", "http://b.example:8080")
    for origin in ("https://a.example", "http://b.example:8080"):
        pre = requests.options(s.eio, params=HANDSHAKE, timeout=5, headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        assert pre.status_code == 204
        h = cors_headers(pre)
        assert h["access-control-allow-origin"] == origin
        assert h["access-control-allow-credentials"] == "true"
        assert "POST" in h["access-control-allow-methods"]
        assert h["access-control-allow-headers"] == "content-type"
        r = requests.get(s.eio, params=HANDSHAKE, headers={"Origin": origin}, timeout=5)
        assert cors_headers(r)["access-control-allow-origin"] == origin
        sid = r.text.split('"sid":"')[1].split('"')[0]
        post = requests.post(s.eio, params=dict(HANDSHAKE, sid=sid), data=b"40",
                             headers={"Origin": origin}, timeout=5)
        assert cors_headers(post)["access-control-allow-credentials"] == "true"
    # another origin: refused, on every transport
    r = requests.get(s.eio, params=HANDSHAKE, headers={"Origin": "https://evil.example"}, timeout=5)
    assert (r.status_code, r.json()) == (403, {"code": 4, "message": "Forbidden"})
    ws = RawWS(s.host, s.port, "/socket.io/?EIO=4&transport=websocket",
               headers="Origin: https://evil.example\r\n")
    assert ws.status == 403
    ws.close()
    ws = RawWS(s.host, s.port, "/socket.io/?EIO=4&transport=websocket",
               headers="Origin: https://a.example\r\n")
    assert ws.status == 101
    ws.close()
    # no Origin at all: not a browser page elsewhere; served, without CORS headers
    r = requests.get(s.eio, params=HANDSHAKE, timeout=5)
    assert r.status_code == 200 and not cors_headers(r)


def test_cors_any_origin(make_server):
    s = make_server("--cors-origin", "*")
    r = requests.get(s.eio, params=HANDSHAKE, headers={"Origin": "https://anyone.example"}, timeout=5)
    assert r.status_code == 200
    assert cors_headers(r)["access-control-allow-origin"] == "https://anyone.example"


def test_path_flag(make_server, chatters):
    s = make_server("--path", "/chat")
    assert requests.get(s.eio, params=HANDSHAKE, timeout=5).status_code == 404
    r = requests.get(f"{s.url}/chat/", params=HANDSHAKE, timeout=5)
    assert r.status_code == 200 and r.text.startswith("0{")
    c = chatters(s, connect=False)
    c.sio.connect(s.url, socketio_path="chat", wait_timeout=5)
    assert c.nick


def test_other_paths(server):
    assert requests.get(f"{server.url}/nope", timeout=5).status_code == 404
    r = requests.get(f"{server.url}/", timeout=5)
    assert r.status_code == 200


def idle_connection(server, source="127.0.0.1"):
    s = socket.socket()
    s.bind((source, 0))
    s.connect((server.host, server.port))
    return s


def kept_alive_connection(server):
    """A connection that had a request answered and now idles between requests."""
    s = idle_connection(server)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert s.recv(4096).startswith(b"HTTP/1.1 200")
    return s


def test_one_address_cannot_take_every_connection(make_server):
    srv = make_server("--conns-per-address", "6")
    idle = [kept_alive_connection(srv) for _ in range(6)]
    extra = idle_connection(srv)
    extra.settimeout(2)
    assert extra.recv(200).startswith(b"HTTP/1.1 503")  # refused at once
    extra.close()
    other = idle_connection(srv, source="127.0.0.2")  # another host still gets served
    other.settimeout(3)
    other.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert other.recv(100).startswith(b"HTTP/1.1 200")
    for s in idle + [other]:
        s.close()
    assert wait_until(lambda: requests.get(srv.url + "/", timeout=2).status_code == 200, 3)
