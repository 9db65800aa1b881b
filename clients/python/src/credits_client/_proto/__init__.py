"""Code generated from protos/credits/v1 (make gen)."""
