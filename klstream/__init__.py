"""klstream: where, and by how much, two language models' next-token distributions disagree."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("klstream")
except PackageNotFoundError:
    __version__ = "0.0.0+source"
