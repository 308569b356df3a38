"""The endpoint's environment file (``--env-file``): ``KEY=VALUE`` lines, read strictly.

- Blank lines and lines starting with ``#`` are skipped; anything else must be ``KEY=VALUE``.
- The key is a shell-style name (``[A-Za-z_][A-Za-z0-9_]*``); the value is everything after the
  first ``=``, verbatim (it may hold ``=`` and JSON; quotes are kept, as ``docker --env-file``
  does). A key given twice is an error: which line wins would be a guess.
- Each error names the file and the line number.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Names whose values are secrets (masked in printed plans). ``*_ENV`` keys name a variable
# (e.g. OPTION_LMCACHE_REMOTE_PASSWORD_ENV=REDIS_PASSWORD) and are shown.
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|(^|_)(API_)?KEY($|_)|AUTH")
URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]*@")
MASK = "****"


class EnvFileError(ValueError):
    """A line that is not ``KEY=VALUE``; the text names the file and the line."""


def parse_env(text: str, source: str = "<env>") -> dict[str, str]:
    env: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise EnvFileError(f"{source} line {number}: expected KEY=VALUE, got {raw!r}")
        if not KEY.fullmatch(key):
            raise EnvFileError(f"{source} line {number}: {key!r} is not a variable name "
                               f"(letters, digits and _, not starting with a digit; no spaces "
                               f"around '=')")
        if key in env:
            raise EnvFileError(f"{source} line {number}: {key} is already set on line "
                               f"{first_line[key]}")
        env[key] = value
        first_line[key] = number
    return env


def read_env_file(path: str | Path) -> dict[str, str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise EnvFileError(f"{path}: cannot read the env file: {error.strerror}") from error
    return parse_env(text, str(path))


def is_secret_name(key: str) -> bool:
    return not key.endswith("_ENV") and SECRET_NAME.search(key.upper()) is not None


def masked(env: Mapping[str, str]) -> dict[str, str]:
    """The env to print: secret-looking values and the credentials in URLs replaced."""
    return {key: MASK if is_secret_name(key) else
            URL_USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", value)
            for key, value in env.items()}
