"""The pure core: what the sidecar knows and the rules that change it. No I/O, no clock.

Owns the SSE decoder (``sse``), the snapshot and its table of statuses
(``snapshot``), profiles as data (``profile``), the reducer (``reducer``:
events and trigger answers in, snapshots out), the reading of one event
(``events``) and the merge of a snapshot into a JSON body (``merge``).

May import: nothing of the project outside ``sidecar.core`` (the import
contract in ``pyproject.toml`` holds it).
"""
