"""Alembic environment: runs on the connection `serve.jobs.db.Database.migrate` passes in."""

from alembic import context

from serve.jobs.db import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through serve.jobs.db.Database.migrate (the ingress runs it at start-up)")

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
context.run_migrations()
