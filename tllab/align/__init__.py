"""Domain-alignment methods (``align=<name>``): DANN, CDAN(+E) and MCC, stackable after the
normalization strategies and regularizers (``norm=adabn align=cdan``). One file per method;
:mod:`tllab.align.grl` and :mod:`tllab.align.discriminator` hold what the adversarial ones share."""
