"""``python -m triton_adam.experiments [--quick] [--out DIR]``."""
from __future__ import annotations

import argparse
import sys

from . import DEFAULT_OUT, EXPERIMENTS, run_experiments


def main(argv=None) -> int:
    """Parse arguments, run the experiments, print the report path."""
    parser = argparse.ArgumentParser(prog="python -m triton_adam.experiments", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="cut-down run (under a minute on CPU)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--only", nargs="+", choices=EXPERIMENTS, help="run only these experiments")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    path = run_experiments(args.out, args.quick, progress=not args.no_progress, only=args.only)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
