"""Data sources: P3 TFRecords, promptsource templates over raw rows, BIG-bench JSON, continual
JSONL."""
