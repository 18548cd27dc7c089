"""``python -m spinediff``: the same as the ``spinediff`` command."""

from spinediff.cli import main

raise SystemExit(main())
