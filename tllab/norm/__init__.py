"""Normalization strategies: one :class:`tllab.plugin.Plugin` subclass per file, each with a
YAML of the same name in ``configs/norm/`` (``norm=<name>``; stack them with ``norm=[a,b]``)."""
