"""Turnout's control plane: the admin JSON API (auth, audit, versioned writes).

`admin` may import `flags`, never `edge` (DESIGN.md §1).
"""
