"""The subcommands of ``metafast``, one module each: its options, its handler and nothing else.
Each module has ``add_parser(subparsers)``; the handler it sets returns the exit status."""
from . import bench, distill, evaluate, multitask, train

COMMANDS = (train, evaluate, multitask, distill, bench)  # in the order `metafast --help` lists them; info is cli's
