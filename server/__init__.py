"""The credits service: credit balances and paid AI generations over gRPC."""

import os

# gRPC core's fork handlers, off before grpc is first imported (every module that imports it is
# in this package). The embedded PostgreSQL is started, stopped and restarted with pg_ctl, a
# fork followed at once by exec while grpc's threads run: the handlers have nothing to do then,
# and gRPC core printed "fork_posix.cc ... skipping fork() handlers" (not a JSON line) to
# stderr on every stop. The service never forks to keep running grpc in a child (several
# processes are spawned, not forked: server/processes.py). An explicit setting is kept.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
