"""ganray's benchmark harness (`ganray bench`): suites, the plain and peer reference loops, quality.

It imports the orchestrator; nothing in the control plane imports it."""
