"""docs/CONFIG.md's key table is config.TABLE rendered: the doc and the code cannot drift apart."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmcache_ext import config_doc
from lmcache_ext.config import TABLE

DOC = Path(__file__).resolve().parent.parent / "docs" / "CONFIG.md"


def test_config_md_equals_the_rendered_table() -> None:
    """Scenario: a key, default or description changed in config.py and the doc was not
    regenerated."""
    text = DOC.read_text(encoding="utf-8")
    assert config_doc.replace_block(text, config_doc.render()) == text, (
        f"docs/CONFIG.md differs from config.TABLE: run `{config_doc.REGENERATE}`")


def test_every_key_is_one_row_with_its_default_and_env_names() -> None:
    rows = config_doc.render().splitlines()
    for key in TABLE:
        mine = [row for row in rows if row.startswith(f"| `{key.name}` |")]
        assert len(mine) == 1, key.name
        assert f"`OPTION_LMCACHE_{key.name.upper()}`" in mine[0]
        assert f"`LMCACHE_{key.name.upper()}`" in mine[0]
    assert "| `chunk_size` | `256` tokens | int, a positive multiple of 16 |" in rows[2]
    lmi = next(row for row in rows if row.startswith("| `sessions_expiration_s` |"))
    assert ("`OPTION_SESSIONS_EXPIRATION`, `LMCACHE_SESSIONS_EXPIRATION_S`, "
            "`OPTION_LMCACHE_SESSIONS_EXPIRATION_S`") in lmi  # lowest precedence first


def test_every_value_check_is_described() -> None:
    """Scenario: a new check function in config.py renders as a KeyError here, not as a row
    that silently omits the rule."""
    for key in TABLE:
        if key.check is not None:
            assert key.check.__name__ in config_doc.CHECK_TEXT, key.name


def test_a_pipe_in_a_description_stays_inside_its_cell() -> None:
    assert config_doc._cell("a | b\nc") == "a \\| b c"


def test_replace_block_keeps_the_prose_and_refuses_a_doc_without_markers() -> None:
    text = f"intro\n{config_doc.BEGIN}\nold rows\n{config_doc.END}\noutro\n"
    assert config_doc.replace_block(text, "new rows") == (
        f"intro\n{config_doc.BEGIN}\nnew rows\n{config_doc.END}\noutro\n")
    with pytest.raises(ValueError, match="marker"):
        config_doc.replace_block("intro only\n", "rows")
    with pytest.raises(ValueError, match="marker"):
        config_doc.replace_block(f"{config_doc.END}\n{config_doc.BEGIN}\n", "rows")


def test_the_command_checks_then_rewrites_a_stale_doc(tmp_path: Path, capsys) -> None:
    doc = tmp_path / "CONFIG.md"
    stale = f"# Config\n{config_doc.BEGIN}\n| old |\n{config_doc.END}\nafter\n"
    doc.write_text(stale, encoding="utf-8")
    assert config_doc.main(["--check", str(doc)]) == 1
    assert "python -m lmcache_ext.config_doc" in capsys.readouterr().err
    assert doc.read_text(encoding="utf-8") == stale
    assert config_doc.main([str(doc)]) == 0
    assert config_doc.main(["--check", str(doc)]) == 0
    rewritten = doc.read_text(encoding="utf-8")
    assert rewritten.startswith("# Config\n") and rewritten.endswith(f"{config_doc.END}\nafter\n")
    assert "| `chunk_size` |" in rewritten
    doc.write_text("no markers\n", encoding="utf-8")
    assert config_doc.main(["--check", str(doc)]) == 2
    assert config_doc.main([str(tmp_path / "absent.md")]) == 2
    assert "cannot read" in capsys.readouterr().err
