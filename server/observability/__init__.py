"""What operators see: one JSON log line per RPC, with the request id the caller can quote."""
