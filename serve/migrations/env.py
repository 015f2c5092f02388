"""Alembic environment: runs on the connection `serve.db.Database.migrate` passes in."""

from alembic import context

from serve.db import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through serve.db.Database.migrate (or `cinevivid db upgrade`)")

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
context.run_migrations()
