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
TOOLS = ["make", "sh", "dirname", "uname", "sed", "id", "cat", "mkdir"]
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


def fresh_make(repo, bin_dir, target):
    env = {"PATH": str(bin_dir), "HOME": str(repo), "LANG": "C.UTF-8"}
    user = as_ordinary_user()  # setpriv is found here: the PATH given is the fresh one
    user[:1] = [shutil.which(user[0])] if user else []
    return subprocess.run([*user, str(bin_dir / "make"), "-C", str(repo), target],
                          capture_output=True, text=True, env=env, timeout=60)


def chatroom_lines(r):
    return [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("chatroom:")]


def test_without_apt_get_make_run_says_in_one_line_what_to_install(fresh_checkout):
    repo, bin_dir = fresh_checkout
    r = fresh_make(repo, bin_dir, "run")
    assert r.returncode != 0
    said = chatroom_lines(r)
    assert len(said) == 1, r.stdout + r.stderr
    for package in ["gcc", "libjansson-dev", "libhiredis-dev", "dpkg-dev"]:
        assert package in said[0].split(), said
    assert "to build chatroom" in said[0] and "package manager" in said[0]
    # the check comes first: nothing tried to fetch or compile before it
    assert "fetching" not in r.stdout + r.stderr and not (repo / "build").exists()


def test_as_an_ordinary_user_make_run_installs_through_sudo(fresh_checkout):
    repo, bin_dir = fresh_checkout
    asked = repo / "sudo-was-asked"
    (bin_dir / "apt-get").write_text("#!/bin/sh\necho 'apt-get run without sudo' >&2\nexit 99\n")
    (bin_dir / "sudo").write_text(f'#!/bin/sh\necho "$@" > {asked}\nexit 0\n')
    for stub in ["apt-get", "sudo"]:
        (bin_dir / stub).chmod(0o755)
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


@pytest.mark.parametrize("what", ["build", "test"])
def test_with_everything_installed_the_check_says_nothing(what):
    r = subprocess.run([str(ROOT / ".ci/install-deps"), "--if-missing", what],
                       capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
