"""The HTTP routes: each hands its request to the service (server.service) and shapes the answer."""
