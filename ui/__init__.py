"""The localgpt web page: ``ui/app.py`` is the Streamlit script, ``ui/launch.py`` starts it.

Thin by design: the page calls the same core functions as the CLI (``ingest_folder``,
``Store``, ``QAChain``). Importing this package loads nothing and starts nothing.
"""
