"""``python -m lsx``: the ``lsx`` command."""

from lsx.cli import main

raise SystemExit(main())
