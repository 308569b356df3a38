"""The GPU check's dry run (what `make test` also runs through scripts/gpu_check.sh): on the CPU,
tiny shapes, every section's JSON fields and a verdict per issue-22 target; warm output equal to
cold. The nested pytest section is left to the script run."""

from __future__ import annotations

import json

import gpu_check  # benchmarks/, put on sys.path by conftest.py


def test_the_dry_run_writes_every_section_and_target(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = gpu_check.main(["--dry-run", "--out", str(out), "--skip", "tests"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["dry_run"] and not gpu_check.failed(result)
    rows = result["data_path"]
    assert {(r["shape"], r["vllm_layout"]) for r in rows} == {
        (shape, vllm) for shape in result["plan"]["shapes"] for vllm in ("0.23", "0.33")}
    for row in rows:
        assert set(row["gbps"]) == {"d2d", "gather", "scatter", "h2d", "d2h", "load", "store"}
        assert set(row["seconds"]) == set(row["gbps"])
        assert all(value > 0 for value in row["seconds"].values())
    engine = result["engine"]
    assert [r["prompt_tokens"] for r in engine] == list(result["plan"]["prompts"])
    assert all(r["output_equal"] and r["loaded_tokens"] > 0 for r in engine)
    targets = {v["target"] for v in result["verdicts"]}
    assert {name for name, *_ in gpu_check.TARGETS} | {"warm output == cold"} == targets


def test_the_cuda_tests_are_found_for_the_gpu_run():
    files = gpu_check.cuda_test_files()
    assert "tests/kernels/test_cuda_kernels.py" in files
