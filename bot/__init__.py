"""codeloop: the OpenCodeInterpreter loop in team chat.

Flow: adapter (console | slack | discord) -> Job on a Redis stream -> worker (agent loop:
model + sandbox) -> Events on the adapter's reply stream -> adapter renders them.
"""

__version__ = "0.1.0"
