"""Shared contracts every other part of codeloop depends on, and which depend on nothing else in it:
settings (``CODELOOP_*``), the one errors module, the Job and event shapes that travel through Redis,
the input limits every way into the bot enforces, and the notebook format a thread exports to."""
