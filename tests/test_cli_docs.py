"""docs/cli.md's table of the main job's flags gives the defaults the parser has."""

import re
from pathlib import Path

from train.models.scan import DEFAULT_SCAN_REMAT
from train.options import CLASSIFY, Parser, add_options

CLI_MD = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
WORDS = {"none": None, "off": False, "on": True}
CHOSEN_LATER = {"--scan-remat": DEFAULT_SCAN_REMAT}  # a parser default of None that stands for this value


def flag_rows() -> list[tuple[list[str], list[str]]]:
    """Each row of the classify table: its flags and its defaults (one default may stand for all its flags)."""
    section = CLI_MD.read_text().split("## Commands and flags", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if line.startswith("| `--"):
            flags_cell, defaults_cell = line.split(" | ")[:2]
            rows.append((re.findall(r"`(--[\w-]+)`", flags_cell), [d.strip() for d in defaults_cell.split(", ")]))
    return rows


def as_documented(default) -> str | float | bool | None:
    """A parser default as the table writes it: numbers as numbers, sequences space-joined."""
    if isinstance(default, (list, tuple)):
        return " ".join(map(str, default))
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return float(default)
    return default


def parse_documented(text: str) -> str | float | bool | None:
    text = text.strip("`")
    if text in WORDS:
        return WORDS[text]
    try:
        return float(text)
    except ValueError:
        return text


def test_the_classify_table_gives_the_parsers_defaults():
    parser = Parser(prog="python -m train classify")
    add_options(parser, CLASSIFY)
    defaults = {option: action.default for action in parser._actions for option in action.option_strings}
    rows = flag_rows()
    assert len(rows) > 15
    for flags, documented in rows:
        if len(documented) == 1:
            documented = documented * len(flags)
        assert len(documented) == len(flags), flags
        for flag, text in zip(flags, documented):
            assert flag in defaults, f"docs/cli.md lists {flag}, which classify does not have"
            default = CHOSEN_LATER.get(flag) if defaults[flag] is None else defaults[flag]
            assert parse_documented(text) == as_documented(default), (
                f"docs/cli.md gives {flag} the default {text}; the parser's is {default!r}")
