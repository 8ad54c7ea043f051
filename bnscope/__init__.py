"""bnscope: the entry points of BN Scope: the composition root that assembles the service, the
API and the dashboard into one server (:mod:`bnscope.app`), the ``bnscope`` command line
(:mod:`bnscope.cli`), the Python client that streams a training script's BN statistics to
a server (:mod:`bnscope.client`, :mod:`bnscope.lightning`), and the server that client starts
for a script or notebook given no server (:mod:`bnscope.local`, a ``bnscope serve`` child
process: :mod:`bnscope.process`)."""
