"""An example Belladonna plug-in: `checker_noise` (attack), `median_filter` (defense), `tiny_cnn` (model).

Install it (``pip install examples/plugin``) and the three names work in any benchmark config; it
imports only ``poison_core.plugin``, the stable surface.
"""
