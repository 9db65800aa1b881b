"""Providers produce a generation's output; `registry.load` finds one by its catalogue name."""
