"""Alembic migrations of the job service's schema (run by `serve.jobs.db.Database.migrate`)."""
