"""The engine store: an entry is a folder with ``manifest.json`` (``manifest``: schema, keys, compatibility
checks, ``inspect``'s table). Free of torch/diffusers: the lean runtime reads entries through it."""
