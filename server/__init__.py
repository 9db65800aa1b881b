"""The credits service: credit balances and paid AI generations over gRPC."""
