"""The lake: the warehouse tables as Apache Iceberg tables, written with pyiceberg by one or more sinks.

`tables` derives the Iceberg schemas from `warehouse.schema`; `catalog` is the SQL catalog (SQLite or
PostgreSQL) with atomic commits across tables; `writer` turns a batch into one such commit, with the
Kafka offsets it covers in the snapshot summaries; `sink` consumes Kafka in a consumer group;
`read` opens the tables in DuckDB; `maintain` compacts small files and expires old snapshots.
"""
