"""Transport security for sqm: CURVE keys, ZAP admission and role rights.

- :mod:`.keys`: make and load key files (pyzmq certificate format);
- :mod:`.roles`: which wire commands each role may send;
- :mod:`.auth`: the broker's ZAP handler over ``--clients DIR``;
- :mod:`.handshake`: a refused handshake becomes ``AuthError`` promptly;
- :mod:`.cli`: ``keygen``.
"""
