"""Client for the credits gRPC service."""
