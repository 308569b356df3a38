"""fio_yardstick against real fio over real files: each configuration reads every file once."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import fio_yardstick as fio  # benchmarks/, put on sys.path by conftest.py
import pytest


@pytest.fixture(autouse=True)
def _fio_installed():
    """A missing fio fails with the fix (`make setup` installs it); never a skip."""
    if not fio.installed():
        pytest.fail(fio.INSTALL_HINT, pytrace=False)


FILE_BYTES = 3 * fio.MIB + 4096  # not a multiple of 1 MiB, as a chunk file is not


def _files(tmp_path: Path, count: int) -> tuple[str, list[str]]:
    sources = []
    for n in range(count):
        path = tmp_path / f"chunk-{n}"
        path.write_bytes(bytes([n]) * FILE_BYTES)
        sources.append(str(path))
    links = str(tmp_path / "links")
    return links, fio.link_in_order(sources, links)


@pytest.mark.parametrize("config", fio.configs("psync"), ids=lambda c: c.name)
def test_every_configuration_reads_every_file(tmp_path, config):
    """Scenario: 6 files dealt to 1 or 4 jobs; fio must read all their whole blocks (run_read
    raises unless exactly those bytes came back) and report a positive speed."""
    links, names = _files(tmp_path, 6)
    gbps = fio.run_read(config, links, names, FILE_BYTES, huge_pages=False)
    assert gbps > 0
    assert sorted(os.listdir(links)) == names  # the job file is gone, the links remain


def test_parse_read_sums_jobs_from_real_output(tmp_path):
    """Scenario: fio's JSON from two jobs without group_reporting; the bytes read add up to
    both files, once each."""
    links, names = _files(tmp_path, 2)
    job = str(tmp_path / "two.fio")
    Path(job).write_text("[global]\nrw=read\nbs=1M\n"
                         f"directory={links}\n[a]\nfilename={names[0]}\n[b]\nfilename={names[1]}\n")
    out = subprocess.run(["fio", "--readonly", "--output-format=json", job],
                         capture_output=True, text=True, check=True).stdout
    gbps, read_bytes = fio.parse_read(out)
    assert read_bytes == 2 * 3 * fio.MIB
    assert gbps > 0


def test_parse_read_refuses_what_is_not_fio_json():
    with pytest.raises(fio.FioError):
        fio.parse_read("fio: engine io_uring not loadable\n")


def test_async_engine_is_one_fio_runs(tmp_path):
    links, names = _files(tmp_path, 1)
    assert fio.async_engine(links, names[0], FILE_BYTES) in ("io_uring", "libaio")


def test_huge_pages_needed_suffice_for_every_configuration(tmp_path):
    """Scenario: exactly the pages huge_pages_needed asks for are reserved; every configuration
    that reads into huge pages runs within them (fio fails with "no huge pages" otherwise).
    Needs root (as CI and the benchmark run): otherwise a failure that says so, not a skip."""
    if os.geteuid() != 0:
        pytest.fail("reserving hugetlb pages needs root: run the tests as root", pytrace=False)
    links, names = _files(tmp_path, 8)
    configs = fio.configs(fio.async_engine(links, names[0], FILE_BYTES))
    with fio.huge_pages_reserved(fio.huge_pages_needed(configs, FILE_BYTES)) as reserved:
        if not reserved:
            pytest.fail("the kernel could not find free huge pages", pytrace=False)
        for config in configs:
            assert fio.run_read(config, links, names, FILE_BYTES, huge_pages=True) > 0
