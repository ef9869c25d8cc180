"""``python -m batch`` is the ``imgbatch`` command."""

from batch.launch import main

main()
