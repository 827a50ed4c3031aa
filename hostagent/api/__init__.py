"""The agent's gRPC API (proto/hostagent/v1): the server in the agent, the client of `hostagent events` and the collector."""
