"""Load the SQL that ships with klstream: ``sql/*.sql`` at the top of a source checkout,
installed into the wheel as ``klstream/sql``."""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path

SOURCE_CHECKOUT_SQL = Path(__file__).resolve().parents[2] / "sql"


def sql_directory() -> Path:
    """Where the SQL files are: inside the installed package, else the source checkout."""
    installed = resources.files("klstream").joinpath("sql")
    if installed.is_dir():
        return Path(str(installed))
    return SOURCE_CHECKOUT_SQL


@cache
def load_sql(name: str) -> str:
    return (sql_directory() / f"{name}.sql").read_text(encoding="utf-8")
