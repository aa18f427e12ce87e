"""The wheel ships the SQL and the price table, and klstream loads them from inside the installed
package."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from hatchling.builders.wheel import WheelBuilder

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_carries_sql_and_loads_it_from_the_package(tmp_path: Path) -> None:
    (wheel,) = WheelBuilder(str(ROOT)).build(directory=str(tmp_path), versions=["standard"])
    names = zipfile.ZipFile(wheel).namelist()
    prefix = "klstream/sql/"
    shipped = sorted(n.removeprefix(prefix) for n in names if n.startswith(prefix))
    assert shipped == sorted(p.name for p in (ROOT / "sql").glob("*.sql"))
    templates = ROOT / "klstream" / "output" / "templates"
    assert {f"klstream/output/templates/{p.name}" for p in templates.iterdir()} <= set(names)
    assert "klstream/backends/prices.json" in names

    installed = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(installed)
    probe = (
        "from klstream.storage.sqlfiles import sql_directory, load_sql; "
        "print(sql_directory()); assert 'CREATE OR REPLACE VIEW kl' in load_sql('file_view_kl'); "
        "from klstream.output.report import Payload, render; "
        "page = render(Payload({'meta': {'klstream_version': '0', 'run_dir': 'r', "
        "'generated_at': 'now', 'page_of': []}, 'models': []}), 't'); "
        "assert 'DecompressionStream' in page and 'KLR1' in page; "
        "from klstream.backends.prices import load_prices; "
        "assert 'gemini-2.5-flash' in load_prices()"
    )
    env = {**os.environ, "PYTHONPATH": str(installed)}
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
    )
    assert Path(result.stdout.strip()) == installed / "klstream" / "sql"


def test_every_benchmark_script_imports() -> None:
    """A benchmark runs rarely; a rename must not leave one that cannot even start."""
    scripts = sorted((ROOT / "bench").glob("*.py"))
    imports = "; ".join(f"import {script.stem}" for script in scripts)
    result = subprocess.run(
        [sys.executable, "-c", imports],
        cwd=ROOT / "bench",
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "bench")},
    )
    assert result.returncode == 0, result.stderr
