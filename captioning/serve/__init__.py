"""The browser demo: ``captioning demo --checkpoint CKPT`` (captioning/serve/server.py)."""
