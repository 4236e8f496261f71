"""The scheduler: one scheduling core, two ways to keep its state.

Where things live:

- `rules/` is the core: every scheduling rule, written once, as pure code with
  the clock passed in (what a report means, what a finished lease means,
  attempts, matching and fairness, timeouts, retention).
- `model.py` holds the values that go in and out (operations, sessions,
  leases); `api.py` the protocol the services call; `protos.py` the messages
  built from the values; `results.py` the blob I/O of a finished lease, done
  before either strategy records it; `notify.py` the wake-ups of waiting calls.
- `embedded/` keeps the state in memory and writes it behind to SQLite (the
  default) or to PostgreSQL for one server.
- `replicated/` keeps it in PostgreSQL for several replicas: every decision is
  one transaction, claims use ``FOR UPDATE SKIP LOCKED``, wake-ups LISTEN/NOTIFY.

Both strategies behave the same, and tests/contract runs one suite against both.
Where they once differed, the behaviour is now this:

- A result is in the action cache before its job completes: the bot's update
  waits for the write (and for the completion to be durable); no client sees
  the operation done before its result can be read from the action cache.
- A bot that failed an action gets it back only when no other *live* bot (heard
  from within the keepalive, not terminating, able to run it, not a failer of it
  too) exists, and only after a back-off (`retry-backoff`, doubling per attempt).
- A cacheable submission joins the unfinished job of the same action; a job
  that succeeded in the last 10 s answers it too, unless it skips the cache
  lookup (`skip_cache_lookup`), which then queues the action anew.
- A bot that stops (BOT_TERMINATING, now or in an earlier update) and gives an
  action up is not counted against the action.
- `bot_events`, `housekeep` and every other call are coroutines in both.
- Counters (`stats`) count each event once, on the process where it happened;
  the fairness share is counted per process.
- A bot holding leases that stays silent for `lease-timeout` has its leases
  requeued (counted as an attempt), while its session lives until the keepalive.
"""
