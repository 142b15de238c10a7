"""The per-format readers behind ``ingest.load.load_file``: one module per family of formats.

Each reader takes the file's bytes and returns elements in reading order; ``ingest.load``
does the checks every format shares (size, permissions, empty files) and turns a library's
exception into a ``BadFile`` with a reason a person can act on. Readers never touch the
network and import their libraries only when called (they run in parser processes).
"""
