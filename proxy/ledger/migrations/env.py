"""Alembic's environment for the ledger: always run by `proxy.ledger.database.migrate`, which hands it an
open connection (in a transaction holding the migration lock) through `config.attributes`."""

from alembic import context

from proxy.ledger.schema import metadata

connection = context.config.attributes["connection"]
# SQLite alters tables by copying them ("batch" mode); PostgreSQL alters them in place.
context.configure(connection=connection, target_metadata=metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
