"""gRPC server interceptors: the cross-cutting steps every RPC passes through."""

from server.interceptors.pipeline import CallInterceptor

__all__ = ["CallInterceptor"]
