"""Start-up and shutdown: flags, exit codes, the messages a user reads, listening on
every interface, and stopping cleanly on SIGINT and SIGTERM."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import requests

from conftest import BINARY, Chatter, Polling, Server, free_port, have_ipv6_loopback, wait_until
from test_socketio import joined

FLAGS = ["--port", "--host", "--names", "--ping-interval", "--ping-timeout", "--max-payload",
         "--max-clients", "--help", "--version"]


def run(*args, **kw):
    return subprocess.run([BINARY, *args], capture_output=True, text=True, timeout=10, **kw)


def test_help_lists_every_flag():
    r = run("--help")
    assert r.returncode == 0
    for flag in FLAGS:
        assert flag in r.stdout
    assert "Exit status" in r.stdout


def test_version():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("chatroom ")


@pytest.mark.parametrize("args", [["--no-such-flag"], ["--port"], ["--port", "0"],
                                  ["--port", "70000"], ["--port", "5x"],
                                  ["--max-clients", "0"], ["--max-clients", "99999999"],
                                  ["--ping-interval", "-1"], ["surplus"],
                                  ["--host", "not-an-address"]])
def test_bad_command_line_exits_2_with_usage(args):
    r = run(*args)
    assert r.returncode == 2
    assert r.stderr.strip()
    assert "chatroom" in r.stderr


def test_busy_port_exits_1_with_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run("--host", "127.0.0.1", "--port", str(port))
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1
    assert f"port {port}" in r.stderr and "in use" in r.stderr


@pytest.mark.parametrize("content,why", [
    (None, "cannot read"),            # missing
    (b"", "no names"),                # empty
    (b"\n  \n\t\n", "no names"),      # only white space
    (b"Otter\n\xff\xfeBad\n", "UTF-8"),
])
def test_bad_names_file_exits_1_with_one_line(tmp_path, content, why):
    path = tmp_path / "names.txt"
    if content is not None:
        path.write_bytes(content)
    r = run("--names", str(path), "--port", str(free_port()), "--host", "127.0.0.1")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and why in r.stderr, r.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_names_file(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("Otter\n")
    path.chmod(0)
    r = run("--names", str(path))
    assert r.returncode == 1 and "cannot read" in r.stderr


def test_names_file_replaces_the_built_in_list(make_server, tmp_path, chatters):
    path = tmp_path / "names.txt"
    path.write_text("\ufeffÆgir\n  Ζεύς \n\n月兔\n", "utf-8")
    s = make_server("--names", str(path))
    nicks = {chatters(s, transports=["websocket"]).nick for _ in range(3)}
    assert nicks == {"Ægir", "Ζεύς", "月兔"}


def test_built_in_names_are_many_and_of_many_scripts():
    names = [n.strip() for n in open(os.path.join(os.path.dirname(__file__), "..", "name.txt"),
                                     encoding="utf-8") if n.strip()]
    assert len(names) >= 300 and len(set(names)) == len(names)
    latin = [n for n in names if n.isascii()]
    cjk = [n for n in names if any("\u4e00" <= ch <= "\u9fff" or "\u3040" <= ch <= "\u30ff"
                                   or "\uac00" <= ch <= "\ud7af" for ch in n)]
    other = [n for n in names if n not in latin and n not in cjk]
    assert len(latin) >= 100 and len(cjk) >= 30 and len(other) >= 60


def test_prints_where_to_connect(server):
    assert server.wait_log(rf"http://127\.0\.0\.1:{server.port}/")


@pytest.mark.skipif(not have_ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_listens_on_ipv6_loopback(make_server):
    s = make_server(host="::1")
    r = requests.get(f"http://[::1]:{s.port}/socket.io/?EIO=4&transport=polling", timeout=5)
    assert r.status_code == 200 and r.text.startswith("0{")


DEFAULTS = textwrap.dedent("""
    # Run inside a fresh network namespace: lo, plus a veth pair with one IPv4 and one
    # IPv6 address, so chatroom's defaults (every interface, port 5000) touch nothing else.
    import json, socket, subprocess, sys, time
    def sh(cmd): subprocess.run(cmd, shell=True, check=True)
    sh("ip link set lo up")
    sh("ip link add v0 type veth peer name v1")
    sh("ip addr add 10.11.12.13/24 dev v0 && ip -6 addr add fd12::13/64 dev v0 nodad")
    sh("ip link set v0 up && ip link set v1 up")
    p = subprocess.Popen([sys.argv[1]], stdout=subprocess.PIPE, text=True)
    lines = [p.stdout.readline()]
    while lines[-1] and "Ctrl+C" not in lines[-1]:
        lines.append(p.stdout.readline())
    answers = {}
    for host in ["127.0.0.1", "::1", "10.11.12.13", "fd12::13"]:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(fam) as c:
            c.connect((host, 5000))
            c.sendall(b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
            answers[host] = c.recv(4096).decode().split("\\r\\n")[0]
    p.send_signal(2)
    print(json.dumps({"lines": lines, "answers": answers, "code": p.wait(5)}))
""")


def test_defaults_listen_everywhere_on_port_5000_and_print_urls():
    if not shutil.which("unshare") or subprocess.run(
            ["unshare", "-n", "sh", "-c", "ip link add v0 type veth peer name v1"],
            capture_output=True).returncode:
        pytest.skip("needs unshare -n and veth (root) for a private network namespace")
    if not have_ipv6_loopback():
        pytest.skip("this machine has no IPv6")
    r = subprocess.run(["unshare", "-n", sys.executable, "-c", DEFAULTS, BINARY],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    import json
    out = json.loads(r.stdout.strip().splitlines()[-1])
    text = "".join(out["lines"])
    assert "http://10.11.12.13:5000/" in text
    assert "http://[fd12::13]:5000/" in text
    assert all(a == "HTTP/1.1 200 OK" for a in out["answers"].values()), out["answers"]
    assert out["code"] == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_disconnects_everyone_and_exits_0_quickly(sig):
    s = Server()
    ws_client = Chatter(s, transports=["websocket"])
    poll_client = Chatter(s, transports=["polling"])
    raw = joined(s)
    parked = Polling(s)
    parked_result = {}
    t = threading.Thread(target=lambda: parked_result.setdefault("r", parked.get(timeout=10)))
    t.start()
    time.sleep(0.3)
    code, took = s.stop(sig)
    assert code == 0 and took < 2.0, (code, took)
    assert "Stopping" in s.stdout()
    assert wait_until(lambda: not ws_client.sio.connected and not poll_client.sio.connected, 3)
    assert raw.expect_close() == 1001  # going away
    t.join(3)
    # a waiting long-poll gets a noop, not a close packet (which would tell python-engineio
    # never to come back); its next request fails, and clients reconnect
    assert parked_result["r"].text == "6"
    with pytest.raises(requests.exceptions.ConnectionError):
        parked.get(timeout=3)
    s.assert_clean_exit()


RECONNECTING = textwrap.dedent("""
    # A python-socketio client that reconnects by itself; it prints its own login each
    # time it joins: the first msg after it connects.
    import socketio, sys, time
    c = socketio.Client(reconnection=True, reconnection_delay=0.2, reconnection_delay_max=0.5)
    state = {"fresh": False}
    c.on("connect", lambda: state.update(fresh=True))
    @c.on("msg")
    def on_msg(data):  # one argument, as the desktop client has it
        if state["fresh"] and data.get("action") == "login":
            state["fresh"] = False
            print("login", data["username"], flush=True)
    c.connect(sys.argv[1], transports=[sys.argv[2]])
    time.sleep(30)
""")



@pytest.mark.parametrize("transport", ["websocket", "polling"])
def test_python_socketio_comes_back_after_a_restart(transport):
    # systemctl restart: SIGTERM, then a new server on the same port
    s = Server()
    client = subprocess.Popen(["/usr/bin/python3", "-c", RECONNECTING, s.url, transport],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().startswith("login ")
        time.sleep(0.5)  # its long-poll waits in the server now
        code, _ = s.stop(signal.SIGTERM)
        assert code == 0
        again = Server(port=s.port)
        try:
            assert client.stdout.readline().startswith("login "), "it did not come back"
        finally:
            again.assert_clean_exit()
    finally:
        client.kill()
        client.wait()
