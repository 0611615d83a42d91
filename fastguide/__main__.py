"""``python -m fastguide ...``: the same command line as ``fastguide ...`` (and ``torchrun -m fastguide``)."""

from fastguide.tools.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
