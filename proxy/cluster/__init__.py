"""A cluster of proxies on Redis (issue 27)."""
