"""The ``fnconvert`` command line (installed as the ``fnconvert_cli`` package)."""
