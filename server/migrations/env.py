"""Alembic environment: runs on the connection the Store hands over (see Store.migrate), against
the schema of server.store.schema (so `alembic revision --autogenerate` writes the next one)."""

from alembic import context

from server.store.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
