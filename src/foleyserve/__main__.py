"""``python -m foleyserve`` behaves like the ``foleyserve`` command."""

from foleyserve.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
