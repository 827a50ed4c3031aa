"""DNS: the names policies allow (hostagent.dns.names) and the node resolver."""
