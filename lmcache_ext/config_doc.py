"""The config key reference in ``docs/CONFIG.md``, rendered from ``config.TABLE``.

The table of keys is code (``lmcache_ext.config``); the doc holds a copy between two marker
lines so that it reads on GitHub. ``render()`` makes that copy, ``replace_block`` puts it into
the doc's text, and ``python -m lmcache_ext.config_doc [--check] [PATH]`` rewrites (or, with
``--check``, only compares) the file. ``tests/test_config_doc.py`` fails while the two differ.
Pure functions apart from ``main``; nothing here reads the environment.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmcache_ext.config import (
    ALIAS_NOTES,
    ALIASES,
    ENV_PREFIXES,
    EXTRA_KEYS,
    NOT_APPLICABLE_KEYS,
    REMOTE_SCHEMES,
    TABLE,
    ConfigKey,
    lmi_env_name,
)

BEGIN = "<!-- BEGIN generated from lmcache_ext/config.py: python -m lmcache_ext.config_doc -->"
END = "<!-- END generated -->"
DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "CONFIG.md"
REGENERATE = "python -m lmcache_ext.config_doc"
# What each of config.py's value checks allows, by the check function's name (a new check needs
# a line here: tests/test_config_doc.py fails on a check without one).
CHECK_TEXT = {
    "_positive": "> 0",
    "_non_negative": ">= 0",
    "_fraction": "0 to 1",
    "_chunk_multiple": "a positive multiple of 16",
    "_remote_scheme": "a URL: " + ", ".join(f"`{s}://`" for s in REMOTE_SCHEMES),
    "_disk_location": "a directory path or a `file://` URL",
}


def _cell(text: str) -> str:
    """Markdown table cell: a pipe would end the cell, a newline the row."""
    return text.replace("|", "\\|").replace("\n", " ")


def _default(key: ConfigKey) -> str:
    shown = f"`{json.dumps(key.default)}`"
    return f"{shown} {key.unit}" if key.unit and key.default is not None else shown


def _allowed(key: ConfigKey) -> str:
    """The value's type, its choices, ``null`` where allowed, and values read as another."""
    if key.choices:
        text = ", ".join(f"`{json.dumps(c).strip(chr(34))}`" for c in key.choices)
    else:
        text = key.type.__name__
    if key.check is not None:
        text += ", " + CHECK_TEXT[key.check.__name__]
    if key.nullable:
        text += "; or `null`"
    for (name, given), meant in ALIASES.items():
        if name == key.name:
            note = ALIAS_NOTES.get((name, given), "")
            text += f"; `{given}` is read as `{meant}`{note}"
    return text


def _envs(key: ConfigKey) -> str:
    """Env names in config._env_candidates' order, lowest precedence first."""
    names = [lmi_env_name(key)] if key.lmi_option else []
    names += [prefix + key.name.upper() for prefix in ENV_PREFIXES]
    return ", ".join(f"`{name}`" for name in names)


def render() -> str:
    """The generated part of docs/CONFIG.md: every key of ``TABLE`` in its order, the keys of
    ``extra_config``, and the LMCache-only keys that are accepted and ignored."""
    lines = ["| key | default | allowed | env vars (lowest precedence first) | meaning |",
             "|---|---|---|---|---|"]
    for key in TABLE:
        cells = (f"`{key.name}`", _default(key), _allowed(key), _envs(key), key.description)
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += ["", "Keys inside `extra_config`:", "",
              "| key | default | allowed | meaning |", "|---|---|---|---|"]
    for key in EXTRA_KEYS:
        cells = (f"`{key.name}`", _default(key), _allowed(key), key.description)
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += ["", "LMCache keys accepted and ignored (logged as not applicable): "
              + ", ".join(f"`{name}`" for name in sorted(NOT_APPLICABLE_KEYS)) + "."]
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """``text`` with the lines between ``BEGIN`` and ``END`` replaced by ``block``; the rest of
    the text is kept byte for byte. ValueError when either marker is missing or out of order."""
    start, stop = text.find(BEGIN), text.find(END)
    if start < 0 or stop < start:
        raise ValueError(f"the doc lacks the marker lines {BEGIN!r} ... {END!r} (in that order)")
    return text[:start] + BEGIN + "\n" + block + "\n" + text[stop:]


def main(argv: list[str] | None = None) -> int:
    """Rewrite the doc's generated block (exit 0), or with ``--check`` compare it: exit 0 when
    equal, 1 when it differs (nothing written), 2 when the file cannot be read or lacks the
    markers."""
    parser = argparse.ArgumentParser(prog=REGENERATE, description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default=str(DOC_PATH))
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 if stale")
    args = parser.parse_args(argv)
    path = Path(args.path)
    try:
        text = path.read_text(encoding="utf-8")
        wanted = replace_block(text, render())
    except OSError as error:
        print(f"cannot read {path} ({error.strerror}): run from a repository checkout or pass "
              "the doc's path", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"{path}: {error}", file=sys.stderr)
        return 2
    if wanted == text:
        return 0
    if args.check:
        print(f"{path} differs from config.TABLE: run `{REGENERATE}`", file=sys.stderr)
        return 1
    path.write_text(wanted, encoding="utf-8")
    print(f"{path}: config table rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
