"""dashboard: the Dash app mounted in the server, drawing runs live (issue #5)."""
