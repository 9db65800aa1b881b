"""The gRPC edge: servicers, proto conversion and the one error table."""
