"""Redis: the keys, the Lua scripts and ``gateway.CreditStore`` that calls them (see
the gateway's docstring for a map of the package)."""
