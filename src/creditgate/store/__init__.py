"""Redis: the key builders, the Lua scripts and the gateway that calls them."""
