"""Start-up and shutdown: flags, exit codes, the messages a user reads, listening on
every interface, and stopping cleanly on SIGINT and SIGTERM."""
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap

import pytest
import requests

from conftest import (BINARY, ROOT, Chatter, Polling, Server, free_port, have_ipv6_loopback,
                      hang_up_watched, http_answer, line_reader, netns_argv, parked_get,
                      wait_until)
from test_socketio import joined


def run(*args, **kw):
    return subprocess.run([BINARY, *args], capture_output=True, text=True, timeout=10, **kw)


def getopt_table():
    """The flags chatroom.c defines, read from its getopt_long table: {long name: short
    letter or None}. Read from the source, so that a flag added there and forgotten in
    --help or the man page is caught."""
    src = (ROOT / "chatroom.c").read_text("utf-8")
    table = src[src.index("struct option longopts[]"):]
    table = table[:table.index("};")]
    flags = {name: (short.strip("'") if short.startswith("'") else None)
             for name, short in re.findall(r'\{"([a-z0-9-]+)", \w+_argument, NULL, (\'.\'|\w+)\}', table)}
    shorts = re.search(r'getopt_long\(argc, argv, "([^"]*)"', src).group(1).replace(":", "")
    assert len(flags) >= 20 and set(shorts) == {v for v in flags.values() if v}, (flags, shorts)
    return flags


def test_help_lists_every_flag():
    r = run("--help")
    assert r.returncode == 0 and not r.stderr
    flags = getopt_table()
    for name, short in flags.items():
        if short:
            assert re.search(rf"^  -{short}, --{name}\b", r.stdout, re.M), f"-{short}, --{name}"
        else:
            assert re.search(rf"^      --{name}\b", r.stdout, re.M), f"--{name}"
    # and nothing that is not a flag
    assert set(re.findall(r"--([a-z0-9-]+)", r.stdout)) == set(flags)
    assert "Exit status" in r.stdout


def test_man_page_lists_every_flag():
    page = (ROOT / "dist" / "chatroom.1").read_text("utf-8").replace("\\-", "-")
    documented = set(re.findall(r"^\.B[IR]? .*?--([a-z0-9-]+)", page, re.M))
    assert documented == set(getopt_table())


def test_short_flags_are_the_long_ones(make_server, chatters, tmp_path):
    assert run("-h").stdout == run("--help").stdout
    assert run("-V").stdout == run("--version").stdout == "chatroom 1.0.0\n"
    assert run("-h").returncode == run("-V").returncode == 0
    port = free_port()
    names = tmp_path / "names.txt"
    names.write_text("Otter\n")
    s = make_server("-H", "127.0.0.1", "-p", str(port), "-q", "-n", str(names), port=port,
                    add_address=False)
    assert s.wait_log(rf"Open http://127\.0\.0\.1:{port}/")
    c = chatters(s, transports=["websocket"])
    assert c.nick == "Otter"  # -n
    c.say("short flags")
    c.wait(lambda m: m.get("msg") == "short flags")
    c.close()
    code, _ = s.stop()
    assert code == 0 and not re.search(r"(?m)^\S+ \S+ (join|leave) ", s.stdout())  # -q


@pytest.mark.parametrize("quiet", [[], ["-q"], ["--quiet"]])
def test_quiet_flags_silence_joins_and_leaves(make_server, chatters, quiet):
    s = make_server(*quiet)
    watcher = chatters(s, transports=["polling"])
    c = chatters(s, transports=["websocket"])  # (python-engineio's polling client may lose
    nick = c.nick                                 # its close packet: see test_delta_presence)
    c.close()
    watcher.wait(lambda m: m.get("action") == "logout" and m["username"] == nick)
    code, _ = s.stop()  # everything logged so far is printed by now
    assert code == 0
    out = s.stdout()
    logged = re.findall(rf"^\S+ \S+ (join |leave) {re.escape(nick)} ", out, re.M)
    assert logged == ([] if quiet else ["join ", "leave"]), out


def max_clients():
    """The compile-time room size, as --help says it."""
    return int(re.search(r"--max-clients N .*?(\d+)", run("--help").stdout).group(1))


def test_max_clients_upper_bound(make_server):
    most = max_clients()
    assert most == 10000  # README: at most 10000, a compile-time limit
    r = run("--max-clients", str(most + 1))
    assert r.returncode == 2 and f"from 1 to {most}" in r.stderr, r.stderr
    s = make_server("--max-clients", str(most))
    assert s.wait_log(rf"chat room, {most} places")


def test_start_up_banner_says_the_defaults(server):
    # README: "--max-clients N | 10000", path /socket.io/
    assert server.wait_log(r"(?m)^chatroom 1\.0\.0: a Socket\.IO chat room, 10000 places, "
                           r"path /socket\.io/$")
    # and what one client may cost: --queue-limit 64 MiB (for 10000), --inbound-rate 128
    # KiB/s, --conns-per-address 512, --sessions-per-address 256, --joins-per-minute 240,
    # --max-memory a quarter of RAM, at most 2 GiB
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGESIZE")
    assert server.wait_log(r"(?m)^Limits: ")
    limits = re.search(r"(?m)^Limits: .*$", server.stdout()).group(0)
    assert limits == ("Limits: a client may fall 64 MiB behind and send 128 KiB/s; an address "
                      "may hold 512 connections and 256 clients and join 240 times a minute; "
                      f"all clients together may hold {size_text(min(ram // 4, 2 << 30))}.")


def size_text(n):
    """The banner's way of writing a size (chatroom.c, size_text)."""
    units, u, v = ["B", "KiB", "MiB", "GiB"], 0, float(n)
    while v >= 1024 and u < 3:
        v, u = v / 1024, u + 1
    return f"{int(v)} {units[u]}" if v == int(v) else f"{v:.1f} {units[u]}"


@pytest.mark.parametrize("args,limit", [
    (["--max-clients", "1000"], 32 * 1000 ** 2),            # the join storm's term: 32 x N^2
    ([], 64 << 20),                                         # 32 x 10000^2, at most 64 MiB
    (["--max-clients", "100"], 2 * 1000000),                # 2 x max-payload when more
    (["--max-clients", "10", "--max-payload", "50000000"], 100000000),  # 2 x max-payload
    (["--max-clients", "1", "--max-payload", "64"], 1 << 20),  # never below 1 MiB
    (["--queue-limit", "5M"], 5 << 20),                     # or what it is told
])
def test_queue_limit_defaults(make_server, args, limit):
    s = make_server(*args)
    assert s.wait_log(r"a client may fall .* behind")
    said = re.search(r"a client may fall (.*?) behind", s.stdout()).group(1)
    assert said == size_text(limit), (said, limit)


WORKERS = r"(\d+) HTTP workers"


def workers_said(server):
    assert server.wait_log(WORKERS)
    return int(re.search(WORKERS, server.stdout()).group(1))


def test_threads_flag(make_server):
    assert workers_said(make_server("--threads", "7")) == 7


def mount_ns_argv():
    """A command prefix that runs a program in a mount namespace of its own (root: unshare
    -m; otherwise with a user namespace too, unshare -rm), or None if neither works."""
    for argv in (["unshare", "-m"], ["unshare", "-rm"]):
        try:
            if subprocess.run(argv + ["true"], capture_output=True, timeout=10).returncode == 0:
                return argv
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


def test_default_worker_threads(make_server, tmp_path):
    """Two HTTP workers per CPU, at least 4, at most 16 (chatroom.c, worker_count): here,
    and with other CPU counts shown to it in a mount namespace whose
    /sys/devices/system/cpu/online says so (where glibc counts online CPUs)."""
    def expected(cpus):
        return min(16, max(4, 2 * cpus))

    assert workers_said(make_server()) == expected(os.sysconf("SC_NPROCESSORS_ONLN"))
    ns = mount_ns_argv()
    if ns is None:
        pytest.fail("cannot make a mount namespace (unshare -m, or -rm as a user) to show "
                    "chatroom other CPU counts")
    for cpus in (1, 5, 12):
        online = tmp_path / f"online-{cpus}"
        online.write_text(f"0-{cpus - 1}\n" if cpus > 1 else "0\n")
        script = (f"mount --bind {online} /sys/devices/system/cpu/online && "
                  'exec "$0" "$@"')
        s = make_server(binary=ns[0], prefix=[*ns[1:], "sh", "-c", script, BINARY])
        assert workers_said(s) == expected(cpus), cpus


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


def as_ordinary_user():
    """A command prefix that runs a program as an ordinary user: as root, setpriv to
    nobody (root reads any file, so root-only tests of permissions need another user);
    otherwise we are one already."""
    if os.geteuid() != 0:
        return []
    assert shutil.which("setpriv"), "setpriv (util-linux) is needed to test as another user"
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]


def test_unreadable_names_file():
    # In a directory anyone may enter, so that it is the file's mode that refuses.
    where = tempfile.mkdtemp()
    try:
        os.chmod(where, 0o755)
        path = os.path.join(where, "names.txt")
        with open(path, "w") as f:
            f.write("Otter\n")
        os.chmod(path, 0)
        r = subprocess.run([*as_ordinary_user(), BINARY, "--names", path, "--host", "127.0.0.1",
                            "--port", str(free_port())], capture_output=True, text=True, timeout=10)
        assert r.returncode == 1 and "cannot read" in r.stderr, (r.returncode, r.stderr)
        assert r.stderr.count("\n") == 1
    finally:
        shutil.rmtree(where)


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


def port_free_everywhere():
    """A port below the ephemeral range (where free_port's come from, and where every
    client connection of the tests running beside this one takes its port) that nothing
    holds on any address, IPv4 or IPv6, now."""
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    for port in random.sample(range(10000, max(low, 10200)), 200):
        try:
            with socket.socket(socket.AF_INET6 if have_ipv6_loopback() else socket.AF_INET) as s:
                if s.family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                s.bind(("::" if s.family == socket.AF_INET6 else "0.0.0.0", port))
                return port
        except OSError:
            continue
    raise AssertionError("no free port below the ephemeral range")


def test_default_host_is_every_interface(make_server):
    # No --host: IPv4 and IPv6 on every interface. Here on this machine's loopback (the
    # test below checks other interfaces, and port 5000, in a network namespace).
    for attempt in range(5):
        port = port_free_everywhere()
        try:
            s = make_server("--port", str(port), port=port, add_address=False)
            break
        except RuntimeError as e:
            if "it is in use" not in str(e) or attempt == 4:
                raise
    assert s.wait_log(r"Open one of these in a browser on your network:")
    hosts = ["127.0.0.1"] + (["::1"] if have_ipv6_loopback() else [])
    for host in hosts:
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/socket.io/"
        r = requests.get(url, params={"EIO": 4, "transport": "polling"}, timeout=5)
        assert r.status_code == 200 and r.text.startswith("0{"), host


def test_defaults_listen_everywhere_on_port_5000_and_print_urls():
    # A network namespace of our own (unshare -n as root, -rn as a user): port 5000 and
    # every interface touch nothing else on this machine.
    if not have_ipv6_loopback():
        pytest.skip("this machine has no IPv6")
    argv = netns_argv()
    if not argv:
        pytest.skip("no network namespace can be made here (unshare -n, or -rn as a user); "
                    "test_default_host_is_every_interface checks what it can without one")
    r = subprocess.run(argv + [sys.executable, "-c", DEFAULTS, BINARY],
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
    waiting = parked_get(s, parked.sid)
    code, took = s.stop(sig)
    # README: every client is disconnected cleanly, within a second (two more for a
    # loaded machine and the sanitizer build)
    assert code == 0 and took < 3.0, (code, took)
    assert "Stopping" in s.stdout()
    assert wait_until(lambda: not ws_client.sio.connected and not poll_client.sio.connected, 3)
    assert raw.expect_close() == 1001  # going away
    # a waiting long-poll gets a noop, not a close packet (which would tell python-engineio
    # never to come back); its next request fails, and clients reconnect
    assert http_answer(waiting) == (200, "6")
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
    next_line = line_reader(client.stdout)
    try:
        assert next_line().startswith("login ")
        if transport == "polling":  # its long-poll waits in the server
            assert wait_until(lambda: hang_up_watched(s), timeout=10)
        code, _ = s.stop(signal.SIGTERM)
        assert code == 0
        again = Server(port=s.port)
        try:
            assert next_line().startswith("login "), "it did not come back"
        finally:
            again.assert_clean_exit()
    finally:
        client.kill()
        client.wait()
