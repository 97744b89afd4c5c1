"""The `tinygen` command line: app.py registers one module per command group; ui.py, views.py,
progress.py, repl.py and explorer.py draw. The only layer that prints; it may import anything.
"""
