"""One portable binary: the static builds for x86-64, arm64 and armhf (make static
ARCH=...), the ARM ones run under qemu-user-static with a real client on this machine;
the binary alone in an empty directory with an empty environment; make install; and the
drop-in build for a student's repository, one cc line against Debian's packages."""
import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from conftest import ROOT, Chatter, Server
from test_robustness import deep_json_drops_the_sender_only

BUILD = ROOT / "build"
QEMU = {"arm64": "qemu-aarch64-static", "armhf": "qemu-arm-static"}


def static_binary(arch):
    path = BUILD / f"chatroom-{arch}"
    if not path.exists():
        pytest.skip(f"{path} is not built (make static ARCH={arch})")
    return path


# python-engineio 4.3's disconnect over polling may drop its own close packets (its
# write loop stops before sending them); then only the heartbeat ends the session, so
# the smoke tests keep it short.
FAST = ("--ping-interval", "1000", "--ping-timeout", "1000")


def chat_smoke(server):
    """Two clients on different transports: join, talk, leave."""
    a = Chatter(server, transports=["websocket"])
    b = Chatter(server, transports=["polling"])
    try:
        a.wait(lambda m: m.get("username") == b.nick, timeout=15)
        b.say("hello from the host")
        got = a.wait(lambda m: m.get("msg") == "hello from the host", timeout=15)
        assert got["username"] == b.nick
        b.close()
        out = a.wait(lambda m: m.get("action") == "logout", timeout=15)
        assert out["username"] == b.nick
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("arch", ["x86_64", "arm64", "armhf"])
def test_static_binaries_are_static_and_small(arch):
    path = static_binary(arch)
    assert "statically linked" in subprocess.run(["file", str(path)], capture_output=True, text=True).stdout
    ldd = subprocess.run(["ldd", str(path)], capture_output=True, text=True)
    assert "not a dynamic executable" in ldd.stdout + ldd.stderr
    assert path.stat().st_size <= 1.3 * 1024 * 1024


def test_static_binary_alone_in_an_empty_directory_with_an_empty_environment(tmp_path):
    if platform.machine() != "x86_64":
        pytest.skip("the x86-64 build")
    binary = tmp_path / "chatroom"
    shutil.copy(static_binary("x86_64"), binary)
    s = Server(*FAST, binary=str(binary), cwd=str(tmp_path), env_replace={})
    try:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["chatroom"]
        chat_smoke(s)
        page = requests.get(s.url + "/", timeout=5)
        assert page.status_code == 200 and "<title>chatroom</title>" in page.text
        deep_json_drops_the_sender_only(s)  # jansson from source, with its own limit too
    finally:
        s.assert_clean_exit()


@pytest.mark.parametrize("arch", ["arm64", "armhf"])
def test_arm_binary_under_qemu(arch):
    path = static_binary(arch)
    if not shutil.which(QEMU[arch]):
        pytest.skip(f"needs {QEMU[arch]} (qemu-user-static)")
    s = Server(*FAST, binary=QEMU[arch], prefix=[str(path)], env_replace={})
    try:
        chat_smoke(s)
    finally:
        code, took = s.stop()
        assert code == 0


def test_make_install(tmp_path):
    r = subprocess.run(["make", "-s", "install", f"PREFIX={tmp_path}/usr"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.access(tmp_path / "usr/bin/chatroom", os.X_OK)
    page = (tmp_path / "usr/share/man/man1/chatroom.1").read_text()
    flags = subprocess.run([str(ROOT / "chatroom"), "--help"], capture_output=True, text=True).stdout
    for flag in [w for w in flags.split() if w.startswith("--")]:
        assert flag.strip(",").replace("-", "\\-") in page, flag
    for code in ("0", "1", "2"):
        assert f".B {code}\n" in page
    if shutil.which("groff"):
        lint = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(ROOT / "dist/chatroom.1")],
                              capture_output=True, text=True)
        assert lint.stderr == ""
    unit = (ROOT / "dist/chatroom.service").read_text()
    assert "ExecStart=/usr/local/bin/chatroom" in unit and "DynamicUser=yes" in unit


STUDENT_BUILD = ["cc", "-O2", "-o", "chatroom", "chatroom.c", "-lcivetweb", "-ljansson", "-lhiredis",
                 "-lpthread"]


def test_student_build_against_debian_packages(tmp_path):
    """The one-line build from the README, in a copy of the repository's files."""
    if not Path("/usr/include/civetweb.h").exists():
        pytest.skip("needs libcivetweb-dev")
    for name in ("chatroom.c", "name.txt", "web/index.html"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    r = subprocess.run(STUDENT_BUILD, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    s = Server(*FAST, binary=str(tmp_path / "chatroom"))
    try:
        # (one worker thread per place: starting 11,000 of them takes seconds on a loaded
        # machine, and so does stopping them)
        assert s.wait_log("without IPv6: listening on IPv4 only", timeout=60)
        chat_smoke(s)
        assert "<title>chatroom</title>" in requests.get(s.url + "/", timeout=5).text
    finally:
        code, took = s.stop(timeout=60)
        assert code == 0  # Debian's civetweb takes up to 2 s to stop


def test_armhf_room_of_10000_has_the_right_budgets():
    """32-bit sizes: 32 x 10000^2 does not fit in a 32-bit long, and was once computed in
    one (the queue limit came out near 2 MB). Under qemu, the armhf build with a room of
    10000 prints the limits it computed, and chats."""
    path = static_binary("armhf")
    if not shutil.which(QEMU["armhf"]):
        pytest.skip("needs qemu-arm-static (qemu-user-static)")
    s = Server(*FAST, "--max-clients", "10000", binary=QEMU["armhf"], prefix=[str(path)],
               env_replace={})
    try:
        assert s.wait_log(r"Limits: ", timeout=10)
        out = s.stdout()
        assert "10000 places" in out
        assert "a client may fall 64 MiB behind" in out, out
        assert "all clients together may hold 1 GiB" in out or "MiB." in out, out  # 32-bit cap
        chat_smoke(s)
    finally:
        code, took = s.stop()
        assert code == 0
