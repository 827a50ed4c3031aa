"""The central collector: events of many agents in one database, and the questions asked of them.

- ingest: one stream per agent (gRPC GetEvents over mutual TLS), resumed from the last seq the
  store holds; each received batch and its cursor advance are one transaction, so a crash of
  the collector, the agent or the database never loses or duplicates an event;
- store: SQLite (default, zero setup) or PostgreSQL; the events, per-agent cursors, lost ranges,
  and two small tables kept up to date on ingest: workloads and their destinations;
- discovery: a static list, DNS names (every A/AAAA record), files of addresses;
- query and policy_draft: the incident and rollout questions behind `hostagent collector ...`.

docs/collector.md describes deployment, the schema and the delivery guarantee.
"""
