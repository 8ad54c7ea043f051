"""dashboard: the Dash app, drawing runs live, mounted beside the API by bnscope.app.

It calls the service (server.service), never a route nor the store: ``data`` reads what a view
needs through it, ``figures`` draws it (each run-view figure declared once, with how it grows
live), ``views`` holds each tab's layout and callbacks as plain functions, ``wiring`` binds
those to the service at mount, ``app`` builds the page from the views, ``assets/live.js``
extends the figures from the run's event stream.
"""
