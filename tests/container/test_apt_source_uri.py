"""container/apt_source_uri.sh: the image test takes its Debian archive from the machine's own apt
sources (deb822 or one-line), naming none itself. Real files in a stand-in apt directory."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.helpers import REPO

SCRIPT = REPO / "container" / "apt_source_uri.sh"
MAIN = "http://apt.example.invalid/debian"
SECURITY = "http://apt.example.invalid/debian-security"


def uri_for(apt_dir: Path, release: str = "bookworm") -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), release, str(apt_dir)], capture_output=True, text=True,
                          timeout=30)


def apt_dir(tmp_path: Path, files: dict[str, str]) -> Path:
    (tmp_path / "sources.list.d").mkdir(parents=True)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


DEB822 = f"""Types: deb
# http://snapshot.example.invalid/archive/debian-security/20250520T000000Z
URIs: {SECURITY}
Suites: bookworm-security
Components: main

Types: deb deb-src
# http://snapshot.example.invalid/archive/debian/20250520T000000Z
URIs: {MAIN} http://second.example.invalid/debian
Suites: bookworm bookworm-updates
Components: main
"""


def test_the_release_stanza_of_a_deb822_file_wins_over_other_suites(tmp_path):
    """Scenario: Debian 12's default debian.sources, security listed first."""
    done = uri_for(apt_dir(tmp_path, {"sources.list.d/debian.sources": DEB822}))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == MAIN


def test_a_one_line_sources_list_with_options(tmp_path):
    files = {"sources.list": f"# deb {SECURITY} bookworm main\n"
                             f"deb-src {SECURITY} bookworm main\n"
                             f"deb [arch=amd64 signed-by=/k.gpg] {MAIN} bookworm main\n"}
    done = uri_for(apt_dir(tmp_path, files))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == MAIN


def test_deb822_files_come_before_one_line_lists_and_disabled_files_are_ignored(tmp_path):
    files = {"sources.list.d/debian.sources": DEB822,
             "sources.list.d/other.sources.disabled": DEB822.replace(MAIN, "http://x.invalid/d"),
             "sources.list": f"deb {SECURITY} bookworm main\n"}
    done = uri_for(apt_dir(tmp_path, files))
    assert done.stdout.strip() == MAIN


def test_no_source_for_the_release_is_an_error_saying_where_it_looked(tmp_path):
    done = uri_for(apt_dir(tmp_path, {"sources.list.d/debian.sources": DEB822}), "trixie")
    assert done.returncode == 1 and done.stdout == ""
    assert "no deb source for trixie" in done.stderr and "sources.list" in done.stderr


def test_the_container_folder_names_no_package_host():
    for path in (REPO / "container").iterdir():
        if path.is_file():
            assert not re.search(r"deb\.debian|mirror|https?://", path.read_text()), path
