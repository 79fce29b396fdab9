"""The runtime both planes share, beside the pure core: the embedded file store, the Redis store
(the only importer of redis), the watcher that turns store revisions into compiled snapshots,
settings (pydantic-settings, YAML) and generated secrets.

`flags/` defines the Store protocol and the document; everything here does I/O.
"""
