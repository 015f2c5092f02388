"""Ray runtime helpers on the ground floor: the replica (caller watch, logging, ids), torch threads,
fault hooks, and the record of a running stack. They import only serve.config and serve.errors."""
