"""The worker's side: the service loop that takes jobs (``service``), one job's run from prompt to
final reply (``jobrun``), the link between a thread and its sandbox session (``sandbox_link``),
per-thread conversation state (``store``), persisted files and the thread's notebook
(``files_store``, ``thread_notebook``), and fetching users' files from the platforms
(``downloads``). Imports ``bot.core``, ``bot.queue``, ``bot.llm``, ``bot.agent``, ``bot.ops`` and
``runner``; never an adapter."""
