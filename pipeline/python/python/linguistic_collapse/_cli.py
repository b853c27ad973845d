"""The ``pipeline`` console script: the same command line as the binary."""

import sys


def main() -> None:
    from . import _native

    sys.exit(_native.cli_main(["pipeline", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
