"""Run-time style adapters: ``spec`` (what the build, ``adapter add`` and the runtime agree on: input names,
layouts, the manifest section, the index, the entry lock; numpy only, read by the store, the backends and the
runtime), ``graph`` (adapter branches into an exported graph: a build stage) and ``index`` (``adapter add |
list | remove``, which reads LoRA files with the build's loaders). The per-call application is
``runtime/adapters.py``."""
