"""Everything that lives in Redis between the adapters and the workers: the jobs stream and its
consumer group (``stream``), turn order within a thread (``ordering``), admission and rate limits
(``ratelimit``), reply events (``outbox`` writes them, ``replies`` reads them), file blobs
(``blobs``), the connection (``redis_conn``, Sentinel-aware) and request pipelining (``autopipe``).
Imports only ``bot.core``."""
