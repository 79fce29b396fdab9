"""Turnout's pure core: the configuration document, bucketing and routing decisions.

Nothing in this package opens a socket or touches asyncio except the store modules at its
edge (`filestore`, `redisstore`, `watch`), which are the only places that do I/O.
"""
