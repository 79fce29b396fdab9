"""Turnout's pure core: the configuration document, bucketing and routing decisions.

Data in, data out: no sockets, no asyncio, no files, no redis, no yaml, no pydantic-settings
(`tests/test_layering.py` holds the allow-list). The stores, the watcher, settings and secret
files that do I/O live beside it in `stores/`.
"""
