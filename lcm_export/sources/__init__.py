"""Where weights come from: a hub id, a local folder or a built-in demo (``models``, ``demo``), LoRA files
(``lora``: formats, inspection), tiny VAE decoders (``tiny_vae``)."""
