"""``python -m metafast`` runs the ``metafast`` command."""
import sys

from metafast.cli import main

if __name__ == "__main__":
    sys.exit(main())
