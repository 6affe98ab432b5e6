"""HTTP around the protocols: CORS (none by default, as Node), --path, other paths, and
the share of connections one client address may hold."""
import socket

import requests

from conftest import Polling, wait_until
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


def preflight_allows(s, origin):
    """A browser's preflight for a POST from origin is answered and allows it."""
    pre = requests.options(s.eio, params=HANDSHAKE, timeout=5, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert pre.status_code == 204
    h = cors_headers(pre)
    assert h["access-control-allow-origin"] == origin
    assert h["access-control-allow-credentials"] == "true"
    assert "POST" in h["access-control-allow-methods"]
    assert h["access-control-allow-headers"] == "content-type"


def test_cors_allowlist(make_server):
    s = make_server("--cors-origin", "https://a.example", "--cors-origin", "http://b.example:8080")
    for origin in ("https://a.example", "http://b.example:8080"):
        preflight_allows(s, origin)
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
    # "*" lets any page connect, with credentials: so the origin is echoed (browsers refuse
    # "*" with credentials), on every kind of request, and over WebSocket too.
    s = make_server("--cors-origin", "*")
    for origin in ("https://anyone.example", "http://localhost:8000"):
        r = requests.get(s.eio, params=HANDSHAKE, headers={"Origin": origin}, timeout=5)
        assert r.status_code == 200
        h = cors_headers(r)
        assert h["access-control-allow-origin"] == origin
        assert h["access-control-allow-credentials"] == "true"
        assert "Origin" in r.headers.get("Vary", "")
        preflight_allows(s, origin)
        sid = r.text.split('"sid":"')[1].split('"')[0]
        post = requests.post(s.eio, params=dict(HANDSHAKE, sid=sid), data=b"40",
                             headers={"Origin": origin}, timeout=5)
        assert post.status_code == 200
        assert cors_headers(post)["access-control-allow-credentials"] == "true"
        ws = RawWS(s.host, s.port, "/socket.io/?EIO=4&transport=websocket",
                   headers=f"Origin: {origin}\r\n")
        assert ws.status == 101
        assert ws.recv_message()[0] == "0"
        ws.send_text("40")
        assert ws.recv_message().startswith('40{"sid":"')
        assert ws.recv_message().startswith('42["msg",{"username":')
        ws.close()


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


def exchange(server, request, source="127.0.0.1"):
    """Sends a request on a fresh connection; returns (head, whether the server then
    closed the connection)."""
    s = idle_connection(server, source)
    s.settimeout(3)
    s.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next((l.split(b":")[1] for l in head.split(b"\r\n")
                       if l.lower().startswith(b"content-length:")), b"0"))
    while len(body) < length:
        body += s.recv(65536)
    s.settimeout(0.5)
    try:
        closed = s.recv(1) == b""
    except socket.timeout:
        closed = False
    s.close()
    return head.decode(), closed


HANDSHAKE_GET = "GET /socket.io/?EIO=4&transport=polling HTTP/{v}\r\nHost: x\r\n{h}\r\n"


def says_close(head):
    return any(l.lower() == "connection: close" for l in head.split("\r\n"))


def test_connection_close_is_said_whenever_the_connection_closes(server):
    # RFC 9112, 9.6: a server that closes after its answer says so in it; one that says
    # nothing keeps the connection for the next request.
    cases = [("1.1", "", False), ("1.1", "Connection: close\r\n", True),
             ("1.1", "Connection: keep-alive\r\n", False), ("1.0", "", True),
             ("1.0", "Connection: keep-alive\r\n", False)]
    for version, extra, closes in cases:
        head, closed = exchange(server, HANDSHAKE_GET.format(v=version, h=extra).encode())
        assert head.startswith("HTTP/1.1 200"), head
        assert (says_close(head), closed) == (closes, closes), (version, extra, head)
    # errors too: a bad request, an unknown path, a 404
    for path in ("/socket.io/?EIO=9&transport=polling", "/socket.io/?transport=x", "/nope"):
        for extra, closes in (("", False), ("Connection: close\r\n", True)):
            head, closed = exchange(server, f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
            assert (says_close(head), closed) == (closes, closes), (path, extra, head)
    # a POST's connection is closed by us: it says so
    p = Polling(server)
    head, closed = exchange(server, (f"POST /socket.io/?EIO=4&transport=polling&sid={p.sid} "
                                     f"HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n6").encode())
    assert head.startswith("HTTP/1.1 200") and says_close(head) and closed


def test_a_get_sent_just_before_a_close_post_gets_its_noop(server):
    # The Engine.IO suite sends a GET and, at once, a POST with a close packet, on two
    # connections: the GET was first, so it is answered (noop), not refused.
    for _ in range(20):
        p = Polling(server)
        get = socket.create_connection((server.host, server.port))
        post = socket.create_connection((server.host, server.port))
        get.sendall(f"GET /socket.io/?EIO=4&transport=polling&sid={p.sid} HTTP/1.1\r\n"
                    f"Host: x\r\nConnection: close\r\n\r\n".encode())
        post.sendall(f"POST /socket.io/?EIO=4&transport=polling&sid={p.sid} HTTP/1.1\r\n"
                     f"Host: x\r\nConnection: close\r\nContent-Length: 1\r\n\r\n1".encode())
        get.settimeout(3)
        answer = b""
        while chunk := get.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\n6"), answer
        get.close()
        post.close()
