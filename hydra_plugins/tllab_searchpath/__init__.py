"""tllab's Hydra search-path plug-in (see tllab_searchpath.py)."""
