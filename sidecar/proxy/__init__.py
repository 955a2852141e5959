"""The request path: what the sidecar does with each kind of request.

One concern a module: ``router`` (which kind a request is, and every failure
turned into an answer), ``forward`` (pass-through and creates), ``enrich``
(the snapshot merged into a GET's answer), ``listing`` (each observed
item of the list with its snapshot), ``trigger`` (requests that start
work), ``websocket``, ``longpoll`` (``Prefer: wait``), ``cache`` (the
event-validated response cache and its whole policy), ``relay`` (an answer
copied to the client), ``bodies`` (the small JSON bodies it reads),
``counts`` (what it counts) and ``settings`` (the options it reads).

May import: ``sidecar.core``, ``sidecar.http``, ``sidecar.state``.
"""
