"""server: the REST service that runs, stores and streams training runs.

A request enters through ``routes`` (thin: one call into the service each) of the FastAPI app
in ``app``; ``service`` does the work (launch, sweeps, experiments, ingest, reads) and raises
``errors``; ``scheduler`` runs each training in a ``worker`` process, which reports back through
the same API; ``store`` keeps runs and records in SQL, ``hub`` streams them live. Nothing here
imports the dashboard: bnscope.app mounts it beside the API (docs/architecture.md).
"""
