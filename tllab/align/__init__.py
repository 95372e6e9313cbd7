"""Domain-alignment methods (``align=<name>``): DANN, CDAN(+E), MCC, DAN, JAN, MDD and MCD, stackable after the
normalization strategies and regularizers (``norm=adabn align=cdan``). One file per method;
:mod:`tllab.align.grl` and :mod:`tllab.align.discriminator` hold what the adversarial ones share,
:mod:`tllab.align.mmd` what the MMD ones share."""
