"""The one way tests run the klstream CLI.

``invoke`` runs it in process through click's CliRunner; ``start_process`` runs
``python -m klstream`` as a separate process, for tests that must signal or kill it
or see every byte it prints. Neither sees the developer's credentials.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from click.testing import CliRunner, Result

from klstream.cli import main

CREDENTIAL_VARIABLES = (
    "GEMINI_API_KEY",
    "GOOGLE_API_KEY",
    "GOOGLE_GEMINI_BASE_URL",
    "GOOGLE_CLOUD_PROJECT",
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
)
BYTECODE_CACHE = Path(tempfile.gettempdir()) / "klstream-tests-pycache"
"""Where the processes started keep their compiled modules, outside the tree and from one to
the next: where the environment says PYTHONDONTWRITEBYTECODE, each would otherwise compile
every module it imports again, seconds of each test that starts one."""


def invoke(*args: object) -> Result:
    """``klstream ARGS`` in process; exceptions the CLI does not handle propagate to the test."""
    return CliRunner().invoke(
        main,
        [str(a) for a in args],
        catch_exceptions=False,
        env=dict.fromkeys(CREDENTIAL_VARIABLES),
    )


def start_process(*args: object, **env: str) -> subprocess.Popen[str]:
    """``python -m klstream ARGS`` in a separate process, with ``env`` added to its environment."""
    inherited = {
        k: v
        for k, v in os.environ.items()
        if k not in (*CREDENTIAL_VARIABLES, "PYTHONDONTWRITEBYTECODE")
    }
    return subprocess.Popen(
        [sys.executable, "-m", "klstream", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PYTHONPYCACHEPREFIX": str(BYTECODE_CACHE), **inherited, **env},
    )
