"""/metrics in Prometheus' text format (checked by Debian's promtool), with values that
follow the traffic; /healthz; --metrics-address."""
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest
import requests

from conftest import Polling, free_port, wait_until
from rawws import RawWS
from test_socketio import joined


def scrape(url):
    r = requests.get(url + "/metrics", timeout=5)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return r.text


def value(text, name):
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} is not in the metrics"
    return float(m.group(1))


def test_promtool_accepts_the_metrics(server, chatters):
    if not shutil.which("promtool"):
        pytest.fail("promtool is missing: make test installs Debian's prometheus package")
    chatters(server, transports=["websocket"]).say("hello")
    text = scrape(server.url)
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("process_resident_memory_bytes", "process_open_fds",
                 "process_start_time_seconds"):
        assert value(text, name) > 0
    assert value(text, "process_cpu_seconds_total") >= 0
    assert abs(value(text, "process_start_time_seconds") - time.time()) < 60


def test_the_values_follow_the_traffic(make_server, chatters):
    s = make_server("--flood-limit", "5", "--ping-interval", "300", "--ping-timeout", "300")
    before = scrape(s.url)
    ws = chatters(s, transports=["websocket"])
    poll = chatters(s, transports=["polling"])
    ws.wait(lambda m: m.get("username") == poll.nick)
    for i in range(3):
        ws.say(f"m{i}")
    poll.wait(lambda m: m.get("msg") == "m2")
    text = scrape(s.url)
    assert value(text, 'chatroom_clients{transport="websocket"}') == 1
    assert value(text, 'chatroom_clients{transport="polling"}') == 1
    assert value(text, "chatroom_room_members") == 2
    assert value(text, "chatroom_connections_total") - value(before, "chatroom_connections_total") >= 2
    assert value(text, "chatroom_messages_total") >= 3
    # each message went to both, with logins, opens and the rest besides
    assert value(text, "chatroom_deliveries_total") >= 3 * 2
    assert value(text, "chatroom_sent_bytes_total") > value(before, "chatroom_sent_bytes_total")
    # a flooder is dropped, and counted
    flooder = joined(s)
    for i in range(30):
        flooder.send_text(f'42["msg",{{"msg":"{i}"}}]')
    assert wait_until(lambda: value(scrape(s.url), 'chatroom_dropped_clients_total{reason="flood"}') == 1)
    # a client that does not answer pings too
    mute = RawWS.engineio(s)
    assert wait_until(lambda: value(scrape(s.url),
                                    'chatroom_dropped_clients_total{reason="ping_timeout"}') == 1)
    mute.close()


def test_queued_bytes_show_a_client_that_does_not_read(make_server):
    s = make_server("--flood-limit", "0", "--inbound-rate", "0")
    talker = joined(s)
    deaf = RawWS.engineio(s)
    deaf.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    deaf.recv_message()
    deaf.send_text("40")
    for i in range(120):  # 12 MB: more than the kernel's socket buffers take
        talker.send_text('42["msg",{"msg":"%d %s"}]' % (i, "q" * 100_000))
    assert wait_until(lambda: value(scrape(s.url), "chatroom_queued_bytes") > 1_000_000)
    assert value(scrape(s.url), "chatroom_memory_bytes") > 1_000_000
    deaf.close()
    talker.close()


def test_metrics_on_a_port_of_their_own(make_server):
    port = free_port()
    s = make_server("--metrics-address", f"127.0.0.1:{port}")
    assert requests.get(s.url + "/metrics", timeout=5).status_code == 404
    assert requests.get(s.url + "/healthz", timeout=5).text == "ok\n"
    private = f"http://127.0.0.1:{port}"
    assert "chatroom_clients" in scrape(private)
    assert requests.get(private + "/healthz", timeout=5).status_code == 200
    assert requests.get(private + "/", timeout=5).status_code == 404  # nothing else there
    assert Polling(s).sid  # the chat is where it was


def healthz_while_stopping(make_server):
    """The answers of a kept-alive connection that asks /healthz again and again while the
    server stops; the last one is what came once the server noticed (b"" if it was gone)."""
    s = make_server()
    kept = socket.create_connection((s.host, s.port))
    kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert kept.recv(4096).startswith(b"HTTP/1.1 200")
    # a client that will not answer the close frame keeps the server a moment in its
    # shutdown, while the kept-alive connection asks again
    deaf = RawWS.engineio(s)
    deaf.recv_message()
    s.proc.send_signal(signal.SIGTERM)
    # asked again and again until the server notices the signal (the deaf client keeps
    # it stopping for half a second, CLOSE_LINGER_MS / 2)
    deadline = time.monotonic() + 5
    while True:
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = kept.recv(4096)
        if not answer.startswith(b"HTTP/1.1 200") or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    deaf.close()
    return answer


def test_healthz_says_503_while_stopping(make_server):
    # On a loaded machine the test may not get a request in during the half second the
    # server stops (it once found the server gone): up to three servers are tried, and
    # one must say 503. A server that never says it fails all three.
    answers = []
    for _ in range(3):
        answers.append(healthz_while_stopping(make_server))
        if answers[-1].startswith(b"HTTP/1.1 503"):
            break
    assert answers[-1].startswith(b"HTTP/1.1 503"), answers
    assert b"Connection: close" in answers[-1]
