"""The result channel between the harness (inside a run) and the service: frame kinds and layout.

A frame is: 4-byte big-endian length, then the run's 16-byte nonce, HEADER (kind, index, ok, pid),
then UTF-8 text. The worker drops the run (as tampered) on a frame with a wrong nonce or pid.
"""

from __future__ import annotations

import struct

COMPILE_ERROR = 1  # text: the SyntaxError (or similar)
MODULE_ERROR = 2  # text: what the program raised while loading (SystemExit included)
SETUP_ERROR = 3  # text: test code (not a counted test) raised
TEST = 4  # index, ok, text: one counted test
CASE = 5  # index, ok, text: a call case (ok: tagged JSON value; else the error)
MEMORY = 6  # a MemoryError was seen
EXIT = 7  # script mode: index = how it ended (EXIT_*), text = exit code
DONE = 8  # the harness reached its end
EXIT_END, EXIT_SYSTEM_EXIT, EXIT_EXCEPTION = 0, 1, 2

HEADER = struct.Struct(">BiBI")  # kind, index, ok, pid
RESULT_FD = 3
NONCE_BYTES = 16
