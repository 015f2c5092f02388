"""Alembic migrations of the job service's schema (run by `serve.db.Database.migrate`)."""
