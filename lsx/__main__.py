"""``python -m lsx``: the ``lsx`` command."""

from lsx.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
