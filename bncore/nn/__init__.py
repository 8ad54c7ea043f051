"""Batch normalization, exact to torch.nn, that reports what it computes: the layers
(:mod:`~bncore.nn.batchnorm`), the function (:mod:`~bncore.nn.functional`) and its kernels
(:mod:`~bncore.nn.kernels`), what a layer computes anyway and how a recorder asks for it
(:mod:`~bncore.nn.byproducts`), the variants the literature compares (:mod:`~bncore.nn.norms`)
and synchronized BN (:mod:`~bncore.nn.sync`)."""
