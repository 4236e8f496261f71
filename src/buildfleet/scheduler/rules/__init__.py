"""The scheduling core: every rule of the scheduler, written once.

Pure functions and small values: no I/O, no asyncio, no gRPC.  Time and ids are
parameters (a strategy passes its clock in), so every rule is tested as a plain
function with a fake clock (tests/unit/scheduler).  Both strategies ask these
modules for each decision and apply it their own way:

- `submissions`: what a submission may be (timeout bounds, queue bound) and what
  it joins (an identical action in flight, or one that just succeeded);
- `reports`: which lease reports a bot may send, and what a report means for
  each lease it holds;
- `outcomes`: what a finished lease means for its job (complete it with which
  response, or take it back; retry or fail once out of attempts);
- `matching`: which bot may run which job, in which order (priority, fairness),
  and the lease id each attempt gets;
- `timers`: silence (lease timeout, keepalive), action timeouts, actions no bot
  can run, how long a long-poll is held, retention.
"""
