"""The central diagnostic server: receives escalated cases, stores each once, returns verdicts.

A shell over the core like the CLI and the GUI: it may import the core (envelope opening, model
loading), never the other way round (import-linter contract in ``pyproject.toml``).
"""
