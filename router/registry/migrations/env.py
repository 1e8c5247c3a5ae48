"""Alembic's entry point for the registry's migrations. The router runs them itself
(router.registry.database.migrate) on a connection it passes in `config.attributes`; there is no
alembic.ini and no offline (SQL script) mode."""

from alembic import context

connection = context.config.attributes["connection"]
# SQLite cannot ALTER most things in place: batch mode copies the table instead.
context.configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
