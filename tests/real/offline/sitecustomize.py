"""Put on a real gptme server's PYTHONPATH: tiktoken without the network.

gptme counts tokens with tiktoken, which downloads its encoding on first use;
offline every step would fail before the model is called. This hands tiktoken
a byte-level encoding instead (the counts differ, nothing else does).
"""

try:
    import tiktoken
    import tiktoken.registry
except ImportError:  # not a gptme environment
    pass
else:
    _BYTES = tiktoken.Encoding(
        name="bytes",
        pat_str=r"\S+|\s+",
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={"<|endoftext|>": 256, "<|endofprompt|>": 257},
    )

    def _get_encoding(name: str) -> tiktoken.Encoding:
        return _BYTES

    def _encoding_for_model(model: str) -> tiktoken.Encoding:
        return _BYTES

    tiktoken.get_encoding = _get_encoding
    tiktoken.registry.get_encoding = _get_encoding
    tiktoken.encoding_for_model = _encoding_for_model
