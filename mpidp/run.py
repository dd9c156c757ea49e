"""``mpidprun`` and ``python -m mpidp.run``: start an mpidp job over MPI (see ``mpidprun --help``)."""
import sys

from .launch.cli import main as _main

__all__ = ["main"]


def main(argv=None):
    """Console-script entry point: parse ``argv`` (default ``sys.argv[1:]``) and exit with the job's code."""
    sys.exit(_main(argv))


if __name__ == "__main__":
    main()
