"""tllab's Hydra sweeper (see tllab_sweeper.py)."""
