"""The credit ledger's domain: balances, transactions and who may move them."""
