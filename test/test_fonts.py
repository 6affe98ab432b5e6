"""The web page shows nicknames from many scripts (name.txt): on the machine that takes
its screenshots (test/artifacts/), every character of name.txt must have a font, or it
is drawn as an empty box. The test dependencies install Debian's Noto fonts for this."""
import shutil
import subprocess

import pytest

from conftest import ROOT


def test_every_character_of_the_names_has_a_font():
    if not shutil.which("fc-list"):
        pytest.fail("fc-list (fontconfig, which chromium brings) is missing")
    text = (ROOT / "name.txt").read_text(encoding="utf-8")
    chars = sorted({c for c in text if ord(c) > 0x7F and not c.isspace()})
    missing = [c for c in chars
               if not subprocess.run(["fc-list", f":charset={ord(c):x}", "family"],
                                     capture_output=True, text=True).stdout.strip()]
    assert not missing, "no font for: " + " ".join(f"{c} U+{ord(c):04X}" for c in missing)
