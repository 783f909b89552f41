"""`python -m node.cli ...` runs the `ddm-swarm` command line."""

from node.cli import main

main()
