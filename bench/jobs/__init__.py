"""The benchmark's jobs, in the order they run. Each ``run(args, base, study, peers, results)``
puts its figures in ``results[name]``, records a missing or failing peer as a note or skip, and
raises ``IntuFailure`` only when intu itself failed."""

from __future__ import annotations

from jobs import idle, memory, route, send

JOBS = {"send": send.run, "route": route.run, "memory": memory.run, "idle": idle.run}
