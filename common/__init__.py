"""The ground floor: what every other part shares (one-line errors, atomic output folders, saved models, plugins).

It imports nothing else of the project (tests/test_import_graph.py).
"""
