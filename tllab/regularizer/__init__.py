"""Fine-tuning regularizers: one :class:`tllab.plugin.Plugin` subclass per file, each with a YAML
of the same name in ``configs/regularizer/`` (``regularizer=<name>``; stack them with
``regularizer=[a,b]``)."""
