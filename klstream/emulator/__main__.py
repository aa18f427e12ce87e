"""``python -m klstream.emulator``: the ``emulate`` command without the klstream CLI group."""

from klstream.emulator.command import emulate_command

emulate_command(prog_name="python -m klstream.emulator")
