"""Everything that exists to try the system on one machine: the demo, the simulated fleet,
fault injection, the scenario runners, the embedded broker, broker and process helpers.
No daemon imports it."""
