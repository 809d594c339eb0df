"""The warehouse sink: analyzed calls and chats into DuckDB tables and Parquet files, exactly once."""
