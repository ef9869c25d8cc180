"""``python -m batch`` is the ``imgbatch`` command."""

from batch.cli import entry

entry()
