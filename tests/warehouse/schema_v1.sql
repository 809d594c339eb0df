-- The warehouse schema of callstream's first release (schema version 1), frozen: the migration
-- tests build a file of it and migrate it. Never edit; a new version gets a file of its own.
CREATE TABLE calls (
  call_id VARCHAR NOT NULL,
  agent_id VARCHAR,
  agent_version BIGINT,
  agent_name VARCHAR,
  call_type VARCHAR,
  direction VARCHAR,
  from_number VARCHAR,
  to_number VARCHAR,
  call_status VARCHAR,
  disconnection_reason VARCHAR,
  start_timestamp TIMESTAMP,
  end_timestamp TIMESTAMP,
  duration_ms BIGINT,
  call_successful BOOLEAN,
  user_sentiment VARCHAR,
  in_voicemail BOOLEAN,
  call_summary VARCHAR,
  combined_cost DOUBLE,
  e2e_latency_p50 DOUBLE,
  e2e_latency_p90 DOUBLE,
  e2e_latency_p99 DOUBLE,
  transfer_destination VARCHAR,
  transfer_end_timestamp TIMESTAMP,
  transcript VARCHAR,
  recording_url VARCHAR,
  metadata JSON,
  dynamic_variables JSON,
  collected_dynamic_variables JSON,
  custom_analysis_data JSON,
  call_cost JSON,
  data_storage_setting VARCHAR,
  opted_out BOOLEAN,
  utterance_count INTEGER,
  tool_call_count INTEGER,
  day DATE NOT NULL,
  event_received_at TIMESTAMP,
  kafka_partition INTEGER,
  kafka_offset BIGINT,
  loaded_at TIMESTAMP,
  _load_seq BIGINT NOT NULL,
  PRIMARY KEY (call_id)
);

CREATE TABLE call_utterances (
  call_id VARCHAR NOT NULL,
  turn INTEGER NOT NULL,
  role VARCHAR,
  content VARCHAR,
  start_s DOUBLE,
  end_s DOUBLE,
  detail JSON,
  day DATE NOT NULL,
  _load_seq BIGINT NOT NULL
);

CREATE TABLE call_tool_calls (
  call_id VARCHAR NOT NULL,
  tool_call_id VARCHAR NOT NULL,
  seq INTEGER,
  name VARCHAR,
  arguments VARCHAR,
  result VARCHAR,
  successful BOOLEAN,
  day DATE NOT NULL,
  _load_seq BIGINT NOT NULL
);

CREATE TABLE chats (
  chat_id VARCHAR NOT NULL,
  agent_id VARCHAR,
  agent_version BIGINT,
  chat_type VARCHAR,
  chat_status VARCHAR,
  start_timestamp TIMESTAMP,
  end_timestamp TIMESTAMP,
  duration_ms BIGINT,
  chat_successful BOOLEAN,
  user_sentiment VARCHAR,
  chat_summary VARCHAR,
  combined_cost DOUBLE,
  transcript VARCHAR,
  metadata JSON,
  dynamic_variables JSON,
  collected_dynamic_variables JSON,
  custom_analysis_data JSON,
  chat_cost JSON,
  message_count INTEGER,
  day DATE NOT NULL,
  event_received_at TIMESTAMP,
  kafka_partition INTEGER,
  kafka_offset BIGINT,
  loaded_at TIMESTAMP,
  _load_seq BIGINT NOT NULL,
  PRIMARY KEY (chat_id)
);

CREATE TABLE chat_messages (
  chat_id VARCHAR NOT NULL,
  turn INTEGER NOT NULL,
  message_id VARCHAR,
  role VARCHAR,
  content VARCHAR,
  created_at TIMESTAMP,
  tool_call_id VARCHAR,
  name VARCHAR,
  successful BOOLEAN,
  detail JSON,
  day DATE NOT NULL,
  _load_seq BIGINT NOT NULL
);

CREATE TABLE _callstream_offsets (
  topic VARCHAR NOT NULL,
  kafka_partition INTEGER NOT NULL,
  next_offset BIGINT NOT NULL,
  updated_at TIMESTAMP NOT NULL,
  PRIMARY KEY (topic, kafka_partition)
);

CREATE TABLE _callstream_dirty (
  family VARCHAR NOT NULL,
  day DATE NOT NULL,
  part_seq BIGINT NOT NULL,
  seq BIGINT NOT NULL
);

CREATE TABLE _callstream_loads (
  seq BIGINT NOT NULL,
  table_name VARCHAR NOT NULL,
  live_rows BIGINT NOT NULL
);

CREATE TABLE _callstream_load_offsets (
  seq BIGINT NOT NULL,
  topic VARCHAR NOT NULL,
  kafka_partition INTEGER NOT NULL,
  first_offset BIGINT NOT NULL
);

CREATE TABLE _callstream_ledger_base (seq BIGINT NOT NULL);
