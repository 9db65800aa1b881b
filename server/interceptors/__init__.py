"""gRPC server interceptors: the cross-cutting steps every RPC passes through."""

from server.interceptors.auth import AuthInterceptor

__all__ = ["AuthInterceptor"]
