"""``python -m swm_hub`` runs the command line."""

from swm_hub.cli import main

main()
