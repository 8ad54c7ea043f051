"""bnscope: the entry points of BN Scope — the ``bnscope`` command line (:mod:`bnscope.cli`) and
the Python client that streams a training script's BN statistics to a server
(:mod:`bnscope.client`)."""
