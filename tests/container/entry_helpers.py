"""Run the container entrypoint as a real process, with LMI's entrypoint replaced by a stand-in
that writes the environment and arguments it was started with to a JSON file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers import REPO

SEED_KV = '{"kv_connector":"LMCacheConnectorV1", "kv_role":"kv_both"}'  # the seed's exact text

STAND_IN = """#!{python}
import json, os, sys
with open(os.environ["STAND_IN_RECORD"], "w") as handle:
    json.dump({{"argv": sys.argv[1:], "env": dict(os.environ)}}, handle)
sys.exit(int(os.environ.get("STAND_IN_EXIT", "0")))
"""


@dataclass(frozen=True)
class Run:
    returncode: int
    log: str  # the entrypoint's stderr
    record: dict[str, Any] | None  # what the stand-in saw; None if it never ran

    @property
    def env(self) -> dict[str, str]:
        assert self.record is not None, f"the next stage did not run:\n{self.log}"
        return self.record["env"]

    @property
    def kv(self) -> dict[str, Any]:
        return json.loads(self.env["OPTION_KV_TRANSFER_CONFIG"])


def stand_in(folder: Path) -> Path:
    path = folder / "dockerd-entrypoint.sh"
    path.write_text(STAND_IN.format(python=sys.executable))
    path.chmod(0o755)
    return path


def lmi_stand_in(folder: Path) -> Path:
    """An executable that runs tests/container/lmi_stand_in.py (LMI, then vLLM's resolution)."""
    path = folder / "lmi-and-vllm.py"
    script = REPO / "tests" / "container" / "lmi_stand_in.py"
    path.write_text(f"#!{sys.executable}\nimport runpy\n"
                    f"runpy.run_path({str(script)!r}, run_name='__main__')\n")
    path.chmod(0o755)
    return path


def run_entrypoint(tmp: Path, env: dict[str, str], args: tuple[str, ...] = ("serve",),
                   command: list[str] | None = None, next_stage: Path | None = None,
                   timeout: float = 60) -> Run:
    """Start the entrypoint with only ``env`` on top of a clean environment (no LMCACHE/OPTION_
    /VLLM_PLUGINS vars from the caller), the recording stand-in (or ``next_stage``) as next
    stage, and the model dir under ``tmp``."""
    record = tmp / "record.json"
    record.unlink(missing_ok=True)
    clean = {k: v for k, v in os.environ.items()
             if "LMCACHE" not in k and not k.startswith("OPTION_") and k != "VLLM_PLUGINS"}
    full = {**clean, "LMI_ENTRYPOINT": str(next_stage or stand_in(tmp)),
            "STAND_IN_RECORD": str(record), "SM_MODEL_DIR": str(tmp / "no-model"), **env}
    command = command or [sys.executable, "-m", "lmcache_ext.container.entrypoint"]
    done = subprocess.run([*command, *args], env=full, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    seen = json.loads(record.read_text()) if record.exists() else None
    return Run(done.returncode, done.stderr + done.stdout, seen)
