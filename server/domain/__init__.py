"""What both domains share: who may act on whose rows, argument checks, and paging."""
