"""`make bench`: the service measured against the limits of this machine (never part of
`make test`)."""
