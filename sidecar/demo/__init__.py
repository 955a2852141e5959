"""The built-in demo and the fake upstreams behind it and the fast tests.

Owns the fakes of gptme's and opencode's servers (``fake``), kept honest by
comparison with the released servers (``tests/real``), and ``sidecar demo``
(``run``).

May import: anything. Nothing imports it but the command line and the tests.
"""
