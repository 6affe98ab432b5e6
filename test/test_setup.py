"""The README's two commands set themselves up: `make run` (and `make test`) install what
is missing with apt-get, as root or through sudo, after one line saying what and why;
without apt-get they say in one line what to install. Nothing is really installed here:
each case runs make in a copy of the repository with a PATH that lacks what a fresh
machine lacks (a C compiler, dpkg-dev, apt-get itself), and where sudo would be asked,
a stand-in `sudo` records what it was asked to run."""
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import ROOT
from test_startup import as_ordinary_user

# What make and the scripts need from the system; a compiler and apt are left out.
TOOLS = ["make", "sh", "dirname", "uname", "sed", "id", "cat", "mkdir", "tr", "ls", "grep", "rm",
         "mktemp"]
COPIED = ["Makefile", ".ci", "chatroom.c", "name.txt", "web/index.html"]


@pytest.fixture
def fresh_checkout():
    """A copy of what `make run` reads, in a directory an ordinary user owns, and a bin
    directory holding only TOOLS; no build/ (so civetweb's source is not there yet)."""
    where = Path(tempfile.mkdtemp())
    try:
        repo, bin_dir = where / "chatroom", where / "bin"
        for name in COPIED:
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
            copy(ROOT / name, repo / name)
        bin_dir.mkdir()
        for tool in TOOLS:
            (bin_dir / tool).symlink_to(shutil.which(tool))
        if os.geteuid() == 0:  # the make below runs as nobody
            for path in [where, *where.rglob("*")]:
                os.lchown(path, *nobody_ids())
        yield repo, bin_dir
    finally:
        shutil.rmtree(where)


def nobody_ids():
    r = subprocess.run(["id", "-u", "nobody"], capture_output=True, text=True, check=True)
    g = subprocess.run(["getent", "group", "nogroup"], capture_output=True, text=True, check=True)
    return int(r.stdout), int(g.stdout.split(":")[2])


def stand_in(bin_dir, name, script):
    (bin_dir / name).write_text("#!/bin/sh\n" + script)
    (bin_dir / name).chmod(0o755)


def fresh_make(repo, bin_dir, target, *args):
    env = {"PATH": str(bin_dir), "HOME": str(repo), "LANG": "C.UTF-8"}
    user = as_ordinary_user()  # setpriv is found here: the PATH given is the fresh one
    user[:1] = [shutil.which(user[0])] if user else []
    return subprocess.run([*user, str(bin_dir / "make"), "-C", str(repo), target, *args],
                          capture_output=True, text=True, env=env, timeout=60)


def chatroom_lines(r):
    return [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("chatroom:")]


def test_without_apt_get_make_run_says_in_one_line_what_to_install(fresh_checkout):
    repo, bin_dir = fresh_checkout
    r = fresh_make(repo, bin_dir, "run")
    assert r.returncode != 0
    said = chatroom_lines(r)
    assert len(said) == 1, r.stdout + r.stderr
    for package in ["gcc", "libjansson-dev", "libhiredis-dev"]:
        assert package in said[0].split(), said
    assert "to build chatroom" in said[0] and "package manager" in said[0]
    # without apt there is no apt-get source: civetweb's source is named instead of dpkg-dev
    assert "dpkg-dev" not in said[0] and "civetweb's source: make CIVETWEB_SRC=" in said[0]
    # the check comes first: nothing tried to fetch or compile before it
    assert "fetching" not in r.stdout + r.stderr and not (repo / "build").exists()


def test_as_an_ordinary_user_make_run_installs_through_sudo(fresh_checkout):
    repo, bin_dir = fresh_checkout
    asked = repo / "sudo-was-asked"
    stand_in(bin_dir, "apt-get", "echo 'apt-get run without sudo' >&2\nexit 99\n")
    stand_in(bin_dir, "sudo", f'echo "$@" > {asked}\nexit 0\n')
    r = fresh_make(repo, bin_dir, "run")
    said = chatroom_lines(r)
    assert said[0] == "chatroom: installing gcc libjansson-dev libhiredis-dev dpkg-dev " \
                      "with apt-get, to build chatroom", r.stdout + r.stderr
    assert asked.read_text().split() == [".ci/install-deps", "build"]
    assert "apt-get run without sudo" not in r.stderr
    # the stand-in installed nothing, so the fetch that follows says what is still missing
    assert r.returncode != 0 and "needs dpkg-dev" in r.stderr


def test_make_test_asks_for_the_test_packages_too(fresh_checkout):
    repo, bin_dir = fresh_checkout
    r = fresh_make(repo, bin_dir, "test")
    said = chatroom_lines(r)
    assert len(said) == 1 and "to run the tests" in said[0], r.stdout + r.stderr
    # (those the check finds by PATH; python's modules and the fonts are found by path)
    for package in ["libjansson-dev", "chromium", "redis-server", "npm", "clang"]:
        assert package in said[0].split(), said


def test_with_civetweb_source_given_neither_dpkg_dev_nor_its_source_is_asked_for(fresh_checkout):
    repo, bin_dir = fresh_checkout
    r = fresh_make(repo, bin_dir, "run", f"CIVETWEB_SRC={ROOT / 'build/civetweb'}")
    said = chatroom_lines(r)
    assert len(said) == 1 and "libjansson-dev" in said[0].split(), r.stdout + r.stderr
    assert "dpkg-dev" not in said[0] and "civetweb" not in said[0]


def test_what_apt_did_not_bring_is_said_once_not_installed_again(fresh_checkout):
    """apt-get succeeds but the compiler is still not there (an older distribution's
    package, say): the installer says what is still missing and fails, rather than
    every later make installing again. Run as root in a user namespace of its own
    (unshare -r) when we are not root: apt-get and apt-cache here are stand-ins."""
    repo, bin_dir = fresh_checkout
    stand_in(bin_dir, "apt-get", "exit 0\n")
    stand_in(bin_dir, "apt-cache", 'echo "Package: $2"\n')
    as_root = [] if os.geteuid() == 0 else [shutil.which("unshare"), "-r"]
    r = subprocess.run([*as_root, str(repo / ".ci/install-deps"), "build"], capture_output=True,
                       text=True, timeout=60, env={"PATH": str(bin_dir), "LANG": "C.UTF-8"})
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        "chatroom: still missing after apt-get install: gcc libjansson-dev libhiredis-dev dpkg-dev"]


@pytest.mark.parametrize("what", ["build", "test"])
def test_with_everything_installed_the_check_says_nothing(what, tmp_path):
    # stand-ins first on PATH: were anything missing, nothing would be installed for real
    for tool in ["apt-get", "sudo"]:
        stand_in(tmp_path, tool, f"echo '{tool} was called' >&2\nexit 99\n")
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    r = subprocess.run([str(ROOT / ".ci/install-deps"), "--if-missing", what],
                       capture_output=True, text=True, timeout=120, env=env)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


def test_fetching_a_source_never_replaces_a_folder_that_is_not_empty(tmp_path):
    # a mistyped CIVETWEB_SRC=~ must not cost anyone their home folder
    (tmp_path / "notes.txt").write_text("mine")
    r = subprocess.run([str(ROOT / ".ci/fetch-source"), "civetweb", str(tmp_path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and (tmp_path / "notes.txt").read_text() == "mine"
    assert r.stderr.count("\n") == 1 and "make CIVETWEB_SRC=/path/to/civetweb" in r.stderr
