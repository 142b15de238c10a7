"""localgpt: private, fully offline question answering over your own documents.

Importing this package does nothing but define names: no model loads, no store
opens and no environment variable changes until a function is called.
"""

__version__ = "0.1.0"
