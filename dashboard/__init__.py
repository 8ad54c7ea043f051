"""dashboard: the Dash app, drawing runs live, mounted beside the API by bnscope.app.

It calls the service (server.service) and reads its store, never a route: ``data`` reads what a
view needs, ``figures`` draws it (and says how each figure grows live), ``callbacks`` wires the
page, ``assets/live.js`` extends the figures from the run's event stream.
"""
