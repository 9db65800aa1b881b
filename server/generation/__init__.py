"""Paid AI generations: the model catalogue, the lifecycle, the queue's workers, providers."""
