"""``python -m triton_adam`` runs the ``triton-adam`` command."""
import sys

from triton_adam.cli import main

sys.exit(main())
